"""SFERD (Zhou et al., "Reducing Spatial Fitting Error in Distillation of Denoising Diffusion Models", AAAI 2024),
implemented from the paper on top of direct (Denoising-Student-style) distillation to one step.

- Attention-guided teacher targets: the teacher's trajectories are sampled with the attention-guided denoiser
  (training/methods/attention_guidance.py; eps_guided = eps + w (eps - eps_deg)) into the same sharded,
  resumable pair cache as Denoising Student; `guidance = 0` gives the unguided ablation. The paper's
  (1 + SNR(t)) regression weight is a constant for a one-step student (its only step is t = T) and drops out.
- Semantic gradient predictor (training/methods/sferd_nets.py): x_out = draft + k g_phi(draft, E(x0), c); the
  encoder E sees the teacher's clean sample during training; a tiny latent diffusion model learns E's latents
  (EDM denoising loss, conditioned on the draft) and replaces E at sampling.
Losses per step: L1(x_out, x0) + L1(draft, x0) + the latent model's EDM loss. The best held-out L1 of the full
student (latents from the latent model, as exported) selects the shipped checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onestep.config import OptimConfig
from training.methods.attention_guidance import AttentionGuidedDenoiser
from training.methods.common import edm_sigma, edm_weight
from training.methods.denoising_student import DenoisingStudent, DenoisingStudentConfig
from training.methods.sferd_nets import SFERDGenerator, sferd_spec


@dataclass(frozen=True)
class SFERDConfig:
    cache_dir: str = "runs/pairs-sferd"
    n_pairs: int = 10_000
    holdout: int = 500
    teacher_sampler: str = "euler"
    teacher_steps: int = 8
    guidance: float = 0.2  # w; 0 = no attention guidance (ablation)
    blur_sigma: float = 1.0  # Gaussian blur inside the mask, pixels at 32x32
    latent_dim: int = 16
    latent_steps: int = 4  # Euler steps of the latent model, unrolled in the exported graph
    latent_sigma_max: float = 20.0
    latent_sigma_min: float = 0.02
    grad_scale: float = 1.0  # k: the schedule coefficient at t = T
    width: int = 32  # gradient predictor width
    draft_weight: float = 1.0
    latent_weight: float = 1.0
    loss: str = "l1"
    sigma_g: float | None = None
    cache_batch: int = 250
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.9, 0.98), warmup_steps=100))


class SFERD(DenoisingStudent):
    name = "sferd"

    def __init__(self, cfg: SFERDConfig, teacher):
        super().__init__(DenoisingStudentConfig.like(cfg), teacher)
        self.cfg = cfg
        draft = self.trainable["generator"]
        gen = SFERDGenerator(draft, self.image_shape, cfg.latent_dim, cfg.latent_steps, cfg.latent_sigma_max,
                             cfg.latent_sigma_min, cfg.grad_scale, cfg.width)
        gen.spec = sferd_spec(draft.spec, self.image_shape, cfg.latent_dim, cfg.latent_steps, cfg.latent_sigma_max,
                              cfg.latent_sigma_min, cfg.grad_scale, cfg.width)
        self.trainable["generator"] = gen
        if cfg.guidance:
            self.guided_teacher = AttentionGuidedDenoiser(self.teacher, cfg.guidance, cfg.blur_sigma)
            self.teacher_sha = f"{self.teacher_sha}+attention-guidance(w={cfg.guidance},blur={cfg.blur_sigma})"
        else:
            self.guided_teacher = self.teacher

    def cache_teacher(self):
        return self.guided_teacher

    def step(self, batch, it, phase):
        g: SFERDGenerator = self.trainable["generator"]
        z, x0, labels = batch["z"], batch["x0"], batch["labels"]
        draft = g.generator(z, labels)
        s_enc = g.encoder(x0)
        out = g.refine(draft, s_enc, labels)
        dist = (lambda d: d.abs()) if self.cfg.loss == "l1" else (lambda d: d**2)
        rec = dist(out - x0).flatten(1).mean(1).mean()
        rec_draft = dist(draft - x0).flatten(1).mean(1).mean()
        # latent model: EDM denoising loss on the encoder's latents (stop-gradient), conditioned on the draft
        s0 = s_enc.detach()
        sigma = edm_sigma(len(s0), s0.device)
        s_t = s0 + torch.randn_like(s0) * sigma[:, None]
        lat = (edm_weight(sigma[:, None], 1.0) * (g.latent(s_t, sigma, draft.detach(), labels) - s0) ** 2)
        lat = lat.mean(1).mean()
        loss = rec + self.cfg.draft_weight * rec_draft + self.cfg.latent_weight * lat
        return {"loss": loss, "rec": rec, "draft": rec_draft, "latent_dsm": lat}

