"""Named presets: each pins a reproducible recipe. The comment says what it reaches and with which command;
the numbers live in benchmarks/results/ next to the command that measured them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from onestep.config import OptimConfig, TrainConfig, from_dict, to_dict
from onestep.nets import UNetConfig
from training.methods.advkd import AdvKDConfig
from training.methods.denoising_student import DenoisingStudentConfig
from training.methods.edm import EDMTeacherConfig
from training.methods.emd import EMDConfig
from training.methods.sferd import SFERDConfig
from training.methods.sid import SiDConfig


@dataclass(frozen=True)
class RunConfig:
    method: str
    data: str = "fashion-mnist"  # 'fashion-mnist', a .npz file or an image folder
    teacher: str | None = None  # teacher checkpoint for distillation methods
    method_cfg: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"method": self.method, "data": self.data, "teacher": self.teacher,
                "method_cfg": to_dict(self.method_cfg), "train": to_dict(self.train)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        from training.methods import METHODS

        cfg_cls = METHODS[d["method"]][1]
        return cls(method=d["method"], data=d.get("data", "fashion-mnist"), teacher=d.get("teacher"),
                   method_cfg=from_dict(cfg_cls, d.get("method_cfg") or {}),
                   train=from_dict(TrainConfig, d.get("train") or {}))


FMNIST_UNET = UNetConfig(resolution=32, channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                         attention=False, num_classes=10)
FMNIST_UNET_ATTN = replace(FMNIST_UNET, attention=True)  # + self-attention at 16x16 and 8x8 (0.51 GFLOP/image)
TINY_UNET = UNetConfig(resolution=32, channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       attention=False, num_classes=10, norm_num_groups=4)

SHIPPED_TEACHER = "artifacts/fmnist-teacher.safetensors"
ATTN_TEACHER = "artifacts/fmnist-teacher-attn.safetensors"  # the stronger teacher (benchmarks/results/teacher_attn.md)
ATTN_TEACHER_404 = "artifacts/fmnist-teacher-attn-404kimg.safetensors"  # it before its annealing phase

PRESETS: dict[str, RunConfig] = {
    # The shipped teacher (artifacts/fmnist-teacher.safetensors): 1.05M params, batch 64, CPU-trainable.
    # Quality vs NFE: benchmarks/results/teacher_quality.md (onestep evaluate ...).
    "fmnist-teacher": RunConfig(
        method="edm-teacher", data="fashion-mnist",
        method_cfg=EDMTeacherConfig(unet=FMNIST_UNET, optim=OptimConfig(lr=6e-4, warmup_steps=200)),
        train=TrainConfig(steps=2000, batch_size=64, ema_decay=0.998, clip_grad_norm=1.0, log_every=25,
                          ckpt_every=250, sample_every=500, seed=0, num_threads=1)),
    # The stronger teacher: the shipped teacher's architecture plus self-attention at 16x16 (and in the 8x8 middle),
    # warm-started from the shipped teacher (attention blocks start as the identity), then trained on both cores.
    # EMA lengths 0.999 / 0.9995 / 0.9998 are all kept; the shipped one is chosen on a held-out metric.
    "fmnist-teacher-attn": RunConfig(
        method="edm-teacher", data="fashion-mnist",
        method_cfg=EDMTeacherConfig(unet=FMNIST_UNET_ATTN, grid_steps=8, init_from=SHIPPED_TEACHER,
                                    optim=OptimConfig(lr=4e-4, warmup_steps=200)),
        train=TrainConfig(steps=6000, batch_size=64, ema_decay=0.9995, extra_ema_decays=(0.999, 0.9998),
                          extra_ema_sigma_rels=(0.05, 0.10),
                          clip_grad_norm=1.0, log_every=25, ckpt_every=250, sample_every=500, metric_every=500,
                          metric_samples=500, seed=0, num_threads=2)),
    # The attention teacher's annealing phase, which made the shipped ATTN_TEACHER: warm-started from the 404-kimg
    # attention teacher (its EMA weights; Adam starts fresh, hence the warm-up), then the learning rate falls along a
    # cosine to zero over 2000 iterations x 64 = 128 kimg (532 kimg in all); ~86 min on 2 CPU cores. Reaches
    # Inception KID 7.80 +- 0.48 x1e-3, FID 23.61 at N=2000 at its best measured NFE (Euler 16), 15.57 at Heun 9 (17 NFE,
    # not converged); benchmarks/results/teacher_attn.md, teacher_nfe.md.
    "fmnist-teacher-attn-anneal": RunConfig(
        method="edm-teacher", data="fashion-mnist",
        method_cfg=EDMTeacherConfig(unet=FMNIST_UNET_ATTN, grid_steps=8, init_from=ATTN_TEACHER_404,
                                    optim=OptimConfig(lr=4e-4, warmup_steps=100, decay="cosine")),
        train=TrainConfig(steps=2000, batch_size=64, ema_decay=0.999, extra_ema_decays=(0.998, 0.9995),
                          extra_ema_sigma_rels=(0.05, 0.10),
                          clip_grad_norm=1.0, log_every=25, ckpt_every=250, sample_every=1000, metric_every=0,
                          metric_samples=500, seed=1, num_threads=2)),
    # Seconds on CPU: for tests and smoke runs only; its samples are noise-like.
    "tiny-teacher": RunConfig(
        method="edm-teacher", data="fashion-mnist",
        method_cfg=EDMTeacherConfig(unet=TINY_UNET, grid_steps=4, optim=OptimConfig(lr=2e-3, warmup_steps=5)),
        train=TrainConfig(steps=20, batch_size=8, ema_decay=0.9, log_every=5, ckpt_every=10, sample_every=20,
                          seed=0)),
    # --- distillation from the shipped teacher (results: benchmarks/results/students_fmnist_teacher.md) ---------------------
    "fmnist-denoising-student": RunConfig(
        method="denoising-student", teacher=SHIPPED_TEACHER,
        method_cfg=DenoisingStudentConfig(cache_dir="runs/pairs-fmnist-heun9", n_pairs=3000, holdout=250,
                                          teacher_sampler="heun", teacher_steps=9, teacher_schedule="karras",
                                          loss="l1", optim=OptimConfig(lr=2e-4, betas=(0.9, 0.98), warmup_steps=100)),
        train=TrainConfig(steps=400, batch_size=64, ema_decay=0.995, clip_grad_norm=1.0, log_every=25,
                          ckpt_every=100, sample_every=250, seed=0, num_threads=1)),
    # SiD / SiDA / EMD at CPU scale: 400 iterations, so the fake-score warm-up (50), the SiDA mix-in point (100
    # generator iterations) and EMD's K (4) are scaled down and the lr raised to 5e-5 (paper/code: 1e-5);
    # training/methods/README.md "Paper fidelity: SiD, SiDA, EMD" lists every such choice.
    "fmnist-sid": RunConfig(
        method="sid", teacher=SHIPPED_TEACHER,
        method_cfg=SiDConfig(alpha=1.2, fake_warmup=50,
                             optim_generator=OptimConfig(lr=5e-5, betas=(0.0, 0.999)),
                             optim_fake=OptimConfig(lr=5e-5, betas=(0.0, 0.999))),
        train=TrainConfig(steps=400, batch_size=32, ema_decay=0.99, clip_grad_norm=1.0, log_every=10,
                          ckpt_every=100, sample_every=100, seed=0, num_threads=1)),
    # SiD at the budget the papers' students get relative to their teachers: >= 300 kimg (9400 x 32) from the
    # attention teacher, both cores, power-function EMAs for a held-out choice. Measured on 2 AMD EPYC cores with
    # torch 2.13 (runs/sid-continue): ~0.85 s per fake-score warm-up iteration and ~2.5 s per full iteration
    # (generator + fake score: about four fwd+bwd passes of the 1.1M-parameter net at batch 32), so 9400
    # iterations are ~6.5 CPU-hours: several resumed sessions (rerun the same command with the same --run-dir), or
    # minutes on one GPU
    "fmnist-sid-attn": RunConfig(
        method="sid", teacher=ATTN_TEACHER,
        method_cfg=SiDConfig(alpha=1.2, fake_warmup=200,
                             optim_generator=OptimConfig(lr=5e-5, betas=(0.0, 0.999)),
                             optim_fake=OptimConfig(lr=5e-5, betas=(0.0, 0.999))),
        train=TrainConfig(steps=9400, batch_size=32, ema_decay=0.999, extra_ema_sigma_rels=(0.05, 0.10),
                          clip_grad_norm=1.0, log_every=25, ckpt_every=250, sample_every=1000, metric_every=1000,
                          metric_samples=500, seed=0, num_threads=2)),
    # SiD continued on 2 CPU cores from the shipped SiD student (artifacts/fmnist-student-sid-gpu.safetensors, 155.8 kimg on
    # one GPU; its fake score and optimizer state were not kept): the generator starts from that student, the fake
    # score from the teacher again, trained alone for 150 iterations (~0.85 s each) to catch up with the generator
    "fmnist-sid-attn-continue": RunConfig(
        method="sid", teacher=ATTN_TEACHER,
        method_cfg=SiDConfig(alpha=1.2, fake_warmup=150, init_from="artifacts/fmnist-student-sid-gpu.safetensors",
                             optim_generator=OptimConfig(lr=5e-5, betas=(0.0, 0.999)),
                             optim_fake=OptimConfig(lr=5e-5, betas=(0.0, 0.999))),
        train=TrainConfig(steps=4300, batch_size=32, ema_decay=0.999, extra_ema_sigma_rels=(0.05, 0.10),
                          clip_grad_norm=1.0, log_every=25, ckpt_every=100, snapshot_every=250, sample_every=500,
                          metric_every=0, seed=1, num_threads=2)),  # run as 2000, then resumed to 4300 (~2.4 s/it)
    "fmnist-sida": RunConfig(
        method="sida", teacher=SHIPPED_TEACHER, data="fashion-mnist",
        method_cfg=SiDConfig(alpha=1.0, fake_warmup=50, adversarial=True, lambda_adv=0.01, adv_mix_after=100,
                             optim_generator=OptimConfig(lr=5e-5, betas=(0.0, 0.999)),
                             optim_fake=OptimConfig(lr=5e-5, betas=(0.0, 0.999))),
        train=TrainConfig(steps=400, batch_size=32, ema_decay=0.99, clip_grad_norm=1.0, log_every=10,
                          ckpt_every=100, sample_every=100, seed=0, num_threads=1)),
    "fmnist-emd": RunConfig(
        method="emd", teacher=SHIPPED_TEACHER,
        method_cfg=EMDConfig(K=4, step_eps=0.2, step_z=0.005, noise_cancellation=True, noise_levels="vp",
                             fake_warmup=50, optim_generator=OptimConfig(lr=5e-5, betas=(0.0, 0.999)),
                             optim_fake=OptimConfig(lr=5e-5, betas=(0.0, 0.999))),
        train=TrainConfig(steps=400, batch_size=32, ema_decay=0.99, clip_grad_norm=1.0, log_every=10,
                          ckpt_every=100, sample_every=100, seed=0, num_threads=1)),
    # SFERD: targets from the attention-guided teacher (Euler, 8 steps, w = 1.3, blur sigma 3); "fmnist-sferd-noguide"
    # (below) is the ablation without attention guidance (same recipe, plain teacher targets).
    "fmnist-sferd": RunConfig(
        method="sferd", teacher=SHIPPED_TEACHER,
        method_cfg=SFERDConfig(cache_dir="runs/pairs-fmnist-euler8-ag1.3", n_pairs=2000, holdout=200,
                               guidance=1.3, blur_sigma=3.0, optim=OptimConfig(lr=2e-4, warmup_steps=100)),
        train=TrainConfig(steps=400, batch_size=64, ema_decay=0.995, clip_grad_norm=1.0, log_every=25,
                          ckpt_every=100, sample_every=200, seed=0, num_threads=1)),
    # Adv-KD: a randomly initialised staged student (width 32; "fmnist-adv-kd-small": width 16) trained on
    # teacher trajectories (Euler, 8 steps) with snapshots at sigma 10, 2, 0.5.
    "fmnist-adv-kd": RunConfig(
        method="adv-kd", teacher=SHIPPED_TEACHER,
        method_cfg=AdvKDConfig(cache_dir="runs/pairs-fmnist-euler8-snapshots", n_pairs=2000, holdout=200,
                               width=32, stage_steps=(100, 100, 150, 450)),
        train=TrainConfig(steps=800, batch_size=64, ema_decay=0.995, clip_grad_norm=10.0, log_every=25,
                          ckpt_every=100, sample_every=200, seed=0, num_threads=1)),
    # tiny variants for tests (a tiny teacher is passed with --teacher)
    "tiny-denoising-student": RunConfig(
        method="denoising-student",
        method_cfg=DenoisingStudentConfig(cache_dir="runs/tiny-pairs", n_pairs=48, holdout=8, teacher_sampler="heun",
                                          teacher_steps=2, teacher_schedule="karras", cache_batch=16,
                                          optim=OptimConfig(lr=1e-3, betas=(0.9, 0.98))),
        train=TrainConfig(steps=12, batch_size=8, ema_decay=0.9, log_every=2, ckpt_every=6, sample_every=0)),
    "tiny-sid": RunConfig(
        method="sid", method_cfg=SiDConfig(fake_warmup=2, optim_generator=OptimConfig(lr=1e-4, betas=(0.0, 0.999)),
                                           optim_fake=OptimConfig(lr=1e-4, betas=(0.0, 0.999))),
        train=TrainConfig(steps=8, batch_size=4, ema_decay=0.9, log_every=1, ckpt_every=4, sample_every=0)),
    "tiny-sida": RunConfig(
        method="sida", method_cfg=SiDConfig(alpha=1.0, adversarial=True, fake_warmup=2, adv_mix_after=2,
                                            optim_generator=OptimConfig(lr=1e-4, betas=(0.0, 0.999)),
                                            optim_fake=OptimConfig(lr=1e-4, betas=(0.0, 0.999))),
        train=TrainConfig(steps=8, batch_size=4, ema_decay=0.9, log_every=1, ckpt_every=4, sample_every=0)),
    "tiny-emd": RunConfig(
        method="emd", method_cfg=EMDConfig(K=2, fake_warmup=2,
                                           optim_generator=OptimConfig(lr=1e-4, betas=(0.0, 0.999)),
                                           optim_fake=OptimConfig(lr=1e-4, betas=(0.0, 0.999))),
        train=TrainConfig(steps=8, batch_size=4, ema_decay=0.9, log_every=1, ckpt_every=4, sample_every=0)),
    "tiny-sferd": RunConfig(
        method="sferd",
        method_cfg=SFERDConfig(cache_dir="runs/tiny-pairs-ag", n_pairs=40, holdout=8, teacher_steps=2, cache_batch=16,
                               latent_steps=2, optim=OptimConfig(lr=1e-3, betas=(0.9, 0.98))),
        train=TrainConfig(steps=12, batch_size=8, ema_decay=0.9, log_every=2, ckpt_every=6, sample_every=0)),
    "tiny-adv-kd": RunConfig(
        method="adv-kd",
        method_cfg=AdvKDConfig(cache_dir="runs/tiny-pairs-snap", n_pairs=40, holdout=8, teacher_steps=3,
                               cache_batch=16, width=8, disc_width=8, stage_steps=(3, 3, 3, 15),
                               optim_generator=OptimConfig(lr=2e-3, betas=(0.5, 0.99))),
        train=TrainConfig(steps=24, batch_size=8, ema_decay=0.9, log_every=2, ckpt_every=12, sample_every=0)),
    # SiD on a teacher given at run time (--teacher; unconditional teacher -> unconditional student): the fmnist-sid
    # recipe. benchmarks/import_path.py runs it on a diffusers DDPM imported with `onestep import`
    # (results: benchmarks/results/import_path.md).
    "import-sid": RunConfig(
        method="sid",
        method_cfg=SiDConfig(alpha=1.2, fake_warmup=50,
                             optim_generator=OptimConfig(lr=5e-5, betas=(0.0, 0.999)),
                             optim_fake=OptimConfig(lr=5e-5, betas=(0.0, 0.999))),
        train=TrainConfig(steps=400, batch_size=32, ema_decay=0.99, clip_grad_norm=1.0, log_every=10,
                          ckpt_every=100, sample_every=100, seed=0, num_threads=1)),
}


def _variant(base: str, **method_changes) -> RunConfig:
    """A preset that differs from `base` only in method settings (ablations)."""
    rc = PRESETS[base]
    return replace(rc, method_cfg=replace(rc.method_cfg, **method_changes))


# Ablations (results beside their base preset's in benchmarks/results/students_fmnist_teacher.md)
PRESETS["fmnist-sferd-noguide"] = _variant("fmnist-sferd", cache_dir="runs/pairs-fmnist-euler8", guidance=1.0)
PRESETS["fmnist-adv-kd-small"] = _variant("fmnist-adv-kd", width=16)


# --- one GPU: every method from the attention teacher at once, stopped by wall clock -----------------------------
# scripts/gpu_distil.sh runs these side by side on one GPU (fp32, one CPU thread each) and stops them all with
# SIGTERM after a fixed time (each saves its state and exports on the way out); `steps` is a ceiling that is not
# reached, so every learning rate is constant after its warm-up (power-function EMAs stand in for annealing).
# Reached with 620 s each, all seven sharing one H200 (benchmarks/results/students_attn_gpu.md, Inception KID x1e3 at
# N=2000; the teacher's best is 7.80 at Euler 16, 15.57 at Heun 9): teacher trained on 6.63 at Euler 16, 12.63 at
# Heun 9 (1204 kimg in all; benchmarks/results/teacher_nfe.md), SFERD 16.70, SiD 18.09
# (156 kimg; the shipped student), SiDA 19.00, Denoising Student 28.22, EMD 37.60 (95 kimg), Adv-KD noise (its final
# stage had 457 iterations). To reproduce a budget exactly: --set train.steps=<the iterations reached there>.
GPU_TRAIN = TrainConfig(steps=1_000_000, batch_size=128, ema_decay=0.999, extra_ema_sigma_rels=(0.05, 0.10),
                        clip_grad_norm=1.0, log_every=100, ckpt_every=2000, keep_checkpoints=1, sample_every=5000,
                        metric_every=1000, metric_samples=500, snapshot_every=0, export_dtype="fp16", seed=0, amp="off",
                        num_threads=1)
_SID_OPT = OptimConfig(lr=5e-5, betas=(0.0, 0.999))
PRESETS.update({
    # the teacher, trained on: warm-started from the shipped attention teacher, batch 256, constant lr 2e-4
    "fmnist-teacher-attn-gpu": RunConfig(
        method="edm-teacher", data="fashion-mnist",
        method_cfg=EDMTeacherConfig(unet=FMNIST_UNET_ATTN, grid_steps=8, init_from=ATTN_TEACHER,
                                    optim=OptimConfig(lr=2e-4, warmup_steps=200)),
        train=replace(GPU_TRAIN, batch_size=256, metric_every=2000, snapshot_every=2000, seed=2)),
    "fmnist-sid-attn-gpu": RunConfig(
        method="sid", teacher=ATTN_TEACHER,
        method_cfg=SiDConfig(alpha=1.2, fake_warmup=200, optim_generator=_SID_OPT, optim_fake=_SID_OPT),
        train=replace(GPU_TRAIN, snapshot_every=1000)),
    # SiDA from scratch (not from a SiD student): SiD alone for the first 1000 generator iterations, then the
    # paper's 0.5 SiD + 0.5 GAN generator loss with the discriminator on the fake-score encoder
    "fmnist-sida-attn-gpu": RunConfig(
        method="sida", teacher=ATTN_TEACHER, data="fashion-mnist",
        method_cfg=SiDConfig(alpha=1.0, fake_warmup=200, adversarial=True, lambda_adv=0.01, adv_mix_after=1000,
                             optim_generator=_SID_OPT, optim_fake=_SID_OPT),
        train=replace(GPU_TRAIN, snapshot_every=1000)),
    "fmnist-emd-attn-gpu": RunConfig(
        method="emd", teacher=ATTN_TEACHER,
        method_cfg=EMDConfig(K=4, step_eps=0.2, step_z=0.005, noise_cancellation=True, noise_levels="vp",
                             fake_warmup=200, optim_generator=_SID_OPT, optim_fake=_SID_OPT),
        train=GPU_TRAIN),
    # offline methods: 50k teacher pairs each (built on the GPU at the start of the run), held-out EMA choice
    "fmnist-denoising-student-attn-gpu": RunConfig(
        method="denoising-student", teacher=ATTN_TEACHER,
        method_cfg=DenoisingStudentConfig(cache_dir="runs/pairs-attn-heun9", n_pairs=50_000, holdout=500,
                                          cache_batch=1000, teacher_sampler="heun", teacher_steps=9,
                                          teacher_schedule="karras", loss="l1",
                                          optim=OptimConfig(lr=2e-4, betas=(0.9, 0.98), warmup_steps=1000)),
        train=replace(GPU_TRAIN, extra_ema_sigma_rels=())),
    "fmnist-sferd-attn-gpu": RunConfig(
        method="sferd", teacher=ATTN_TEACHER,
        method_cfg=SFERDConfig(cache_dir="runs/pairs-attn-euler8-ag1.3", n_pairs=50_000, holdout=500,
                               cache_batch=1000, guidance=1.3, blur_sigma=3.0,
                               optim=OptimConfig(lr=2e-4, warmup_steps=1000)),
        train=replace(GPU_TRAIN, extra_ema_sigma_rels=())),
    "fmnist-adv-kd-attn-gpu": RunConfig(
        method="adv-kd", teacher=ATTN_TEACHER,
        method_cfg=AdvKDConfig(cache_dir="runs/pairs-attn-euler8-snapshots", n_pairs=50_000, holdout=500,
                               cache_batch=1000, width=32, stage_steps=(1000, 1000, 1500, 4500)),
        train=replace(GPU_TRAIN, clip_grad_norm=10.0, extra_ema_sigma_rels=())),
})

# Adv-KD from the attention teacher on 2 CPU cores: 5000 teacher trajectories (Euler 8, snapshots at sigma 10, 2,
# 0.5), the staged student at width 32 trained stage by stage with its generator EMA restarted at every stage
PRESETS["fmnist-adv-kd-attn"] = RunConfig(
    method="adv-kd", teacher=ATTN_TEACHER,
    method_cfg=AdvKDConfig(cache_dir="runs/pairs-attn-euler8-snapshots-5k", n_pairs=5000, holdout=200,
                           cache_batch=250, width=32, stage_steps=(400, 400, 600, 1000)),
    train=TrainConfig(steps=2400, batch_size=64, ema_decay=0.995, clip_grad_norm=10.0, log_every=50,
                      ckpt_every=200, sample_every=1000, seed=0, num_threads=2))


# The same recipe with the budget a GAN needs: 20000 trajectories (the 5000 above are its first 20 shards), the stages
# at 1000/1000/1500 iterations and the final one-step stage for the rest of 14000 (~0.43 s per iteration at batch 64
# on 2 cores); snapshots every 1000 iterations, each scored on the classifier metric, give the KID-vs-kimg curve and
# the shipped snapshot (held-out L1 to the teacher rewards blur, not a GAN's sharpness). Reached: stopped by SIGTERM at
# iteration 10137 (649 kimg; 89 training minutes, plus ~25 for the 15000 new trajectories while another job shared the
# cores): Inception KID 85.77 +- 1.99 x1e-3, FID 104.96 at N=2000 (main EMA; benchmarks/results/
# student_attn_adv_kd_cpu_long.md), classifier KID 25.0 and still flat-to-falling (advkd_curve.md). To reproduce that
# budget: --set train.steps=10137.
PRESETS["fmnist-adv-kd-attn-long"] = RunConfig(
    method="adv-kd", teacher=ATTN_TEACHER,
    method_cfg=AdvKDConfig(cache_dir="runs/pairs-attn-euler8-snapshots-20k", n_pairs=20_000, holdout=500,
                           cache_batch=250, width=32, stage_steps=(1000, 1000, 1500, 10_500)),
    train=TrainConfig(steps=14_000, batch_size=64, ema_decay=0.999, extra_ema_sigma_rels=(0.05, 0.10),
                      clip_grad_norm=10.0, log_every=50, ckpt_every=250, snapshot_every=1000, sample_every=1000,
                      metric_every=1000, metric_samples=1000, seed=0, num_threads=2))


# EMD from the attention teacher on 2 CPU cores (the GPU recipe at batch 32): the generator and the fake score start
# from the teacher; 200 fake-score warm-up iterations (~0.85 s each), then ~5.1 s per iteration (K = 4 Langevin steps,
# each a teacher and a fake-score pass plus a vector-Jacobian product through the generator), measured on 2 AMD EPYC
# cores with torch 2.13. Snapshots every 250 iterations give the KID-vs-kimg curve. Reached (109 min): Inception KID
# 35.83 +- 0.91 x1e-3, FID 58.82 at N=2000 (benchmarks/results/student_attn_emd_cpu.md; the teacher's best is 7.80).
PRESETS["fmnist-emd-attn"] = RunConfig(
    method="emd", teacher=ATTN_TEACHER,
    method_cfg=EMDConfig(K=4, step_eps=0.2, step_z=0.005, noise_cancellation=True, noise_levels="vp",
                         fake_warmup=200, optim_generator=_SID_OPT, optim_fake=_SID_OPT),
    train=TrainConfig(steps=1400, batch_size=32, ema_decay=0.999, extra_ema_sigma_rels=(0.05, 0.10),
                      clip_grad_norm=1.0, log_every=25, ckpt_every=50, snapshot_every=250, sample_every=500,
                      metric_every=0, seed=0, num_threads=2))

# The same EMD run with its fake score trained at the E/M-step's own noise levels (the VP draw) instead of the
# teacher's EDM draw: the run above trains D_psi on ln sigma ~ N(-1.2, 1.2^2) (~0.2% of draws above sigma = 10) while
# the E-step queries it at t ~ U[0.02, 0.98] on the VP schedule (~a third above 10), a candidate cause of its flat
# KID from 24 kimg. Not run yet: no number is claimed for it.
PRESETS["fmnist-emd-attn-fake-vp"] = replace(
    PRESETS["fmnist-emd-attn"], method_cfg=replace(PRESETS["fmnist-emd-attn"].method_cfg, fake_noise_levels="m_step"))


# Denoising Student from the attention teacher on 2 CPU cores: 15000 Heun-9 (17 NFE) teacher pairs (~0.18 s each on
# 2 cores, ~45 min), then the full-size student regressed onto them at batch 64 (the GPU recipe's optimiser, warm-up
# shortened to the shorter run); snapshots every 1000 iterations, each scored on the classifier metric, give the
# KID-vs-kimg curve. Reached: stopped by SIGTERM at iteration 2506 (160 kimg, 70 training minutes, ~1.7 s/iteration):
# Inception KID 28.47 +- 1.06 x1e-3, FID 47.36 at N=2000 (model-best; benchmarks/results/
# student_attn_denoising_student_cpu.md), as the GPU run with 50000 pairs and 320 kimg (28.22). To reproduce that
# budget: --set train.steps=2506.
PRESETS["fmnist-denoising-student-attn"] = RunConfig(
    method="denoising-student", teacher=ATTN_TEACHER,
    method_cfg=DenoisingStudentConfig(cache_dir="runs/pairs-attn-heun9-15k", n_pairs=15_000, holdout=500,
                                      cache_batch=250, teacher_sampler="heun", teacher_steps=9,
                                      teacher_schedule="karras", loss="l1",
                                      optim=OptimConfig(lr=2e-4, betas=(0.9, 0.98), warmup_steps=500)),
    train=TrainConfig(steps=6000, batch_size=64, ema_decay=0.999, extra_ema_sigma_rels=(), clip_grad_norm=10.0,
                      log_every=50, ckpt_every=250, snapshot_every=1000, sample_every=1000, metric_every=1000,
                      metric_samples=1000, seed=0, num_threads=2))


# The same Denoising Student recipe with targets from the teacher's converged sampler: Euler 16 on the Karras grid
# (16 NFE, Inception KID 7.80 for this teacher against 15.57 at Heun 9; benchmarks/results/teacher_nfe.md). Luhman &
# Luhman's student can only be as good as its pairs, so this isolates what the Heun-9 targets cost. Reached: 15000
# pairs in 41 minutes (~0.16 s each), then stopped by SIGTERM at iteration 2520 (161 kimg, 64 training minutes at
# ~1.5 s/iteration): Inception KID 14.99 +- 0.69 x1e-3, FID 32.45 at N=2000 (model-best; benchmarks/results/
# student_attn_denoising_student_euler16.md), against 28.47 with the Heun-9 pairs at the same budget. To reproduce
# that budget: --set train.steps=2520. Run again from nothing (pairs rebuilt, 48 minutes): held-out L1 identical to
# the bit at every logged point to iteration 2500; stopped by SIGTERM at 2754 (176 kimg): Inception KID 14.83 +- 0.70
# x1e-3, FID 32.19 at N=2000 (model-best; student_attn_denoising_student_euler16_2754it.md). Inception KID vs kimg:
# 17.25 at 64, 14.99 at 161, 14.83 at 176 (ds_kid_curve.md); a power law through them reaches 1.5x the teacher's
# best (11.7) near 850 kimg, ~6 hours on 2 CPU cores, if the slow curve holds.
# Resumed from 2754 with --set train.steps=6600 --set method_cfg.optim.decay=cosine (422 kimg, 121 more minutes):
# Inception KID 13.47 +- 0.69 x1e-3, FID 30.47 at N=2000 (1.73x; student_attn_denoising_student_euler16_6600it.md).
_DS_ATTN = PRESETS["fmnist-denoising-student-attn"]
PRESETS["fmnist-denoising-student-attn-euler16"] = replace(
    _DS_ATTN, method_cfg=replace(_DS_ATTN.method_cfg, cache_dir="runs/pairs-attn-euler16-15k", teacher_sampler="euler",
                                 teacher_steps=16))


# SFERD on 2 CPU cores with its attention-guided pairs from Euler 16 (the GPU recipe's Euler 8 is not converged for
# this teacher: Inception KID 10.16 at Euler 8 vs 6.63 at Euler 16 for the 1204-kimg teacher, teacher_nfe.md); the
# guidance (w 1.3, blur 3) and the student as in fmnist-sferd-attn-gpu, the training schedule of the CPU Denoising
# Student run above. Each guided teacher step costs two teacher passes: measured ~2.7 pairs/s on 2 AMD EPYC cores, so
# the 15000 pairs take ~92 minutes (resumable shard by shard), before ~64 minutes of training. Not run to the end yet:
# no number is claimed for it.
PRESETS["fmnist-sferd-attn-euler16"] = RunConfig(
    method="sferd", teacher=ATTN_TEACHER,
    method_cfg=replace(PRESETS["fmnist-sferd-attn-gpu"].method_cfg, cache_dir="runs/pairs-attn-euler16-ag1.3-15k",
                       n_pairs=15_000, cache_batch=250, teacher_steps=16,
                       optim=OptimConfig(lr=2e-4, warmup_steps=500)),
    train=_DS_ATTN.train)


# SiD continued once more on 2 CPU cores, from the then served student (now artifacts/fmnist-student-sid-4300, 293 kimg
# in all; its fake score and optimizer state were not kept): the generator starts from it, the fake score from the
# teacher again (150 iterations alone), the main EMA restarts from the student. Run after the teacher's best-NFE KID
# turned out to be 7.80 (Euler 16, benchmarks/results/teacher_attn_quality_euler16.md), not 15.57 (Heun 9).
# Reached: stopped by SIGTERM at iteration 1232 (1082 generator iterations, 39.4 kimg, 62 minutes at ~3.2 s/it on a
# slower host): main EMA Inception KID 10.19 +- 0.62 x1e-3, FID 29.22 at N=2000, worse than the student it started
# from (9.13; benchmarks/results/student_attn_sid_cpu_continue2.md): not shipped. To reproduce: --set train.steps=1232.
_SID_CONTINUE = PRESETS["fmnist-sid-attn-continue"]
PRESETS["fmnist-sid-attn-continue2"] = replace(
    _SID_CONTINUE,
    method_cfg=replace(_SID_CONTINUE.method_cfg, init_from="artifacts/fmnist-student-sid-4300.safetensors"),
    train=replace(_SID_CONTINUE.train, steps=1600, seed=3))

# SiD continued a third time on 2 CPU cores from the same student (9.13), with a longer fake-score warm-up: in
# continue2 the fake score, restarted from the teacher, had 150 iterations alone to learn the student's distribution
# and the student came out worse (10.19 after 39.4 kimg). Here 600 warm-up iterations (~1 s each), then generator
# iterations (~3.3 s each on the host that ran it), snapshots every 500 iterations.
# Reached: 4851 iterations (4251 generator iterations, 155.2 kimg, ~240 minutes at ~3 s/it), run in three processes
# (stopped by SIGTERM at 2351 and 2446, each resumed from the full saved state: generator, fake score, EMAs,
# optimizers, RNG). Main EMA Inception KID x1e-3 / FID at N=2000: 10.90 / 31.47 at iteration 1000 (the early drop of
# continue2, then recovered), 8.52 / 27.05 at 2351 (served for a while: artifacts/fmnist-student-sid-2351), 8.03 /
# 26.72 at 3500, 7.14 +- 0.39 / 25.50 at 4851, below the teacher's best KID (7.80 +- 0.48, Euler 16) and still
# falling (benchmarks/results/student_attn_sid_cpu_continue3*.md). The served student since
# (artifacts/fmnist-student.safetensors, fp16).
PRESETS["fmnist-sid-attn-continue3"] = replace(
    _SID_CONTINUE, method_cfg=replace(_SID_CONTINUE.method_cfg, fake_warmup=600,
                                      init_from="artifacts/fmnist-student-sid-4300.safetensors"),
    train=replace(_SID_CONTINUE.train, steps=4851, snapshot_every=500, seed=4))

# SiD onto the stronger teacher: the 1204-kimg attention teacher trained on one GPU (Inception KID 6.63 at Euler 16,
# 12.63 at Heun 9: benchmarks/results/teacher_nfe.md). The recipe of fmnist-sid-attn-continue2 (generator from the
# SiD student of 293 kimg, a student of the 532-kimg teacher; fake score from the new teacher, 150 iterations
# alone) with the new teacher. Not run yet: no number is claimed for it.
GPU_ATTN_TEACHER = "artifacts/fmnist-teacher-attn-gpu.safetensors"
PRESETS["fmnist-sid-attn-gpu-teacher"] = replace(
    PRESETS["fmnist-sid-attn-continue2"], teacher=GPU_ATTN_TEACHER,
    train=replace(PRESETS["fmnist-sid-attn-continue2"].train, steps=1200, seed=2))


# SiD²A (SiDA Sec. 4, "SiD-initialised SiDA"): SiDA fine-tuning a pre-distilled SiD generator, here the served SiD
# student (artifacts/fmnist-student.safetensors: continue3 at 4851 iterations, KID 7.14, sha256 1ddfc7c7d1db; if another
# student is served later, point init_from at the file whose sha256 the run's config.json records under init).
# Its fake score and optimizer state were not kept, so the fake score (and its encoder, the discriminator) starts from
# the teacher again and trains alone for 600 iterations, as in continue3; then the generator trains on
# 0.5 SiD + 0.5 GAN at once (the generator is already distilled, so no SiD-only stretch), with SiDA's alpha = 1.0.
# Reached: stopped by SIGTERM at iteration 2262 (1662 generator iterations, 72.4 kimg, 132 minutes at ~2 s per
# warm-up and ~4.3 s per full iteration on 2 AMD EPYC cores): main EMA Inception KID 7.63 +- 0.50 x1e-3, FID 26.94 at
# N=2000 (benchmarks/results/student_attn_sida_from_sid_2262it.md), 0.98x the teacher's best, not better than the SiD
# student it started from (7.14 +- 0.39): not served. To reproduce that budget: --set train.steps=2262.
PRESETS["fmnist-sida-attn-from-sid"] = replace(
    PRESETS["fmnist-sid-attn-continue3"], data="fashion-mnist",
    method="sida",
    method_cfg=replace(PRESETS["fmnist-sid-attn-continue3"].method_cfg, alpha=1.0, adversarial=True, lambda_adv=0.01,
                       adv_mix_after=0, init_from="artifacts/fmnist-student.safetensors"),
    train=replace(PRESETS["fmnist-sid-attn-continue3"].train, steps=4000, seed=5))


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]

