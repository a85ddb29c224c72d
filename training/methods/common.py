"""Pieces shared by the distillation methods: the one-step generator made from a teacher, noise levels and
the EDM denoising loss used to train fake-score networks."""

from __future__ import annotations

import torch

from onestep.checkpoint import image_shape
from onestep.denoiser import OneStepGenerator
from training.methods.base import Method


def generator_spec(teacher_spec: dict, sigma_g: float) -> dict:
    return {"kind": "one-step-generator", "sigma_g": float(sigma_g), "denoiser": teacher_spec}


def karras_sigma_at(t: torch.Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma(t) on the Karras grid, t in [0, 1]: t = 1 -> sigma_max, t = 0 -> sigma_min (EDM Eq. 5 made continuous;
    SiD draws t ~ U[0, t_max/1000] on this grid)."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + (1 - t) * (b - a)) ** rho


def edm_sigma(n: int, device, P_mean: float = -1.2, P_std: float = 1.2) -> torch.Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2) (EDM Table 1, training)."""
    return (torch.randn(n, device=device) * P_std + P_mean).exp()


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class GeneratorMethod(Method):
    """A method whose product is a one-step generator initialised from the teacher: G(z) = D_theta(sigma_g z,
    sigma_g). Subclasses add their other nets and losses."""

    export_name = "generator"
    ema_names = ("generator",)
    needs = ("teacher",)

    def __init__(self, cfg, teacher: torch.nn.Module, sigma_g: float):
        super().__init__()
        self.cfg = cfg
        self.teacher = self.frozen_copy(teacher)
        self.teacher_spec = teacher.spec
        self.num_classes = int(getattr(teacher, "num_classes", 0))
        self.image_shape = image_shape(teacher.spec)
        self.sigma_data = float(getattr(teacher, "sigma_data", 0.5))
        self.sigma_min, self.sigma_max = float(teacher.sigma_min), float(teacher.sigma_max)
        gen = OneStepGenerator(self.trainable_copy(teacher), sigma_g)
        gen.spec = generator_spec(teacher.spec, sigma_g)
        self.trainable["generator"] = gen

    def export_spec(self) -> dict:
        return self.trainable["generator"].spec

    def warm_start_generator(self, path: str) -> dict:
        """Continue from the one-step generator checkpoint `path` (a student of this method or another one):
        its weights replace the teacher copy in G. It must be the same network (denoiser spec and sigma_g) as
        the generator built here. The other nets keep their own initialisation (for SiD, the fake score is
        the teacher again and must first catch up with this generator: fake_warmup)."""
        from onestep.checkpoint import CheckpointError, load_model

        src, meta = load_model(path)
        spec = meta.get("model", {})
        if spec.get("kind") != "one-step-generator":
            raise CheckpointError(f"init_from {path}: a one-step generator checkpoint is needed, found "
                                  f"{spec.get('kind')!r}")
        gen = self.trainable["generator"]
        if spec.get("denoiser") != gen.spec["denoiser"] or float(spec.get("sigma_g", -1)) != gen.spec["sigma_g"]:
            raise CheckpointError(f"init_from {path}: its network (denoiser spec, sigma_g "
                                  f"{spec.get('sigma_g')}) differs from the generator built from this teacher "
                                  f"(sigma_g {gen.spec['sigma_g']})")
        with torch.no_grad():
            gen.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
        return {"source": str(path), "source_sha256": meta.get("sha256"), "source_iteration": meta.get("iteration"),
                "source_teacher": (meta.get("run_config") or {}).get("teacher")}

    def noise(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, *self.image_shape, device=device)

    @torch.no_grad()
    def sample(self, net, z, labels):
        return net(z, labels).clamp(-1, 1)

    def config_dict(self) -> dict:
        from onestep.config import to_dict

        return to_dict(self.cfg)
