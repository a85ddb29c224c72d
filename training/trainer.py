"""The generic trainer: one loop for teacher training and every distillation method.

It owns: optimizers and warm-up, EMA, gradient clipping, NaN/Inf guards, mixed precision on GPU, gradient
accumulation, data parallelism under torchrun (DistributedDataParallel per phase, gloo or nccl), atomic
checkpoints and resume, progress bar, CSV logging, periodic sample grids and a periodic metric.
A method (training/methods/) only builds nets and returns named losses for a phase.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from onestep.checkpoint import CheckpointError, save_model
from onestep.config import TrainConfig, learning_rate, to_dict
from onestep.data import to_uint8
from onestep.images import save_grid
from onestep.provenance import atomic_write_json, stamp
from training.methods.base import Method, seeds_for_grid

STATE_PREFIX = "state-"


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _dist_info()


def config_diff(old: Any, new: Any, prefix: str = "") -> dict[str, list]:
    """Flat {dotted.key: [old, new]} of the leaves that differ between two JSON-like configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, list] = {}
        for k in sorted(set(old) | set(new), key=str):
            out.update(config_diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k)))
        return out
    norm = lambda v: json.loads(json.dumps(v))  # tuples and lists compare alike
    return {} if norm(old) == norm(new) else {prefix: [old, new]}


def power_ema_gamma(sigma_rel: float) -> float:
    """Exponent gamma of the power-function EMA with relative standard deviation sigma_rel (Karras et al. 2024,
    EDM2, Eq. 3: sigma_rel^2 = (gamma+1) / ((gamma+2)^2 (gamma+3))); solved by bisection (monotone in gamma)."""
    if not 0 < sigma_rel < 0.28:  # gamma -> 0 gives sigma_rel = sqrt(1/12) ~ 0.2887
        raise ValueError(f"sigma_rel must lie in (0, 0.28), got {sigma_rel}")
    lo, hi = 0.0, 1e6
    for _ in range(200):
        g = 0.5 * (lo + hi)
        if (g + 1) / ((g + 2) ** 2 * (g + 3)) > sigma_rel ** 2:
            lo = g
        else:
            hi = g
    return 0.5 * (lo + hi)


class EMA:
    """Exponential moving average of a net's parameters (buffers copied).

    Classic form: decay d with warm-up min(d, (1+it)/(10+it)). Power-function form (`sigma_rel` given): decay
    (1 - 1/t)^(gamma+1) at iteration t (EDM2, Eq. 2), whose averaging length is a fixed fraction of the
    training so far; unlike the classic form, different lengths differ from the first iterations on."""

    def __init__(self, net: torch.nn.Module, decay: float = 0.0, sigma_rel: float | None = None):
        self.net = copy.deepcopy(net).requires_grad_(False).eval()
        if hasattr(net, "spec"):
            self.net.spec = net.spec
        self.decay = decay
        self.gamma = None if sigma_rel is None else power_ema_gamma(sigma_rel)

    def beta(self, it: int) -> float:
        if self.gamma is not None:
            return (1 - 1 / (it + 1)) ** (self.gamma + 1)
        return min(self.decay, (1 + it) / (10 + it))

    @torch.no_grad()
    def update(self, net: torch.nn.Module, it: int) -> None:
        d = self.beta(it)
        for pe, p in zip(self.net.parameters(), net.parameters()):
            pe.lerp_(p.detach(), 1 - d)
        for be, b in zip(self.net.buffers(), net.buffers()):
            be.copy_(b)


class _PhaseStep(torch.nn.Module):
    """One phase's losses as a module whose parameters are that phase's net (what DDP wraps)."""

    def __init__(self, method: Method, phase: str):
        super().__init__()
        self.net = method.trainable[phase]
        self.phase = phase
        object.__setattr__(self, "method", method)  # not a submodule: DDP must see only the phase net

    def forward(self, batch: dict[str, Any], it: int) -> dict[str, torch.Tensor]:
        return self.method.step(batch, it, self.phase)


EXPORT_DTYPES = {"fp32": None, "fp16": torch.float16}


