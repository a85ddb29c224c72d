"""Teacher training: EDM denoising score matching (Karras et al. 2022, Sec. 5, Eq. 2 and Table 1).

L = E_{y, sigma, n} [ lambda(sigma) || D(y + n, sigma) - y ||^2 ],  ln(sigma) ~ N(P_mean, P_std^2),
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onestep.config import OptimConfig, to_dict
from onestep.denoiser import EDMDenoiser
from onestep.nets import UNetConfig, build_unet
from onestep.samplers import karras_sigmas, sample_heun
from training.methods.base import Method


@dataclass(frozen=True)
class EDMTeacherConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=200))
    grid_steps: int = 18  # Heun steps for sample grids and the periodic metric (35 NFE)
    # Warm start: copy every tensor of this EDM checkpoint whose name and shape match; tensors it lacks (e.g.
    # attention layers added to its architecture) keep their init, with the attention output projections zeroed
    # so that the residual attention blocks start as the identity and the net starts as the source function.
    init_from: str | None = None


def edm_loss(denoiser, y: torch.Tensor, labels, P_mean: float, P_std: float, sigma_data: float,
             gen: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample EDM loss (Eq. 2 with Table 1's sigma distribution and weighting), shape (B,)."""
    rnd = torch.randn(y.shape[0], device=y.device)
    sigma = (rnd * P_std + P_mean).exp()
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    n = torch.randn_like(y) * s
    x0_hat = denoiser(y + n, sigma, labels)
    return (weight * (x0_hat.float() - y) ** 2).flatten(1).mean(1)


def make_edm_denoiser(cfg: EDMTeacherConfig) -> EDMDenoiser:
    d = EDMDenoiser(build_unet(cfg.unet), cfg.sigma_data, cfg.unet.num_classes, cfg.sigma_min, cfg.sigma_max)
    d.spec = {"kind": "edm-denoiser", "unet": cfg.unet.to_dict(), "sigma_data": cfg.sigma_data,
              "sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max}
    return d


def warm_start(denoiser: EDMDenoiser, path: str) -> dict:
    """Load the matching tensors of checkpoint `path` into `denoiser` (see EDMTeacherConfig.init_from)."""
    from onestep.checkpoint import CheckpointError, load_model

    src, meta = load_model(path)
    if meta.get("model", {}).get("kind") != "edm-denoiser":
        raise CheckpointError(f"init_from {path}: an EDM teacher checkpoint is needed, found "
                              f"{meta.get('model', {}).get('kind')!r}")
    src_sd = {k: v.float() for k, v in src.state_dict().items()}
    own = denoiser.state_dict()
    mismatched = [k for k in src_sd if k in own and own[k].shape != src_sd[k].shape]
    if mismatched:
        raise CheckpointError(f"init_from {path}: tensors differ in shape: {mismatched[:5]}")
    unused = [k for k in src_sd if k not in own]
    if unused:
        raise CheckpointError(f"init_from {path}: tensors with no place in this architecture: {unused[:5]}")
    new = [k for k in own if k not in src_sd]
    with torch.no_grad():
        denoiser.load_state_dict({**own, **src_sd})
        for name, mod in denoiser.named_modules():
            if name.endswith("to_out.0") and any(k.startswith(name + ".") for k in new):
                mod.weight.zero_()
                mod.bias.zero_()
    return {"source": path, "source_sha256": meta.get("sha256"), "copied": len(src_sd), "new": len(new)}


class EDMTeacher(Method):
    name = "edm-teacher"
    ema_names = ("denoiser",)
    export_name = "denoiser"

    def __init__(self, cfg: EDMTeacherConfig, data=None):
        super().__init__()
        self.cfg = cfg
        self.data = data
        self.num_classes = cfg.unet.num_classes
        self.image_shape = (cfg.unet.channels, cfg.unet.resolution, cfg.unet.resolution)
        self.trainable["denoiser"] = make_edm_denoiser(cfg)
        if cfg.init_from:
            self.init_report = warm_start(self.trainable["denoiser"], cfg.init_from)

    def optim_config(self, name: str) -> OptimConfig:
        return self.cfg.optim

    def step(self, batch, it, phase):
        loss = edm_loss(self.trainable["denoiser"], batch["x"], batch["labels"], self.cfg.P_mean, self.cfg.P_std,
                        self.cfg.sigma_data).mean()
        return {"loss": loss}

    @torch.no_grad()
    def sample(self, net, z, labels):
        sigmas = karras_sigmas(self.cfg.grid_steps, self.cfg.sigma_min, self.cfg.sigma_max)
        return sample_heun(net, z, sigmas, labels).clamp(-1, 1)

    def config_dict(self) -> dict:
        return to_dict(self.cfg)
