"""Data parallelism: two gloo processes under DistributedDataParallel reach the weights of one process that
sees the union of their batches (the doubled batch), for a method with two phases, a net called twice in one
step, a parameter that never gets a gradient, and gradient accumulation."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from onestep.config import OptimConfig, TrainConfig
from training.methods.base import Method
from training.trainer import Trainer

STEPS = 4
MICRO = 4  # samples per rank per micro-batch


class TwoPhase(Method):
    """Deterministic: the global batch of call k is a fixed function of k; each rank takes its slice."""

    name = "two-phase-test"
    ema_names = ("a",)
    export_name = "a"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trainable["a"] = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
        self.trainable["b"] = nn.Linear(3, 1)
        self.trainable["a"].register_parameter("never_used", nn.Parameter(torch.ones(2)))
        self.data = None
        self.calls = 0

    def optim_config(self, name):
        return OptimConfig(lr=1e-2)

    def get_batch(self, gen, n, device):
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        x = torch.randn(n * world, 3, generator=g)
        return {"x": x[rank * n:(rank + 1) * n], "n": n}

    def step(self, batch, it, phase):
        a, b = self.trainable["a"], self.trainable["b"]
        x = batch["x"]
        if phase == "a":  # `a` twice in one graph, `b` frozen inside it
            y = a(a(x))
            return {"loss": ((y - x.flip(1)) ** 2).mean() + b(y).pow(2).mean()}
        return {"loss": (b(x) - x.sum(1, keepdim=True)).pow(2).mean()}

    def sample(self, net, z, labels):
        return net(z)


def _train(grad_accum: int, tmp: str) -> dict[str, torch.Tensor]:
    method = TwoPhase()
    cfg = TrainConfig(steps=STEPS, batch_size=MICRO * 2 * grad_accum, grad_accum=grad_accum,
                      ema_decay=0.5, clip_grad_norm=None, log_every=0, ckpt_every=0, sample_every=0, num_threads=1)
    trainer = Trainer(method, cfg, tmp, device="cpu", progress=False)
    for _ in range(STEPS):
        trainer.train_step()
    if dist.is_initialized():  # every phase went through DistributedDataParallel, not a hand-made all-reduce
        from torch.nn.parallel import DistributedDataParallel

        assert sorted(trainer._ddp) == ["a", "b"]
        assert all(isinstance(m, DistributedDataParallel) for m in trainer._ddp.values())
    return {k: v.detach().clone() for k, v in method.trainable.state_dict().items()}


def _worker(rank: int, world: int, port: int, grad_accum: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        weights = _train(grad_accum, os.path.join(tmp, f"run{rank}"))
        if rank == 0:
            torch.save(weights, os.path.join(tmp, "ddp.pt"))  # test-only scratch file
    finally:
        if dist.is_initialized():
            # both ranks leave together: a rank tearing gloo down while the other still runs a collective
            # aborts it ("terminate called without an active exception"); bounded, so a failed rank cannot hang it
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_gloo_ranks_match_one_process_with_the_doubled_batch(tmp_path, grad_accum):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), grad_accum, str(tmp_path)), nprocs=world, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    # one process, global batch = 2 ranks x MICRO per micro-batch, same data
    single = _train_single(grad_accum, tmp_path)
    start = TwoPhase().trainable.state_dict()
    assert set(ddp) == set(single)
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6, msg=k)
    assert torch.equal(ddp["a.never_used"], start["a.never_used"])  # no gradient anywhere: Adam leaves it
    assert not torch.allclose(ddp["a.0.weight"], start["a.0.weight"])  # training moved the rest


def _train_single(grad_accum: int, tmp_path) -> dict[str, torch.Tensor]:
    """The single-process reference sees, per micro-batch, the concatenation of both ranks' slices."""

    class Doubled(TwoPhase):
        def get_batch(self, gen, n, device):
            g = torch.Generator().manual_seed(1000 + self.calls)
            self.calls += 1
            return {"x": torch.randn(n, 3, generator=g), "n": n}

    method = Doubled()
    cfg = TrainConfig(steps=STEPS, batch_size=MICRO * 2 * grad_accum, grad_accum=grad_accum, ema_decay=0.5,
                      clip_grad_norm=None, log_every=0, ckpt_every=0, sample_every=0, num_threads=1)
    trainer = Trainer(method, cfg, tmp_path / "single", device="cpu", progress=False)
    for _ in range(STEPS):
        trainer.train_step()
    return {k: v.detach().clone() for k, v in method.trainable.state_dict().items()}