class Trainer:
    def __init__(self, method: Method, cfg: TrainConfig, run_dir: str | os.PathLike, device: str = "auto",
                 run_config: dict | None = None, metric_fn: Callable[[np.ndarray, np.ndarray | None], dict] | None = None,
                 progress: bool = True):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.rank, self.world = init_distributed(self.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype {cfg.export_dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(f"batch_size {cfg.batch_size} must divide by world_size*grad_accum "
                             f"= {self.world * cfg.grad_accum}")
        self.cfg = cfg
        self.method = method.to(self.device)
        self.run_dir = Path(run_dir)
        self.run_config = run_config or {}
        self.metric_fn = metric_fn
        self.progress = progress and self.rank == 0
        self.micro_batch = cfg.batch_size // (self.world * cfg.grad_accum)
        self.optims = {name: self._make_optim(name) for name in method.trainable.keys()}
        self.emas = {name: EMA(method.trainable[name], cfg.ema_decay) for name in method.ema_names}
        # keyed 'name@decay' / 'name@std<sigma_rel>'; only the export net gets the extra lengths
        self.extra_emas = {}
        if method.export_name in method.trainable:
            export_net = method.trainable[method.export_name]
            self.extra_emas.update({f"{method.export_name}@{d:g}": EMA(export_net, d) for d in cfg.extra_ema_decays})
            self.extra_emas.update({f"{method.export_name}@std{s:g}": EMA(export_net, sigma_rel=s)
                                    for s in cfg.extra_ema_sigma_rels})
        self.it = 0
        self.nan_skips = 0
        self.best_val = float("inf")
        self.data_gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        torch.manual_seed(cfg.seed * 1000 + self.rank)
        self._stop = False
        amp = cfg.amp if cfg.amp != "auto" else ("bf16" if self.device.type == "cuda" else "off")
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self._ddp: dict[str, torch.nn.Module] = {}
        if self.world > 1:  # every rank starts from rank 0's weights
            for p in self.method.state_dict().values():
                dist.broadcast(p.data if hasattr(p, "data") else p, 0)

    def device_info(self) -> dict:
        """What the iterations ran on (budgets are quoted per device), and how many processes shared it."""
        info = {"type": self.device.type, "world_size": self.world}
        if self.device.type == "cuda":
            info["name"] = torch.cuda.get_device_name(self.device)
        else:
            info["threads"] = torch.get_num_threads()
        return info

    # --- optimisation ------------------------------------------------------------------------------------
    def _make_optim(self, name: str) -> torch.optim.Optimizer:
        oc = self.method.optim_config(name)
        return torch.optim.Adam(self.method.trainable[name].parameters(), lr=oc.lr, betas=tuple(oc.betas),
                                eps=oc.eps, weight_decay=oc.weight_decay)

    def _lr(self, name: str) -> float:
        return learning_rate(self.method.optim_config(name), self.it, self.cfg.steps)

    def _set_trainable(self, phase: str) -> None:
        for name, net in self.method.trainable.items():
            net.requires_grad_(name == phase)

    def _phase_module(self, phase: str) -> torch.nn.Module:
        """What computes `phase`'s losses: the method itself on one process; under torchrun a
        DistributedDataParallel wrapper of the whole step, so that DDP sees one forward per backward whatever
        the method does inside (nets called several times, frozen stages) and all-reduces the phase net's
        gradients in buckets while backward runs."""
        if self.world == 1:
            return _PhaseStep(self.method, phase)
        if phase not in self._ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            # unused parameters: frozen Adv-KD stages, SiDA's discriminator head before the mix-in
            self._ddp[phase] = DDP(_PhaseStep(self.method, phase), device_ids=ids, broadcast_buffers=False,
                                   find_unused_parameters=True)
        return self._ddp[phase]

    def train_step(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        for phase in self.method.phases(self.it):
            opt = self.optims[phase]
            self._set_trainable(phase)
            for o in self.optims.values():
                o.zero_grad(set_to_none=True)
            step_module = self._phase_module(phase)
            finite = True
            agg: dict[str, float] = {}
            for micro in range(self.cfg.grad_accum):
                batch = self.method.get_batch(self.data_gen, self.micro_batch, self.device)
                last = micro == self.cfg.grad_accum - 1
                sync = step_module.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()
                with sync:
                    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                        enabled=self.amp_dtype is not None):
                        losses = step_module(batch, self.it)
                    loss = losses["loss"].float() / self.cfg.grad_accum
                    finite = finite and bool(torch.isfinite(loss))
                    if not finite and self.world == 1:
                        break
                    # under DDP every rank runs every backward (the all-reduce waits for all); a non-finite
                    # loss makes non-finite gradients everywhere and the step is skipped on every rank
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                for k, v in losses.items():
                    agg[f"{phase}/{k}"] = agg.get(f"{phase}/{k}", 0.0) + float(v.detach()) / self.cfg.grad_accum
            # a parameter that got no gradient on any rank (e.g. a frozen earlier stage) keeps grad None, so Adam
            # does not move it on momentum alone
            params = [p for p in self.method.trainable[phase].parameters() if p.grad is not None]
            if self.world > 1:
                flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                finite = bool(flag.item() > 0)
            if finite and self.scaler:
                self.scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm or float("inf")) \
                if (finite and params) else torch.tensor(float("nan") if not finite else 0.0)
            if not finite or not torch.isfinite(grad_norm):
                self.nan_skips += 1
                logs[f"{phase}/skipped"] = 1.0
                for o in self.optims.values():
                    o.zero_grad(set_to_none=True)
                if self.scaler:
                    self.scaler.update()
                if self.nan_skips > self.cfg.max_nan_skips:
                    raise NonFiniteError(f"{self.nan_skips} consecutive non-finite steps at iteration {self.it} "
                                         f"(phase {phase}); the last checkpoint is intact, lower the lr and resume")
                continue
            self.nan_skips = 0
            for g in opt.param_groups:
                g["lr"] = self._lr(phase)
            if self.scaler:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
            logs.update(agg)
            logs[f"{phase}/grad_norm"] = float(grad_norm)
            logs[f"{phase}/lr"] = self._lr(phase)
        age = self.method.ema_age(self.it)  # age 0 restarts the averages (power form: all live; classic: 9/10 live)
        for name, ema in self.emas.items():
            ema.update(self.method.trainable[name], age)
        for key, ema in self.extra_emas.items():
            ema.update(self.method.trainable[key.split("@")[0]], age)
        for net in self.method.trainable.values():
            net.requires_grad_(True)
        self.it += 1
        return logs

    # --- checkpoints -------------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"it": self.it, "optim_groups": {}, "optim_scalars": {},
                                "best_val": self.best_val if math.isfinite(self.best_val) else None}
        for name, net in self.method.trainable.items():
            for k, v in net.state_dict().items():
                tensors[f"net.{name}.{k}"] = v
        for name, ema in {**self.emas, **self.extra_emas}.items():
            for k, v in ema.net.state_dict().items():
                tensors[f"ema.{name}.{k}"] = v
        for name, opt in self.optims.items():
            sd = opt.state_dict()
            meta["optim_groups"][name] = sd["param_groups"]
            for idx, st in sd["state"].items():
                for k, v in st.items():
                    if torch.is_tensor(v):
                        tensors[f"optim.{name}.{idx}.{k}"] = v
                    else:
                        meta["optim_scalars"][f"{name}.{idx}.{k}"] = v
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.data"] = self.data_gen.get_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        extra = self.method.extra_state() if hasattr(self.method, "extra_state") else {}
        meta["method_state"] = extra
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta

    def save_state(self) -> Path | None:
        """Atomic: written to a temporary folder, then renamed. Only rank 0 writes."""
        if self.rank != 0:
            return None
        from safetensors.torch import save_file

        self.validate()
        tensors, meta = self.state_tensors()
        final = self.ckpt_dir / f"{STATE_PREFIX}{self.it:08d}"
        tmp = self.ckpt_dir / f".tmp-{STATE_PREFIX}{self.it:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "state.safetensors"))
        atomic_write_json(tmp / "state.json", {**meta, "run_config": self.run_config, "train": to_dict(self.cfg),
                                               "method": self.method.name, **stamp()})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(self.ckpt_dir.glob(f"{STATE_PREFIX}*"))[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        self.export()
        for key, ema in self.extra_emas.items():
            self.export(self.run_dir / f"model-ema{key.split('@')[1]}.safetensors", net=ema.net)
        return final

    def validate(self) -> None:
        """Methods with a held-out loss: log it and keep the best EMA export as model-best.safetensors."""
        if not hasattr(self.method, "validation_loss"):
            return
        v = float(self.method.validation_loss(self.export_net()))
        self._log({"it": self.it, "val/loss": v})
        if math.isfinite(v) and v < self.best_val:
            self.best_val = v
            self.export(self.run_dir / "model-best.safetensors")

    def latest_state(self) -> Path | None:
        cands = sorted(p for p in self.ckpt_dir.glob(f"{STATE_PREFIX}*") if (p / "state.json").exists())
        return cands[-1] if cands else None

    def load_state(self, path: Path) -> None:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path / "state.safetensors"))
            meta = json.loads((path / "state.json").read_text())
        except Exception as e:
            raise CheckpointError(f"cannot read training state {path}: {e}") from e
        if meta.get("method") != self.method.name:
            raise CheckpointError(f"{path} belongs to method {meta.get('method')!r}, not {self.method.name!r}")

        def sub(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        for name, net in self.method.trainable.items():
            net.load_state_dict(sub(f"net.{name}."))
        for name, ema in self.emas.items():
            ema.net.load_state_dict(sub(f"ema.{name}."))
        for key, ema in self.extra_emas.items():  # a state saved without this length starts it from the weights
            ema.net.load_state_dict(sub(f"ema.{key}.") or sub(f"net.{key.split('@')[0]}."))
        for name, opt in self.optims.items():
            state: dict[int, dict] = {}
            for k, v in sub(f"optim.{name}.").items():
                idx, key = k.split(".", 1)
                state.setdefault(int(idx), {})[key] = v.to(self.device) if key != "step" else v
            for k, v in meta["optim_scalars"].items():
                n, idx, key = k.split(".", 2)
                if n == name:
                    state.setdefault(int(idx), {})[key] = v
            opt.load_state_dict({"state": state, "param_groups": meta["optim_groups"][name]})
        torch.set_rng_state(tensors["rng.torch"])
        self.data_gen.set_state(tensors["rng.data"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if hasattr(self.method, "load_extra_state"):
            self.method.load_extra_state(meta.get("method_state", {}))
        self.it = int(meta["it"])
        self.best_val = meta.get("best_val") or float("inf")
        self._record_resume(path, meta)

    def _record_resume(self, path: Path, meta: dict) -> None:
        """A resume may change the recipe (e.g. --set train.steps=... or a learning-rate decay): append what differs
        from the saved state's config to resumes.jsonl, so the run folder tells its whole story (config.json keeps
        the config the run started with)."""
        if self.rank != 0:
            return
        changed = config_diff({"run_config": meta.get("run_config", {}), "train": meta.get("train", {})},
                              {"run_config": self.run_config, "train": to_dict(self.cfg)})
        with open(self.run_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"iteration": int(meta["it"]), "state": path.name, "changed": changed, **stamp()}) + "\n")
        if changed:
            print(f"resuming with a changed config: {', '.join(sorted(changed))}", flush=True)

    def export_net(self) -> torch.nn.Module:
        name = self.method.export_name
        return self.emas[name].net if name in self.emas else self.method.trainable[name]

    def export(self, path: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
               net: torch.nn.Module | None = None) -> Path:
        """Write the product (EMA weights of the export net, or `net`) as a model checkpoint, in `dtype` or else the
        configured export_dtype."""
        path = Path(path) if path else self.run_dir / "model.safetensors"
        if dtype is None:
            dtype = EXPORT_DTYPES[self.cfg.export_dtype]
        save_model(path, net if net is not None else self.export_net(), self.method.export_spec(), dtype=dtype,
                   extra={"method": self.method.name, "iteration": self.it, "run_config": self.run_config,
                          "train": to_dict(self.cfg), "method_config": self.method.config_dict()})
        return path

    # --- monitoring ----------------------------------------------------------------------------------------
    def sample_grid(self, n: int = 40) -> Path:
        net = self.export_net()
        shape = getattr(self.method, "image_shape", (1, 32, 32))
        z, labels = seeds_for_grid(n, getattr(self.method, "num_classes", 0), shape)
        imgs = self.method.sample(net, z.to(self.device), None if labels is None else labels.to(self.device))
        path = self.run_dir / "samples" / f"grid-{self.it:08d}.png"
        save_grid(path, to_uint8(imgs.float().cpu().numpy()), nrow=max(10, getattr(self.method, "num_classes", 0)))
        return path

    def run_metric(self) -> dict:
        if self.metric_fn is None:
            return {}
        net = self.export_net()
        shape = getattr(self.method, "image_shape", (1, 32, 32))
        n, bs = self.cfg.metric_samples, 250
        outs, labs = [], []
        for i in range(0, n, bs):
            z, labels = seeds_for_grid(min(bs, n - i), getattr(self.method, "num_classes", 0), shape, 10**6 + i)
            imgs = self.method.sample(net, z.to(self.device), None if labels is None else labels.to(self.device))
            outs.append(to_uint8(imgs.float().cpu().numpy()))
            labs.append(None if labels is None else labels.numpy())
        return self.metric_fn(np.concatenate(outs), None if labs[0] is None else np.concatenate(labs))

    def _log(self, row: dict) -> None:
        path = self.run_dir / "log.csv"
        jsonl = self.run_dir / "log.jsonl"
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        header = []
        if path.exists():
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        if header and all(k in header for k in row):
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerow(row)
            return
        # first row, or a new column (e.g. the generator phase starts after a fake-score warm-up): write the CSV
        # again from log.jsonl (every row so far, this one included) under the union of the columns
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    # --- the loop ----------------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (latest := self.latest_state()) is not None:
            self.load_state(latest)
            if self.rank == 0:
                print(f"resumed from {latest} at iteration {self.it}", flush=True)
        elif self.rank == 0:
            atomic_write_json(self.run_dir / "config.json", {"run_config": self.run_config, "train": to_dict(self.cfg),
                                                             "method": self.method.name, "device": self.device_info(),
                                                             "init": getattr(self.method, "init_report", None),
                                                             **stamp()})
        old_handler = signal.getsignal(signal.SIGTERM)

        def on_term(signum, frame):  # finish the current iteration, save, exit
            self._stop = True

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            old_handler = None
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.cfg.steps, initial=self.it, desc=self.method.name, dynamic_ncols=True)
        t0 = t_win = time.time()
        it_win = self.it
        window: dict[str, list[float]] = {}
        summary: dict[str, Any] = {}
        try:
            while self.it < self.cfg.steps and not self._stop:
                logs = self.train_step()
                for k, v in logs.items():
                    window.setdefault(k, []).append(v)
                if bar:
                    bar.update(1)
                    short = {k.split("/")[0][:3] + "/" + k.split("/")[1][:8]: f"{np.mean(v):.4g}"
                             for k, v in window.items() if k.endswith("loss")}
                    bar.set_postfix(short, refresh=False)
                last = self.it >= self.cfg.steps or self._stop  # a SIGTERM'd run logs its final row too
                if self.rank == 0 and (self.it % self.cfg.log_every == 0 or last):
                    # sec_per_it: over the iterations since the previous row (so that sum(sec_per_it x iterations)
                    # over the rows is the training time); elapsed_s: since this process started (or resumed)
                    now = time.time()
                    row = {"it": self.it, "kimg": self.it * self.cfg.batch_size / 1000,
                           "sec_per_it": (now - t_win) / max(1, self.it - it_win), "elapsed_s": now - t0,
                           "nan_skips": self.nan_skips}
                    row.update({k: float(np.mean(v)) for k, v in window.items()})
                    self._log(row)
                    window, t_win, it_win = {}, now, self.it
                if self.cfg.ckpt_every and self.it % self.cfg.ckpt_every == 0 and not last:
                    self.save_state()
                if self.rank == 0 and self.cfg.snapshot_every and self.it % self.cfg.snapshot_every == 0:
                    self.export(self.run_dir / "snapshots" / f"model-{self.it:08d}.safetensors")
                if self.rank == 0 and self.cfg.sample_every and (self.it % self.cfg.sample_every == 0 or last):
                    self.sample_grid()
                if self.rank == 0 and self.cfg.metric_every and self.it % self.cfg.metric_every == 0 and not last:
                    m = self.run_metric()
                    if m:
                        self._log({"it": self.it, **{f"metric/{k}": v for k, v in m.items()}})
            self.save_state()
            if self.rank == 0 and self.it >= self.cfg.steps and self.metric_fn is not None:
                summary = self.run_metric()
                self._log({"it": self.it, **{f"metric/{k}": v for k, v in summary.items()}})
        finally:
            if bar:
                bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        if self.world > 1:
            dist.barrier()
        return {"it": self.it, "stopped_early": self._stop, **summary}
