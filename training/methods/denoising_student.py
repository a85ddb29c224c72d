"""Denoising Student (Luhman & Luhman 2021, arXiv 2101.02388): offline knowledge distillation.

Sample (z, x0 = teacher_sampler(z)) pairs once into a sharded, resumable cache, then regress the student's
one-step output onto them (Eq. 11): L = E || G(z, c) - x0(z, c) ||, L1 for CIFAR-10 and L2 elsewhere in the paper.
The student starts as the teacher evaluated at the level its sampler starts from, G(z) = D(sigma_0 z, sigma_0)
(sigma_0 = the first sigma of the teacher's schedule, sigma_max on a Karras grid). The held-out loss of the EMA
student selects the checkpoint that is shipped (the paper keeps the EMA with the lowest test loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from onestep.config import OptimConfig
from training.methods.common import GeneratorMethod
from training.pair_cache import PairCacheConfig, teacher_sigmas


@dataclass(frozen=True)
class DenoisingStudentConfig(PairCacheConfig):
    loss: str = "l1"  # l1 (paper, CIFAR-10) | l2 (paper, CelebA / LSUN)
    sigma_g: float | None = None  # None = the first sigma of the teacher's sampling schedule (its x_T)
    # Adam (0.9, 0.98), lr 2e-4, linear warm-up over 5k steps (the paper's CIFAR-10 settings)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.9, 0.98), warmup_steps=5000))


class DenoisingStudent(GeneratorMethod):
    name = "denoising-student"

    def __init__(self, cfg: DenoisingStudentConfig, teacher):
        if getattr(cfg, "loss", "l1") not in ("l1", "l2"):
            raise ValueError("loss must be l1 or l2")
        sigma_g = getattr(cfg, "sigma_g", None) or float(teacher_sigmas(teacher, cfg.teacher_schedule,
                                                                          cfg.teacher_steps)[0])
        super().__init__(cfg, teacher, sigma_g)
        self.teacher_sha = getattr(teacher, "source_sha256", None) or "unknown"
        self.pairs = self.holdout = None

    def prepare(self, rank: int = 0) -> None:
        """Build (or finish) the pair cache, then load it. Only rank 0 builds; all ranks load."""
        from training.pair_cache import build_pair_cache, load_pair_cache

        if rank == 0:
            build_pair_cache(self.cache_teacher(), self.teacher_sha, self.cfg.cache_dir, self.cfg.n_pairs,
                             self.cfg.teacher_sampler, self.cfg.teacher_steps, batch=self.cfg.cache_batch,
                             snapshots=tuple(getattr(self.cfg, "snapshots", ())), schedule=self.cfg.teacher_schedule)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        train, hold = load_pair_cache(self.cfg.cache_dir, self.cfg.holdout)
        train = {k: v[: self.cfg.n_pairs - self.cfg.holdout] for k, v in train.items()}
        self.pairs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in train.items()}
        self.holdout = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hold.items()} if hold else None

    def cache_teacher(self):
        """The denoiser whose sampler makes the targets (SFERD: the attention-guided teacher)."""
        return self.teacher

    def optim_config(self, name):
        return self.cfg.optim

    def get_batch(self, gen, n, device):
        idx = torch.randint(0, len(self.pairs["z"]), (n,), generator=gen)
        batch = {k: v[idx].float().to(device) for k, v in self.pairs.items() if k not in ("labels", "seeds")}
        batch["labels"] = self.pairs["labels"][idx].to(device) if "labels" in self.pairs else None
        batch["n"] = n
        return batch

    def _loss(self, net, z, x0, labels):
        d = net(z, labels) - x0
        return (d.abs() if self.cfg.loss == "l1" else d**2).flatten(1).mean(1)

    def step(self, batch, it, phase):
        return {"loss": self._loss(self.trainable["generator"], batch["z"], batch["x0"], batch["labels"]).mean()}

    @torch.no_grad()
    def validation_loss(self, net) -> float:
        if self.holdout is None:
            return float("nan")
        dev = next(net.parameters()).device
        tot, n = 0.0, 0
        for i in range(0, len(self.holdout["z"]), 250):
            sl = slice(i, i + 250)
            lab = self.holdout["labels"][sl].to(dev) if "labels" in self.holdout else None
            tot += float(self._loss(net, self.holdout["z"][sl].float().to(dev), self.holdout["x0"][sl].float().to(dev),
                                    lab).sum())
            n += len(self.holdout["z"][sl])
        return tot / n
