"""Adv-KD (Adversarial Knowledge Distillation, arXiv 2405.20675), implemented from the paper.

Offline like Denoising Student: teacher trajectories are sampled once into the sharded, resumable pair cache,
with snapshots of the sampler state at the sigmas in `snapshots` (stored VP-scaled, x / sqrt(1 + sigma^2)).
A small randomly initialised StagedGenerator (training/methods/advkd_nets.py) has one head per snapshot plus a
final head for the teacher's sample. Training is stage-wise: during stage k
- generator: sum_{j <= k} L1(head_j(z), target_j) + lambda_adv * softplus(-D(head_k(z), z))   (non-saturating)
- discriminator: softplus(-D(target_k, z)) + softplus(D(head_k(z), z)) + gamma/2 * ||grad_x D(target_k, z)||^2
  (R1 gradient penalty on real samples), where D is conditioned on the down-sampled starting noise z, the
  label and the stage. The final head is the one-step student; held-out L1 to the teacher selects the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from onestep.config import OptimConfig
from training.methods.advkd_nets import NoiseConditionedDiscriminator, StagedGenerator, staged_spec
from training.methods.denoising_student import DenoisingStudent, DenoisingStudentConfig


@dataclass(frozen=True)
class AdvKDConfig:
    cache_dir: str = "runs/pairs-advkd"
    n_pairs: int = 10_000
    holdout: int = 500
    teacher_sampler: str = "euler"
    teacher_steps: int = 8
    snapshots: tuple[float, ...] = (10.0, 2.0, 0.5)  # one generator stage per snapshot, then the final sample
    width: int = 32  # student size (the ablation knob)
    disc_width: int = 32
    stage_steps: tuple[int, ...] = (100, 100, 150, 450)  # iterations per stage; the last stage runs to the end
    lambda_adv: float = 0.05
    r1_gamma: float = 1.0
    loss: str = "l1"
    cache_batch: int = 250
    optim_generator: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, betas=(0.5, 0.99),
                                                                               warmup_steps=50))
    optim_disc: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, betas=(0.5, 0.99)))


class AdvKD(DenoisingStudent):
    name = "adv-kd"

    def __init__(self, cfg: AdvKDConfig, teacher):
        if len(cfg.stage_steps) != len(cfg.snapshots) + 1:
            raise ValueError(f"stage_steps needs {len(cfg.snapshots) + 1} entries (one per snapshot + the final "
                             f"sample), got {len(cfg.stage_steps)}")
        if len(cfg.snapshots) != len(StagedGenerator.resolutions) - 1:
            raise ValueError(f"the staged generator has {len(StagedGenerator.resolutions) - 1} snapshot heads")
        super().__init__(DenoisingStudentConfig.like(cfg), teacher)
        self.cfg = cfg
        gen = StagedGenerator(self.image_shape, cfg.width, self.num_classes)
        gen.spec = staged_spec(self.image_shape, cfg.width, self.num_classes)
        self.trainable["generator"] = gen
        self.trainable["disc"] = NoiseConditionedDiscriminator(self.image_shape, cfg.disc_width, self.num_classes,
                                                               len(cfg.stage_steps))

    def optim_config(self, name):
        return self.cfg.optim_generator if name == "generator" else self.cfg.optim_disc

    def phases(self, it):
        return ["disc", "generator"]

    def stage(self, it: int) -> int:
        edge = 0
        for k, n in enumerate(self.cfg.stage_steps):
            edge += n
            if it < edge:
                return k
        return len(self.cfg.stage_steps) - 1

    def targets(self, batch) -> list[torch.Tensor]:
        """Per-stage targets: snapshot k pooled to head k's resolution, then the teacher's sample."""
        out = []
        for k, res in enumerate(StagedGenerator.resolutions[:-1]):
            out.append(F.adaptive_avg_pool2d(batch["snapshots"][:, k], res))
        return out + [batch["x0"]]

    def step(self, batch, it, phase):
        k = self.stage(it)
        z, labels = batch["z"], batch["labels"]
        targets = self.targets(batch)
        g, d = self.trainable["generator"], self.trainable["disc"]
        if phase == "disc":
            with torch.no_grad():
                fake = g.forward_stages(z, labels, upto=k)[k]
            real = targets[k].detach().requires_grad_(True)
            l_real, l_fake = d(real, z, k, labels), d(fake, z, k, labels)
            (grad,) = torch.autograd.grad(l_real.sum(), real, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
            d_loss = F.softplus(-l_real).mean() + F.softplus(l_fake).mean()
            return {"loss": d_loss + 0.5 * self.cfg.r1_gamma * r1, "d_loss": d_loss, "r1": r1,
                    "real_acc": (l_real > 0).float().mean(), "fake_acc": (l_fake < 0).float().mean()}
        outs = g.forward_stages(z, labels, upto=k)
        dist = (lambda e: e.abs()) if self.cfg.loss == "l1" else (lambda e: e**2)
        recs = [dist(o - t).flatten(1).mean(1).mean() for o, t in zip(outs, targets)]
        adv = F.softplus(-d(outs[k], z, k, labels)).mean()
        losses = {"loss": sum(recs) + self.cfg.lambda_adv * adv, "adv": adv, "stage": torch.tensor(float(k))}
        losses.update({f"rec{j}": r for j, r in enumerate(recs)})
        return losses
