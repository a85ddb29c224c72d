"""SFERD (Zhou et al., "Reducing Spatial Fitting Error in Distillation of Denoising Diffusion Models", AAAI 2024),
implemented from the paper on top of direct (Denoising-Student-style) distillation to one step.

- Attention-guided teacher targets (Sec. 3.2): the teacher's trajectories are sampled with the attention-guided
  denoiser (training/methods/attention_guidance.py; eps_guided = eps_deg + w (eps - eps_deg), w = 1.3, blur
  sigma 3) into the same sharded, resumable pair cache as Denoising Student; `guidance = 1` gives the unguided
  ablation. The attention map is the teacher's own self-attention when it has attention layers.
- Semantic gradient predictor (Sec. 3.3, training/methods/sferd_nets.py): x_out = draft + k g_phi(x_t, t, E(x0), c)
  with x_t = sigma_g z, t = sigma_g (the student's single step is t = T); the encoder E sees the teacher's clean
  sample during training; a tiny latent diffusion model learns E's latents (EDM denoising loss) and replaces E at
  sampling.
Losses per step: (1 + SNR(t)) || x_out - x0_guided ||^2 (the paper's weighted x0 regression; SNR = 1 / sigma_g^2,
a constant at the student's single level) + the latent model's denoising loss. The best held-out loss of the
full student (latents from the latent model, as exported) selects the shipped checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onestep.config import OptimConfig
from training.methods.attention_guidance import AttentionGuidedDenoiser
from training.methods.common import edm_sigma, edm_weight
from training.methods.denoising_student import DenoisingStudent
from training.methods.sferd_nets import SFERDGenerator, sferd_spec, shift_coefficient
from training.pair_cache import PairCacheConfig


@dataclass(frozen=True)
class SFERDConfig(PairCacheConfig):
    cache_dir: str = "runs/pairs-sferd"
    teacher_sampler: str = "euler"
    teacher_steps: int = 8
    teacher_schedule: str = "karras"
    guidance: float = 1.3  # w in eps_deg + w (eps - eps_deg); 1 = the plain teacher (ablation)
    blur_sigma: float = 3.0  # Gaussian blur inside the mask, pixels
    blur_kernel: int | None = 15  # taps of the blur kernel; None = 2 ceil(3 sigma) + 1
    attention_layer: int = -1  # which teacher self-attention layer (forward order); -1 = the last (decoder)
    clip_x0: bool = True  # clamp the teacher's x0 to [-1, 1] before blurring (authors' code: clip_denoised)
    latent_dim: int = 16
    latent_steps: int = 4  # Euler steps of the latent model, unrolled in the exported graph
    latent_sigma_max: float = 20.0
    latent_sigma_min: float = 0.02
    latent_on_draft: bool = True  # condition the latent model on the draft (False: unconditional latent model)
    grad_scale: float | None = 1.0  # k; None = the schedule's shift coefficient sigma_g^2 / sqrt(1 + sigma_g^2)
    width: int = 32  # gradient predictor width
    latent_weight: float = 1.0
    loss: str = "l2"  # l2 (paper) | l1
    snr_weight: bool = True  # the paper's (1 + SNR(t)) weight
    sigma_g: float | None = None  # None = the first sigma of the teacher's sampling schedule
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.9, 0.999)))


class SFERD(DenoisingStudent):
    name = "sferd"

    def __init__(self, cfg: SFERDConfig, teacher):
        super().__init__(cfg, teacher)
        draft = self.trainable["generator"]
        k = shift_coefficient(draft.sigma_g) if cfg.grad_scale is None else float(cfg.grad_scale)
        gen = SFERDGenerator(draft, self.image_shape, cfg.latent_dim, cfg.latent_steps, cfg.latent_sigma_max,
                             cfg.latent_sigma_min, k, cfg.width, latent_on_draft=cfg.latent_on_draft)
        gen.spec = sferd_spec(draft.spec, self.image_shape, cfg.latent_dim, cfg.latent_steps, cfg.latent_sigma_max,
                              cfg.latent_sigma_min, k, cfg.width, cfg.latent_on_draft)
        self.trainable["generator"] = gen
        if cfg.guidance != 1.0:
            self.guided_teacher = AttentionGuidedDenoiser(self.teacher, cfg.guidance, cfg.blur_sigma, cfg.blur_kernel,
                                                          cfg.attention_layer, clip_x0=cfg.clip_x0)
            self.teacher_sha = (f"{self.teacher_sha}+attention-guidance(w={cfg.guidance},blur={cfg.blur_sigma},"
                                f"kernel={cfg.blur_kernel},layer={self.guided_teacher.attention_source}"
                                f"{',clip_x0' if cfg.clip_x0 else ''})")
        else:
            self.guided_teacher = self.teacher

    def cache_teacher(self):
        return self.guided_teacher

    def snr_weight(self) -> float:
        """1 + SNR(t) at the student's level: SNR = alpha^2 / sigma_vp^2 = 1 / sigma_g^2."""
        return 1.0 + 1.0 / self.trainable["generator"].sigma_g ** 2 if self.cfg.snr_weight else 1.0

    def _loss(self, net, z, x0, labels):
        d = net(z, labels) - x0
        return self.snr_weight() * (d.abs() if self.cfg.loss == "l1" else d**2).flatten(1).mean(1)

    def step(self, batch, it, phase):
        g: SFERDGenerator = self.trainable["generator"]
        z, x0, labels = batch["z"], batch["x0"], batch["labels"]
        draft = g.generator(z, labels)
        s_enc = g.encoder(x0)
        out = g.refine(z, draft, s_enc, labels)
        d = out - x0
        rec = (self.snr_weight() * (d.abs() if self.cfg.loss == "l1" else d**2)).flatten(1).mean(1).mean()
        # latent model: EDM denoising loss on the encoder's latents (stop-gradient)
        s0 = s_enc.detach()
        sigma = edm_sigma(len(s0), s0.device)
        s_t = s0 + torch.randn_like(s0) * sigma[:, None]
        lat = (edm_weight(sigma[:, None], 1.0) * (g.latent(s_t, sigma, draft.detach(), labels) - s0) ** 2)
        lat = lat.mean(1).mean()
        return {"loss": rec + self.cfg.latent_weight * lat, "rec": rec, "latent_dsm": lat}
