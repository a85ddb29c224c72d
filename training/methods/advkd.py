"""Adv-KD (Adversarial Knowledge Distillation for Faster Diffusion Sampling, Mekonnen et al., arXiv 2405.20675).

Offline like Denoising Student: teacher trajectories are sampled once into the sharded, resumable pair cache,
with snapshots of the sampler state at the sigmas in `snapshots` (stored VP-scaled, x / sqrt(1 + sigma^2)).
A small randomly initialised StagedGenerator (training/methods/advkd_nets.py) has one block + head per snapshot
plus a final one for the teacher's sample. Training goes stage by stage; stage k has its OWN discriminator D_k,
conditioned on the starting noise z, and trains only block k and head k (earlier stages are frozen):
- discriminator: softplus(-D_k(y_k, z)) + softplus(D_k(G_k(z), z)) + lambda_gp * E[(||grad_x D_k(x_hat, z)|| - 1)^2],
  x_hat a random interpolate of real y_k and fake G_k(z) (gradient penalty), then weights clipped to +-0.1;
- generator: softplus(-D_k(G_k(z), z)) (non-saturating), optionally + lambda_rec * ||G_k(z) - y_k||_1.
Here y_k is teacher snapshot k at head k's resolution (the teacher's sample for the last stage), clamped to
[-1, 1]. The final head is the one-step student; held-out L1 to the teacher selects the shipped checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from onestep.config import OptimConfig
from training.methods.advkd_nets import NoiseConditionedDiscriminator, StagedGenerator, staged_spec
from training.methods.denoising_student import DenoisingStudent
from training.pair_cache import PairCacheConfig


@dataclass(frozen=True)
class AdvKDConfig(PairCacheConfig):
    cache_dir: str = "runs/pairs-advkd"
    teacher_sampler: str = "euler"
    teacher_steps: int = 8
    teacher_schedule: str = "karras"
    snapshots: tuple[float, ...] = (10.0, 2.0, 0.5)  # one generator stage per snapshot, then the final sample
    width: int = 32  # student size (the ablation knob)
    disc_width: int = 32
    stage_steps: tuple[int, ...] = (100, 100, 150, 450)  # iterations per stage; the last stage runs to the end
    freeze_earlier_stages: bool = True  # False: blocks of earlier stages keep training (the reference code)
    noise_at_every_stage: bool = True  # z pooled to every block's resolution; False: only at the first block
    tanh_heads: bool = True  # heads end in tanh, targets clamped to [-1, 1]
    lambda_adv: float = 1.0
    lambda_rec: float = 0.0  # reconstruction weight on stage k's head; 0 = purely adversarial (the paper)
    penalty: str = "wgan-gp"  # wgan-gp | r1 | none
    gp_weight: float = 10.0
    disc_weight_clip: float | None = 0.1  # discriminator weights clamped to +-c after each update; None = off
    noise_pool: int = 4  # the discriminator sees z pooled to noise_pool x noise_pool
    loss: str = "l1"  # distance of the reconstruction term and of the held-out selection
    optim_generator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.999)))
    optim_disc: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.999)))


class AdvKD(DenoisingStudent):
    name = "adv-kd"

    def __init__(self, cfg: AdvKDConfig, teacher):
        n_stages = len(cfg.snapshots) + 1
        if len(cfg.stage_steps) != n_stages:
            raise ValueError(f"stage_steps needs {n_stages} entries (one per snapshot + the final sample), got "
                             f"{len(cfg.stage_steps)}")
        if cfg.penalty not in ("wgan-gp", "r1", "none"):
            raise ValueError("penalty must be wgan-gp, r1 or none")
        super().__init__(cfg, teacher)
        gen = StagedGenerator(self.image_shape, cfg.width, self.num_classes, n_stages, cfg.noise_at_every_stage,
                              cfg.tanh_heads)
        gen.spec = staged_spec(self.image_shape, cfg.width, self.num_classes, n_stages, cfg.noise_at_every_stage,
                               cfg.tanh_heads)
        self.trainable["generator"] = gen
        c = self.image_shape[0]
        for k, r in enumerate(gen.resolutions):
            self.trainable[f"disc{k}"] = NoiseConditionedDiscriminator((c, r, r), cfg.disc_width, self.num_classes,
                                                                       cfg.noise_pool)

    def optim_config(self, name):
        return self.cfg.optim_generator if name == "generator" else self.cfg.optim_disc

    def phases(self, it):
        return [f"disc{self.stage(it)}", "generator"]

    def stage(self, it: int) -> int:
        return self._stage_and_start(it)[0]

    def _stage_and_start(self, it: int) -> tuple[int, int]:
        edge = 0
        for k, n in enumerate(self.cfg.stage_steps):
            if it < edge + n:
                return k, edge
            edge += n
        return len(self.cfg.stage_steps) - 1, edge - self.cfg.stage_steps[-1]

    def ema_age(self, it: int) -> int:
        """The generator's EMA restarts with every stage: stage k trains block k and head k from their random
        initialisation on top of the LIVE earlier blocks, so an average carried over from earlier stages would
        mix in the untrained head (with decay 0.999, 63% of it is still there 457 iterations into the last
        stage) and EMA versions of the blocks the head was not trained on."""
        return it - self._stage_and_start(it)[1]

    def target(self, batch, k: int) -> torch.Tensor:
        """Stage k's real sample: snapshot k pooled to head k's resolution, or the teacher's sample."""
        g = self.trainable["generator"]
        if k == g.n_stages - 1:
            y = batch["x0"]
        else:
            y = F.adaptive_avg_pool2d(batch["snapshots"][:, k], g.resolutions[k])
        return y.clamp(-1, 1) if self.cfg.tanh_heads else y

    def _fake(self, z, labels, k):
        frozen = k if self.cfg.freeze_earlier_stages else 0
        return self.trainable["generator"].stage_output(z, labels, k, frozen_below=frozen)

    @torch.no_grad()
    def _clip(self, d):
        if self.cfg.disc_weight_clip:
            for p in d.parameters():
                p.clamp_(-self.cfg.disc_weight_clip, self.cfg.disc_weight_clip)

    def step(self, batch, it, phase):
        k = self.stage(it)
        z, labels = batch["z"], batch["labels"]
        d = self.trainable[f"disc{k}"]
        # weight clipping after every discriminator update (applied before its next use)
        self._clip(d)
        real = self.target(batch, k)
        if phase.startswith("disc"):
            with torch.no_grad():
                fake = self._fake(z, labels, k)
            l_real, l_fake = d(real, z, labels), d(fake, z, labels)
            d_loss = F.softplus(-l_real).mean() + F.softplus(l_fake).mean()
            pen = torch.zeros((), device=z.device)
            if self.cfg.penalty == "wgan-gp":  # Gulrajani et al. 2017, Eq. 3
                a = torch.rand(len(z), 1, 1, 1, device=z.device)
                x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
                (grad,) = torch.autograd.grad(d(x_hat, z, labels).sum(), x_hat, create_graph=True)
                pen = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
            elif self.cfg.penalty == "r1":  # Mescheder et al. 2018, Eq. 9
                x = real.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(d(x, z, labels).sum(), x, create_graph=True)
                pen = 0.5 * grad.pow(2).flatten(1).sum(1).mean()
            return {"loss": d_loss + self.cfg.gp_weight * pen, "d_loss": d_loss, "penalty": pen,
                    "real_acc": (l_real > 0).float().mean(), "fake_acc": (l_fake < 0).float().mean()}
        fake = self._fake(z, labels, k)
        adv = F.softplus(-d(fake, z, labels)).mean()
        e = fake - real
        rec = (e.abs() if self.cfg.loss == "l1" else e**2).flatten(1).mean(1).mean()
        loss = self.cfg.lambda_adv * adv + (self.cfg.lambda_rec * rec if self.cfg.lambda_rec else 0.0)
        return {"loss": loss, "adv": adv, "rec": rec.detach(), "stage": torch.tensor(float(k))}
