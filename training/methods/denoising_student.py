"""Denoising Student (Luhman & Luhman 2021, arXiv 2101.02388): offline knowledge distillation.

Sample (z, x0 = teacher_sampler(z)) pairs once into a sharded, resumable cache, then regress the student's
one-step output onto them: L = E || G(z, c) - x0(z, c) ||_1 (L1 as for CIFAR-10 in the paper; L2 optional).
The student starts as the teacher conditioned at the highest noise level: G(z) = D(sigma_max z, sigma_max).
The held-out loss of the EMA student selects the checkpoint that is shipped (the paper keeps the best one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from onestep.config import OptimConfig
from training.methods.common import GeneratorMethod


@dataclass(frozen=True)
class DenoisingStudentConfig:
    cache_dir: str = "runs/pair-cache"
    n_pairs: int = 10_000
    holdout: int = 500
    teacher_sampler: str = "heun"
    teacher_steps: int = 18  # 35 NFE: the teacher's best setting on our quality table
    loss: str = "l1"  # l1 (paper, CIFAR-10) | l2
    sigma_g: float | None = None  # None = the teacher's sigma_max (paper)
    cache_batch: int = 250
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, betas=(0.9, 0.98), warmup_steps=100))

    @classmethod
    def like(cls, cfg) -> "DenoisingStudentConfig":
        """The pair-cache and regression settings of another offline method's config (same field names)."""
        import dataclasses

        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})


class DenoisingStudent(GeneratorMethod):
    name = "denoising-student"

    def __init__(self, cfg: DenoisingStudentConfig, teacher):
        if cfg.loss not in ("l1", "l2"):
            raise ValueError("loss must be l1 or l2")
        super().__init__(cfg, teacher, cfg.sigma_g or float(teacher.sigma_max))
        self.teacher_sha = getattr(teacher, "source_sha256", None) or "unknown"
        self.pairs = self.holdout = None

    def prepare(self, rank: int = 0) -> None:
        """Build (or finish) the pair cache, then load it. Only rank 0 builds; all ranks load."""
        from training.pair_cache import build_pair_cache, load_pair_cache

        if rank == 0:
            build_pair_cache(self.cache_teacher(), self.teacher_sha, self.cfg.cache_dir, self.cfg.n_pairs,
                             self.cfg.teacher_sampler, self.cfg.teacher_steps, batch=self.cfg.cache_batch,
                             snapshots=tuple(getattr(self.cfg, "snapshots", ())))
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
