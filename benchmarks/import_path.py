"""The import path, end to end: a diffusers DDPM trained here with diffusers' own classes, saved with
`save_pretrained`, imported with `onestep import`, distilled with SiD and evaluated beside its teacher.

    python -m benchmarks.import_path --out benchmarks/results/import_path --work runs/import-path \
        --teacher-steps 600 --sid-steps 150 --n 1000

Stages (each skips when its output exists, so a killed run is started again with the same command):
  1. train_ddpm  unconditional UNet2DModel + DDPMScheduler (1000 linear betas, epsilon) on Fashion-MNIST with the
                 DDPM loss (`scheduler.add_noise`), Adam + EMA; WORK/ddpm-train/state.pt every --ckpt-every
                 iterations; at the end DDPMPipeline(unet=EMA UNet).save_pretrained(WORK/ddpm)
  2. import      `onestep import WORK/ddpm --out WORK/teacher.safetensors` (with its DDIM parity check)
  3. distill     SiD (preset "import-sid", the fmnist-sid recipe) on WORK/teacher.safetensors -> WORK/sid
  4. evaluate    teacher (Euler = deterministic DDIM on the DDPM's uniform timestep grid, `ddim-uniform`) at
                 --teacher-points steps and the student at 1 NFE, same seeds, same N: classifier-space KID/FD and
                 Inception FID/KID with real-vs-real baselines at the same N -> WORK/eval-<key>.json
  5. report      OUT.json, OUT.md and OUT-grids/*.png
The budget options of stages 1-3 are pinned in WORK/pipeline.json: a different budget needs a new --work folder.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

STAGES = ("train_ddpm", "import", "distill", "evaluate", "report")
NUM_TRAIN_TIMESTEPS = 1000
# options that change what stages 1-3 produce (pinned per work folder)
BUDGET_KEYS = ("teacher_steps", "teacher_batch", "teacher_lr", "teacher_warmup", "teacher_ema", "channels",
               "layers_per_block", "norm_groups", "seed", "sid_steps", "sid_batch", "sid_fake_warmup",
               "sid_lr", "sid_ema")


def log(msg: str) -> None:
    print(f"[import-path] {msg}", flush=True)


# --- 1. the diffusers DDPM ---------------------------------------------------------------------------------------
def make_unet(channels, layers_per_block: int, norm_groups: int | None):
    """An unconditional 1-channel 32x32 UNet2DModel without attention (diffusers' own class)."""
    from diffusers import UNet2DModel

    channels = tuple(int(c) for c in channels)
    groups = norm_groups or min(32, min(channels))
    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=channels,
                       layers_per_block=layers_per_block, down_block_types=("DownBlock2D",) * len(channels),
                       up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=groups)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon")


