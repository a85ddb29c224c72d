"""What a method is: a small class that builds its nets, computes one step's named losses, and says which
optimizers step at an iteration. The generic `Trainer` owns everything else."""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import torch
from torch import nn

from onestep.config import OptimConfig


class Method(nn.Module, abc.ABC):
    """Subclasses set `name`, build trainable nets into `self.trainable` (an nn.ModuleDict keyed by optimizer
    name) and frozen nets as plain attributes with requires_grad False, and implement `step`."""

    name: str = "method"
    ema_names: tuple[str, ...] = ()  # trainable nets whose EMA the trainer keeps (and exports)
    export_name: str = ""  # the net that is the product of training (the one-step generator or the teacher)

    def __init__(self):
        super().__init__()
        self.trainable = nn.ModuleDict()
        self.data = None  # onestep.data.ImageSet when the method uses real images

    # --- what the trainer asks -------------------------------------------------------------------------
    @abc.abstractmethod
    def optim_config(self, name: str) -> OptimConfig:
        """Optimizer settings for trainable net `name`."""

    def phases(self, it: int) -> list[str]:
        """Which optimizers step at iteration `it`, in order. Default: all, every iteration."""
        return list(self.trainable.keys())

    def ema_age(self, it: int) -> int:
        """Iterations since the averages of the EMA nets last started afresh: the age their EMAs warm up with.
        Default `it` (one average over the whole run). A method whose product changes what it is mid-run (Adv-KD's
        stages: a head that was left at its random initialisation starts to train) restarts it there, so that the
        average holds no weights from before the change."""
        return it

    @abc.abstractmethod
    def step(self, batch: dict[str, Any], it: int, phase: str) -> dict[str, torch.Tensor]:
        """Named scalar losses for `phase`; the trainer back-propagates losses['loss']."""

    def get_batch(self, gen: torch.Generator, n: int, device: torch.device) -> dict[str, Any]:
        """Default batch: n real images in [-1, 1] with labels when the method has data, else labels only."""
        out: dict[str, Any] = {"n": n}
        num_classes = getattr(self, "num_classes", 0)
        if self.data is not None:
            idx = torch.randint(0, len(self.data), (n,), generator=gen).numpy()
            x = torch.from_numpy(self.data.images[idx]).to(device=device, dtype=torch.float32) / 127.5 - 1
            out["x"] = x
            out["labels"] = (torch.from_numpy(self.data.labels[idx]).to(device)
                             if self.data.labels is not None and num_classes else None)
        else:
            out["labels"] = torch.randint(0, num_classes, (n,), generator=gen).to(device) if num_classes else None
        return out

    @abc.abstractmethod
    def sample(self, net: nn.Module, z: torch.Tensor, labels) -> torch.Tensor:
        """Images in [-1, 1] from the exported net (`export_name`, EMA weights) for grids and metrics."""

    def export_spec(self) -> dict:
        """The model spec of `export_name` (see onestep.checkpoint.build_model)."""
        return self.trainable[self.export_name].spec

    def config_dict(self) -> dict:
        return {}

    # helpers
    @staticmethod
    def frozen_copy(module: nn.Module) -> nn.Module:
        import copy

        m = copy.deepcopy(module)
        m.requires_grad_(False).eval()
        return m

    @staticmethod
    def trainable_copy(module: nn.Module) -> nn.Module:
        import copy

        m = copy.deepcopy(module)
        m.requires_grad_(True).train()
        if hasattr(module, "spec"):
            m.spec = module.spec
        return m


def seeds_for_grid(n: int, num_classes: int, shape, seed0: int = 0):
    """Fixed noise and labels for sample grids (class k in column k)."""
    from onestep.noise import seeded_noise

    z = torch.from_numpy(seeded_noise(range(seed0, seed0 + n), shape))
    labels = torch.from_numpy(np.arange(n) % num_classes) if num_classes else None
    return z, labels