def _save_torch_atomic(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def ddpm_loss(unet, scheduler, x0, generator):
    """The DDPM epsilon loss: ||eps - eps_hat(add_noise(x0, eps, t), t)||^2 with t ~ U{0..T-1}."""
    import torch
    import torch.nn.functional as F

    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    noisy = scheduler.add_noise(x0, noise, t)
    return F.mse_loss(unet(noisy, t).sample, noise)


def train_ddpm(work: Path, a) -> dict:
    """Stage 1: train, checkpoint (unet, ema, optimizer, step) and save the EMA pipeline to WORK/ddpm."""
    import numpy as np
    import torch
    from diffusers import DDPMPipeline

    from onestep.data import load_dataset, to_model_range

    out, tdir = work / "ddpm", work / "ddpm-train"
    tdir.mkdir(parents=True, exist_ok=True)
    state_path = tdir / "state.pt"
    data = load_dataset("fashion-mnist", "train", size=32)
    images = data.images
    torch.manual_seed(a.seed)
    unet = make_unet(a.channels, a.layers_per_block, a.norm_groups)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = make_scheduler()
    opt = torch.optim.Adam(unet.parameters(), lr=a.teacher_lr)
    step, cpu_s, wall_s, history = 0, 0.0, 0.0, []
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        unet.load_state_dict(st["unet"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        step, cpu_s, wall_s, history = st["step"], st["cpu_seconds"], st["wall_seconds"], st["history"]
        log(f"train_ddpm: resumed from {state_path} at iteration {step}")
    n_params = sum(p.numel() for p in unet.parameters())
    log(f"train_ddpm: UNet2DModel {n_params / 1e6:.3f}M params, {a.teacher_steps} iterations of batch "
        f"{a.teacher_batch}, {torch.get_num_threads()} thread(s)")
    c0, w0 = time.process_time(), time.time()
    window = []

    def save():
        nonlocal c0, w0, cpu_s, wall_s
        cpu_s += time.process_time() - c0
        wall_s += time.time() - w0
        c0, w0 = time.process_time(), time.time()
        _save_torch_atomic({"unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                            "step": step, "cpu_seconds": cpu_s, "wall_seconds": wall_s, "history": history},
                           state_path)

    unet.train()
    while step < a.teacher_steps:
        # one generator per iteration, seeded by (seed, iteration): a resumed run draws what it would have drawn
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
        idx = torch.randint(0, len(images), (a.teacher_batch,), generator=g).numpy()
        x0 = torch.from_numpy(to_model_range(images[np.sort(idx)]))
        for group in opt.param_groups:
            group["lr"] = a.teacher_lr * min(1.0, (step + 1) / max(1, a.teacher_warmup))
        loss = ddpm_loss(unet, scheduler, x0, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(a.teacher_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1.0 - decay)
        window.append(loss.item())
        if step % a.log_every == 0 or step == a.teacher_steps:
            row = {"it": step, "loss": float(np.mean(window)),
                   "sec_per_it": (wall_s + time.time() - w0) / max(1, step)}
            history.append(row)
            window = []
            log(f"train_ddpm: it {step}/{a.teacher_steps} loss {row['loss']:.4f}")
        if step % a.ckpt_every == 0 or step == a.teacher_steps:
            save()
    save()
    with torch.no_grad():  # buffers (none in this UNet) follow the online net
        for be, b in zip(ema.buffers(), unet.buffers()):
            be.copy_(b)
    tmp = work / f"ddpm.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    DDPMPipeline(unet=ema.eval(), scheduler=scheduler).save_pretrained(tmp)
    summary = {"iterations": step, "batch": a.teacher_batch, "kimg": step * a.teacher_batch / 1000,
               "cpu_minutes": cpu_s / 60, "wall_minutes": wall_s / 60, "threads": torch.get_num_threads(),
               "params": n_params, "lr": a.teacher_lr, "warmup": a.teacher_warmup, "ema_decay": a.teacher_ema,
               "optimizer": "Adam", "clip_grad_norm": 1.0,
               "unet": {"block_out_channels": list(unet.config.block_out_channels),
                        "layers_per_block": unet.config.layers_per_block,
                        "norm_num_groups": unet.config.norm_num_groups, "attention": False},
               "scheduler": "DDPMScheduler(1000, linear 1e-4..0.02, epsilon)", "final_loss": history[-1]["loss"],
               "history": history}
    (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return summary


# --- 2. import -----------------------------------------------------------------------------------------------------
def import_teacher(work: Path, a) -> dict:
    from onestep.importer import import_folder

    side = import_folder(work / "ddpm", work / "teacher.safetensors", steps=a.parity_steps)
    log(f"import: parity rel err {side['parity']['rel_err']:.3g} (tolerance {side['parity']['tolerance']:g})")
    return side


# --- 3. distill ----------------------------------------------------------------------------------------------------
def sid_run_config(teacher: Path, a):
    import dataclasses

    from onestep.config import override
    from training.presets import get_preset

    rc = dataclasses.replace(get_preset("import-sid"), teacher=str(teacher))
    sets = [f"train.steps={a.sid_steps}", f"train.batch_size={a.sid_batch}", f"train.num_threads={a.threads}",
            f"train.ckpt_every={a.ckpt_every}", f"train.log_every={a.log_every}",
            f"train.sample_every={a.sid_steps}"]
    if a.sid_fake_warmup is not None:
        sets.append(f"method_cfg.fake_warmup={a.sid_fake_warmup}")
    if a.sid_lr is not None:
        sets += [f"method_cfg.optim_generator.lr={a.sid_lr}", f"method_cfg.optim_fake.lr={a.sid_lr}"]
    if a.sid_ema is not None:
        sets.append(f"train.ema_decay={a.sid_ema}")
    return override(rc, sets), sets


def distill(work: Path, a) -> dict:
    import torch

    from training.run import train

    rc, sets = sid_run_config(work / "teacher.safetensors", a)
    budget_path = work / "sid-budget.json"
    spent = json.loads(budget_path.read_text()) if budget_path.exists() else {"cpu_seconds": 0.0, "wall_seconds": 0.0}
    c0, w0 = time.process_time(), time.time()
    res = train(rc, work / "sid", resume=True, device="cpu", progress=a.progress)
    spent["cpu_seconds"] += time.process_time() - c0
    spent["wall_seconds"] += time.time() - w0
    budget_path.write_text(json.dumps(spent))
    fw = rc.method_cfg.fake_warmup
    return {"preset": "import-sid", "overrides": sets, "iterations": res["it"], "batch": rc.train.batch_size,
            "fake_warmup": fw, "generator_iterations": max(0, res["it"] - fw),
            "kimg": res["it"] * rc.train.batch_size / 1000, "cpu_minutes": spent["cpu_seconds"] / 60,
            "wall_minutes": spent["wall_seconds"] / 60, "threads": torch.get_num_threads(),
            "lr": rc.method_cfg.optim_generator.lr, "alpha": rc.method_cfg.alpha,
            "sigma_init": rc.method_cfg.sigma_init, "ema_decay": rc.train.ema_decay,
            "cli": (f"onestep distill --method sid --preset import-sid --metric none "
                    f"--teacher {work / 'teacher.safetensors'} "
                    f"--run-dir {work / 'sid'} " + " ".join(f"--set {s}" for s in sets))}


# --- 4. evaluate ---------------------------------------------------------------------------------------------------
def eval_points(work: Path, a) -> list[dict]:
    pts = [{"label": f"teacher-ddim{s}", "model": str(work / "teacher.safetensors"), "sampler": "ddim",
            "steps": s, "schedule": "ddim-uniform"} for s in a.teacher_points]
    pts.append({"label": "student-sid", "model": str(work / "sid" / "model.safetensors"), "sampler": "onestep",
                "steps": 1, "schedule": None})
    return pts


def eval_key(work: Path, a) -> str:
    spec = {"points": eval_points(work, a), "n": a.n, "n_inception": a.n_inception}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def evaluate(work: Path, a) -> dict:
    """Teacher (DDIM) and student (1 NFE) on the same seeds and N, with the functions of benchmarks.quality."""
    from benchmarks.quality import generate
    from onestep.checkpoint import load_model
    from onestep.images import save_grid
    from onestep.metrics import ClassifierFeatures, InceptionFeatures, evaluate_images, real_baseline
    from onestep.samplers import nfe

    clf = ClassifierFeatures()
    inc = InceptionFeatures() if a.n_inception else None
    res = {"n": a.n, "n_inception": a.n_inception,
           "baselines": {"classifier": real_baseline(extractor=clf, n=a.n)}, "rows": []}
    if inc is not None:
        res["baselines"]["inception"] = real_baseline(extractor=inc, n=a.n_inception, progress=a.progress)
    grid_dir = work / "eval-grids"
    for p in eval_points(work, a):
        model, meta = load_model(p["model"])
        kw = {"schedule": p["schedule"]} if p["schedule"] else {}
        imgs, _, secs = generate(model, meta, p["sampler"], p["steps"], max(a.n, a.n_inception), **kw)
        c = evaluate_images(imgs[:a.n], extractor=clf)
        row = {**p, "model_sha256": meta.get("sha256"), "nfe": nfe(p["sampler"], p["steps"]),
               "sample_seconds": secs, "classifier_kid": c["kid"], "classifier_kid_std": c["kid_std"],
               "classifier_fd": c["fid"]}
        if inc is not None:
            t0 = time.time()
            m = evaluate_images(imgs[:a.n_inception], extractor=inc, progress=a.progress)
            row.update({"inception_fid": m["fid"], "inception_kid": m["kid"], "inception_kid_std": m["kid_std"],
                        "inception_seconds": time.time() - t0})
        save_grid(grid_dir / f"{p['label']}.png", imgs[:40], nrow=10)
        row["grid"] = f"{p['label']}.png"
        res["rows"].append(row)
        log("evaluate: " + json.dumps({k: v for k, v in row.items() if k not in ("model", "model_sha256")}))
    return res


# --- 5. report -----------------------------------------------------------------------------------------------------
def _fmt_budget(name: str, b: dict) -> str:
    return (f"| {name} | {b['iterations']} | {b['batch']} | {b['kimg']:.1f} | {b['cpu_minutes']:.1f} | "
            f"{b['wall_minutes']:.1f} | {b['threads']} |")


def report(out: Path, work: Path, a, command: str, ddpm: dict, side: dict, sid: dict, ev: dict) -> dict:
    from benchmarks.report import write_report
    from onestep.provenance import git_revision, machine_info, package_versions

    gdir = Path(f"{out}-grids")
    gdir.mkdir(parents=True, exist_ok=True)
    for r in ev["rows"]:
        shutil.copyfile(work / "eval-grids" / r["grid"], gdir / r["grid"])
    parity = side["parity"]
    res = {"command": command, "machine": machine_info(), "git_revision": git_revision(),
           "packages": package_versions(), "work": str(work),
           "stage_commands": {"import": f"onestep import {work / 'ddpm'} --out {work / 'teacher.safetensors'} "
                                        f"--steps {a.parity_steps}", "distill": sid["cli"]},
           "ddpm": {k: v for k, v in ddpm.items() if k != "history"}, "ddpm_history": ddpm.get("history"),
           "import": {"teacher_sha256": side.get("sha256"), "source_sha256": side["source"]["sha256"],
                      "parity": parity},
           "sid": sid, "evaluation": ev}
    b = ev["baselines"]
    inc_base = (f"; Inception FID {b['inception']['fid']:.2f}, KID {b['inception']['kid'] * 1e3:.2f} ± "
                f"{b['inception']['kid_std'] * 1e3:.2f} (x1e3) at N={ev['n_inception']}" if "inception" in b else "")
    lines = ["# The import path: a diffusers DDPM, imported and distilled with SiD", "",
             "An unconditional diffusers `UNet2DModel` + `DDPMScheduler` (1000 linear betas, epsilon prediction) "
             "trained here on Fashion-MNIST (32x32, zero-padded) with diffusers' own classes and saved with "
             "`DDPMPipeline.save_pretrained`, imported with `onestep import`, distilled with SiD (preset "
             "`import-sid`). The budgets are minutes on CPU: this row shows the path works, not the quality a "
             "longer run reaches.", "",
             f"Import parity (ours vs diffusers' DDIM, {parity['steps']} steps, seeds {parity['seeds']}): "
             f"relative error {parity['rel_err']:.2g} (tolerance {parity['tolerance']:g}).", "",
             "## Budgets", "",
             "| stage | iterations | batch | kimg | CPU minutes | wall minutes | threads |",
             "|---|---|---|---|---|---|---|",
             _fmt_budget("DDPM training (diffusers)", ddpm),
             _fmt_budget(f"SiD (fake-score warm-up {sid['fake_warmup']})", sid), "",
             f"DDPM: {ddpm['params'] / 1e6:.2f}M parameters, block_out_channels {ddpm['unet']['block_out_channels']}, "
             f"layers_per_block {ddpm['unet']['layers_per_block']}, no attention; Adam lr {ddpm['lr']:g} (warm-up "
             f"{ddpm['warmup']}), EMA {ddpm['ema_decay']}, final loss {ddpm['final_loss']:.4f}. SiD: alpha "
             f"{sid['alpha']}, sigma_init {sid['sigma_init']}, lr {sid['lr']:g}, EMA {sid['ema_decay']}.", "",
             "## Quality", "",
             f"Same evaluation seeds for every row; classifier-space metrics at N={ev['n']}"
             + (f", Inception FID/KID at N={ev['n_inception']}" if ev["n_inception"] else ", Inception skipped")
             + ". The teacher is sampled by our Euler sampler on the DDPM's uniform DDIM timestep grid "
             "(`ddim-uniform`: deterministic DDIM, eta 0); the student in one network evaluation.", "",
             f"Evaluation (sampling, features, baselines): {ev['cpu_minutes']:.1f} CPU minutes, "
             f"{ev['wall_minutes']:.1f} wall minutes, {ev['threads']} thread(s).", "",
             f"Real-vs-real baseline (Fashion-MNIST test vs train, same N): classifier KID {b['classifier']['kid']:.2f}"
             f" ± {b['classifier']['kid_std']:.2f}, classifier FD {b['classifier']['fid']:.3f}{inc_base}.", "",
             "| model | sampler | NFE | classifier KID | classifier FD | Inception FID | Inception KID x1e3 | "
             "sampling s | samples |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ev["rows"]:
        inc_fid = f"{r['inception_fid']:.2f}" if "inception_fid" in r else "-"
        inc_kid = (f"{r['inception_kid'] * 1e3:.2f} ± {r['inception_kid_std'] * 1e3:.2f}"
                   if "inception_kid" in r else "-")
        sampler = f"{r['sampler']} {r['schedule']}" if r["schedule"] else r["sampler"]
        lines.append(f"| {r['label']} | {sampler} | {r['nfe']} | {r['classifier_kid']:.2f} ± "
                     f"{r['classifier_kid_std']:.2f} | {r['classifier_fd']:.3f} | {inc_fid} | {inc_kid} | "
                     f"{r['sample_seconds']:.1f} | [grid]({gdir.name}/{r['grid']}) |")
    lines += ["", "Stage commands (what the pipeline runs, as CLI):", "",
              f"- `{res['stage_commands']['import']}`", f"- `{res['stage_commands']['distill']}`"]
    res["eval_key"] = ev["key"]
    write_report(out, res, lines)
    return res


# --- driver --------------------------------------------------------------------------------------------------------
def _pin_budget(work: Path, a) -> None:
    """The budget options of stages 1-3 are fixed per work folder (so a resumed stage continues the same run)."""
    path = work / "pipeline.json"
    mine = {k: getattr(a, k) for k in BUDGET_KEYS}
    mine = json.loads(json.dumps(mine))
    if path.exists():
        old = json.loads(path.read_text())["budget"]
        diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{work} was started with other budget options {diff} (old, new): use a new --work "
                             f"folder, or the options recorded in {path}")
    else:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"budget": mine}, indent=2))


def run_pipeline(a, command: str) -> dict:
    """Run the stages in order, skipping those whose output exists; returns {stage: "ran" | "skipped"}."""
    import torch

    from onestep.checkpoint import read_metadata

    torch.set_num_threads(a.threads)
    work, out = Path(a.work), Path(a.out)
    _pin_budget(work, a)
    status = {}

    def stage(name, output: Path, fn):
        if output.exists():
            log(f"{name}: skipped ({output} exists)")
            status[name] = "skipped"
            return None
        log(f"{name}: running")
        t0 = time.time()
        r = fn()
        log(f"{name}: done in {time.time() - t0:.1f} s")
        status[name] = "ran"
        return r

    ddpm_dir = work / "ddpm"
    stage("train_ddpm", ddpm_dir / "model_index.json", lambda: train_ddpm(work, a))
    ddpm = json.loads((ddpm_dir / "train_summary.json").read_text())
    teacher = work / "teacher.safetensors"
    stage("import", teacher, lambda: import_teacher(work, a))
    side = read_metadata(teacher)
    sid_path = work / "sid-summary.json"

    def run_distill():
        s = distill(work, a)
        sid_path.write_text(json.dumps(s, indent=2))
        return s

    stage("distill", sid_path, run_distill)
    sid = json.loads(sid_path.read_text())
    key = eval_key(work, a)
    ev_path = work / f"eval-{key}.json"

    def run_eval():
        c0, w0 = time.process_time(), time.time()
        ev = evaluate(work, a)
        ev.update(key=key, cpu_minutes=(time.process_time() - c0) / 60, wall_minutes=(time.time() - w0) / 60,
                  threads=torch.get_num_threads())
        ev_path.write_text(json.dumps(ev, indent=2))

    stage("evaluate", ev_path, run_eval)
    ev = json.loads(ev_path.read_text())
    out_json = Path(f"{out}.json")
    if out_json.exists() and json.loads(out_json.read_text()).get("eval_key") == key:
        log(f"report: skipped ({out_json} exists for evaluation {key})")
        status["report"] = "skipped"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        report(out, work, a, command, ddpm, side, sid, ev)
        status["report"] = "ran"
    return status


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="report stem: writes OUT.json, OUT.md and OUT-grids/")
    ap.add_argument("--work", required=True, help="work folder (DDPM, checkpoints, imported teacher, SiD run)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for every stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, default=600, help="DDPM training iterations")
    ap.add_argument("--teacher-batch", type=int, default=64)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--teacher-warmup", type=int, default=100, help="linear lr warm-up iterations")
    ap.add_argument("--teacher-ema", type=float, default=0.995, help="EMA decay (warmed up as (1+it)/(10+it))")
    ap.add_argument("--channels", type=_ints, default=(32, 64, 64), help="UNet block_out_channels, e.g. 32,64,64")
    ap.add_argument("--layers-per-block", type=int, default=1)
    ap.add_argument("--norm-groups", type=int, default=None, help="GroupNorm groups (default min(32, channels))")
    ap.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N iterations (DDPM and SiD)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--parity-steps", type=int, default=10, help="DDIM steps of the import's parity check")
    ap.add_argument("--sid-steps", type=int, default=150, help="SiD iterations (fake-score warm-up included)")
    ap.add_argument("--sid-batch", type=int, default=32)
    ap.add_argument("--sid-fake-warmup", type=int, default=None, help="default: the preset's (50)")
    ap.add_argument("--sid-lr", type=float, default=None, help="default: the preset's (5e-5)")
    ap.add_argument("--sid-ema", type=float, default=None, help="default: the preset's (0.99)")
    ap.add_argument("--teacher-points", type=_ints, default=(10, 50), help="teacher DDIM step counts")
    ap.add_argument("--n", type=int, default=1000, help="images per model for the classifier-space metrics")
    ap.add_argument("--n-inception", type=int, default=None,
                    help="images per model for Inception FID/KID (default --n; 0 skips Inception)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.n_inception is None:
        a.n_inception = a.n
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={omp} " if omp else "") + "python -m benchmarks.import_path " + shlex.join(argv)
    status = run_pipeline(a, command)
    log("stages: " + json.dumps(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
