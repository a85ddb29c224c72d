"""Sigma schedules and samplers: plain functions of (denoiser, noise, sigmas).

Array-agnostic and torch-free: the same loops run a PyTorch denoiser (training, evaluation) and an
onnxruntime one inside the serving path (numpy), so a served N-step teacher is the evaluated one.
Every sampler takes UNIT noise z (from `onestep.noise.seeded_noise`) and starts from x = sigma_0 * z, so the
same seeds drive the teacher at any step count and the one-step student. Sigmas are a decreasing float64
numpy array ending in 0 (the last step returns the denoised image).

A second, opt-in noise convention reproduces diffusers' DDIMPipeline exactly (`noise_convention="diffusers"`,
see `sample_ddim_diffusers`): the noise is DDIM's x_T, drawn with torch generators (`diffusers_noise`), and the
timesteps are those of DDIMScheduler.set_timesteps. The default convention stays ours (docs/teachers.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Denoiser = Callable[..., Any]


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """EDM Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, plus 0."""
    if n < 1:
        raise ValueError("need at least one step")
    if n == 1:
        return np.array([sigma_max, 0.0])
    i = np.arange(n, dtype=np.float64)
    s = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    s[0], s[-1] = sigma_max, sigma_min  # the ends exactly (the rho-th power of the rho-th root can be off by an ulp)
    return np.append(s, 0.0)


def loglinear_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> np.ndarray:
    """Uniform in log-sigma (the rho -> infinity limit of Eq. 5)."""
    if n == 1:
        return np.array([sigma_max, 0.0])
    return np.append(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)), 0.0)


def vp_train_sigmas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Sigmas of the discrete DDPM linear-beta schedule (Ho et al. 2020): sigma_t = sqrt((1-abar_t)/abar_t)."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


def ddim_sigmas(train_sigmas, n: int, spacing: str = "uniform") -> np.ndarray:
    """DDIM timestep selection over a discrete VP schedule, returned as sigmas (+ final 0).

    spacing: 'uniform' (Song et al. 2021, t_i = i*T/n), 'quadratic' (t_i ~ (i/n)^2 T, the choice of
    Luhman & Luhman 2021 for CIFAR-10), 'trailing' (Lin et al. 2024, includes t = T-1).
    """
    ts = np.asarray(train_sigmas, dtype=np.float64)
    T = len(ts)
    if n < 1 or n > T:
        raise ValueError(f"steps must be in [1, {T}]")
    if spacing == "uniform":
        idx = np.arange(0, n) * (T // n)
    elif spacing == "quadratic":
        idx = (np.linspace(0, np.sqrt(T * 0.8), n) ** 2).astype(np.int64)
    elif spacing == "trailing":
        idx = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r} (uniform, quadratic, trailing)")
    idx = np.sort(np.unique(np.clip(idx, 0, T - 1)))[::-1]
    return np.append(ts[idx], 0.0)


def make_sigmas(schedule: str, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                train_sigmas=None) -> np.ndarray:
    """Named schedules: karras | loglinear | ddim-uniform | ddim-quadratic | ddim-trailing."""
    if schedule == "karras":
        return karras_sigmas(n, sigma_min, sigma_max, rho)
    if schedule == "loglinear":
        return loglinear_sigmas(n, sigma_min, sigma_max)
    if schedule.startswith("ddim-"):
        ts = vp_train_sigmas() if train_sigmas is None else np.asarray(train_sigmas, dtype=np.float64)
        return ddim_sigmas(ts, n, schedule[5:])
    raise ValueError(f"unknown schedule {schedule!r}")


def _batch_sigma(value: float, x):
    """A (B,) float32 vector of `value` in x's array library (numpy or torch)."""
    if isinstance(x, np.ndarray):
        return np.full((x.shape[0],), value, dtype=np.float32)
    return x.new_full((x.shape[0],), value)


def _as_f32(noise):
    return noise.astype(np.float32, copy=False) if isinstance(noise, np.ndarray) else noise.float()


def _infinite_first_step(denoiser: Denoiser, z, sigmas, labels):
    """The step from sigma_0 = inf (zero-terminal-SNR schedules) to sigma_1, exactly.

    x_sigma = x0 + sigma z has no finite VE state at sigma = inf; its VP state x_sigma / sqrt(1 + sigma^2) -> z.
    The denoiser reads x as that VP state at sigma = inf (DiffusersEpsDenoiser), and the DDIM direction
    (x - D) / sigma -> z, so x_1 = D(z, inf) + sigma_1 z (DDIM with abar_T = 0: x_vp,1 = sqrt(abar_1) x0_hat +
    sqrt(1 - abar_1) z)."""
    x0 = denoiser(z, _batch_sigma(math.inf, z), labels)
    return x0 + sigmas[1] * z


def _start(denoiser: Denoiser, noise, sigmas, labels):
    """x at sigmas[i0] and the index i0 of the next step: x = sigma_0 z, or the exact infinite first step."""
    z = _as_f32(noise)
    if math.isinf(sigmas[0]):
        return _infinite_first_step(denoiser, z, sigmas, labels), 1
    return z * sigmas[0], 0


def sample_euler(denoiser: Denoiser, noise, sigmas, labels=None, progress: bool = False):
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM Eq. 3 with sigma(t)=t).

    With sigmas taken from a DDPM schedule this is deterministic DDIM (eta = 0). NFE = len(sigmas) - 1.
    A first sigma of inf (zero terminal SNR) is stepped exactly (`_infinite_first_step`).
    """
    sigmas = [float(s) for s in sigmas]
    x, i0 = _start(denoiser, noise, sigmas, labels)
    steps = range(i0, len(sigmas) - 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="euler", leave=False)
    for i in steps:
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, _batch_sigma(s, x), labels)) / s
        x = x + (s_next - s) * d
    return x


def sample_heun(denoiser: Denoiser, noise, sigmas, labels=None, progress: bool = False):
    """EDM Algorithm 1 (deterministic, S_churn = 0): Heun's 2nd-order method, Euler on the last step.

    NFE = 2 * (len(sigmas) - 1) - 1. A first sigma of inf (zero terminal SNR) is stepped exactly with the DDIM
    step (`_infinite_first_step`; no trapezoid exists over an infinite interval), one NFE fewer.
    """
    sigmas = [float(s) for s in sigmas]
    x, i0 = _start(denoiser, noise, sigmas, labels)
    steps = range(i0, len(sigmas) - 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="heun", leave=False)
    for i in steps:
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, _batch_sigma(s, x), labels)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:  # Algorithm 1, lines 9-11: second-order correction
            d_next = (x_next - denoiser(x_next, _batch_sigma(s_next, x), labels)) / s_next
            x_next = x + (s_next - s) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


@dataclass(frozen=True)
class Churn:
    """EDM Algorithm 2's stochasticity (Karras et al. 2022, Sec. 4 and Table 5): noise is added at every step
    whose sigma lies in [S_tmin, S_tmax], raising sigma by gamma = min(S_churn / N, sqrt(2) - 1), scaled by
    S_noise. Defaults: the range EDM uses for ImageNet-64 (S_tmin 0.05, S_tmax 50, S_noise 1.003; the paper pairs
    it with S_churn 40 to 80 at 256 steps); CIFAR-10's is S_tmin 0.01, S_tmax 1, S_noise 1.007, S_churn 30."""

    S_churn: float = 40.0
    S_tmin: float = 0.05
    S_tmax: float = 50.0
    S_noise: float = 1.003

    def __post_init__(self):
        if not (self.S_churn >= 0 and 0 <= self.S_tmin <= self.S_tmax and self.S_noise > 0):
            raise ValueError(f"invalid churn {self}: need S_churn >= 0, 0 <= S_tmin <= S_tmax, S_noise > 0")

    def gammas(self, sigmas) -> np.ndarray:
        """gamma_i for the N = len(sigmas) - 1 steps (Algorithm 2, line 4)."""
        n = len(sigmas) - 1
        g = min(self.S_churn / n, math.sqrt(2.0) - 1.0)
        return np.array([g if self.S_tmin <= s <= self.S_tmax else 0.0 for s in sigmas[:-1]])


def add_churn_arguments(ap) -> None:
    """--s-churn/--s-tmin/--s-tmax/--s-noise on an argparse parser, defaults those of `Churn`."""
    d = Churn()
    ap.add_argument("--s-churn", type=float, default=d.S_churn, help="heun-sde (EDM Algorithm 2): S_churn")
    ap.add_argument("--s-tmin", type=float, default=d.S_tmin, help="heun-sde: lowest sigma that gets churn")
    ap.add_argument("--s-tmax", type=float, default=d.S_tmax, help="heun-sde: highest sigma that gets churn")
    ap.add_argument("--s-noise", type=float, default=d.S_noise, help="heun-sde: noise inflation S_noise")


def churn_from_args(args) -> Churn:
    return Churn(args.s_churn, args.s_tmin, args.s_tmax, args.s_noise)


def churn_noise_shape(n_samples: int, steps: int, shape) -> tuple[int, ...]:
    """The shape of `sample_heun_sde`'s churn_noise: one unit-normal image per sample and step."""
    return (n_samples, steps, *shape)


def sample_heun_sde(denoiser: Denoiser, noise, sigmas, labels=None, progress: bool = False, churn_noise=None,
                    churn: Churn = Churn()):
    """EDM Algorithm 2 (stochastic): before step i, x_hat = x_i + sqrt(t_hat^2 - t_i^2) S_noise eps_i with
    t_hat = (1 + gamma_i) t_i (lines 4-6), then one Heun step from t_hat to t_{i+1} (lines 7-11).

    churn_noise holds eps_i per sample: shape (B, N, *image) with N = len(sigmas) - 1, eps_i = churn_noise[:, i].
    It is an argument, not drawn here, so that a sample depends on its own noise only (see
    `onestep.noise.seeded_noise_steps`, which continues each seed's stream). With S_churn = 0 this is
    `sample_heun` exactly. NFE = 2N - 1, as Heun.
    """
    sigmas = [float(s) for s in sigmas]
    if math.isinf(sigmas[0]):
        raise ValueError("sample_heun_sde needs a finite sigma_max (no churn from sigma = inf)")
    gammas = churn.gammas(sigmas)
    x = _as_f32(noise) * sigmas[0]
    if (gammas > 0).any():
        if churn_noise is None:
            raise ValueError("sample_heun_sde with S_churn > 0 needs churn_noise (B, steps, *image)")
        want = churn_noise_shape(x.shape[0], len(sigmas) - 1, x.shape[1:])
        if tuple(churn_noise.shape) != want:
            raise ValueError(f"churn_noise has shape {tuple(churn_noise.shape)}, expected {want}")
        churn_noise = _as_f32(churn_noise)
    steps = range(len(sigmas) - 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="heun-sde", leave=False)
    for i in steps:
        s, s_next = sigmas[i], sigmas[i + 1]
        s_hat = s * (1.0 + gammas[i])
        if gammas[i] > 0:  # Algorithm 2, lines 5-6
            x = x + math.sqrt(s_hat**2 - s**2) * churn.S_noise * churn_noise[:, i]
        d = (x - denoiser(x, _batch_sigma(s_hat, x), labels)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:  # lines 9-11: second-order correction
            d_next = (x_next - denoiser(x_next, _batch_sigma(s_next, x), labels)) / s_next
            x_next = x + (s_next - s_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


# --- diffusers' DDIMPipeline, reproduced -------------------------------------------------------------------
DDIM_DEFAULTS = {"num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True,
                 "clip_sample_range": 1.0, "set_alpha_to_one": True, "thresholding": False}


def ddim_timesteps(n: int, num_train_timesteps: int = 1000, timestep_spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
    """DDIMScheduler.set_timesteps, integer for integer (decreasing):
    leading:  t_i = i * (T // n) + steps_offset, i = n-1 .. 0
    trailing: t_i = round(T - i T / n) - 1,       i = 0 .. n-1
    linspace: t_i = round(linspace(0, T - 1, n))  reversed."""
    T = int(num_train_timesteps)
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in [1, {T}] (num_train_timesteps), got {n}")
    if timestep_spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + int(steps_offset)
    elif timestep_spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {timestep_spacing!r} is not one DDIMScheduler supports "
                         f"(leading, trailing, linspace)")
    if t.max() > T - 1 or t.min() < 0:
        raise ValueError(f"timesteps {t.tolist()} leave [0, {T - 1}] (steps_offset {steps_offset})")
    return t.copy()


def ddim_config(config: dict | None) -> dict:
    """The DDIMScheduler settings DDIM parity depends on, defaults filled in (DDIMScheduler's own defaults)."""
    cfg = dict(DDIM_DEFAULTS)
    cfg.update({k: v for k, v in (config or {}).items() if k in DDIM_DEFAULTS and v is not None})
    return cfg


def diffusers_ddim_plan(train_sigmas, config: dict | None, n: int):
    """(timesteps, sigma_t, sigma_prev) of DDIMPipeline with n steps.

    DDIMScheduler.step at timestep t steps to prev = t - T // n (whatever the spacing), with abar_prev =
    alphas_cumprod[prev] if prev >= 0 else (1 if set_alpha_to_one else alphas_cumprod[0]); the next call then
    reads that state at the next listed timestep. sigma = sqrt((1 - abar) / abar); sigma_prev is 0 for abar = 1.
    """
    cfg = ddim_config(config)
    ts = np.asarray(train_sigmas, dtype=np.float64)
    T = len(ts)
    if int(cfg["num_train_timesteps"]) != T:
        raise ValueError(f"scheduler num_train_timesteps {cfg['num_train_timesteps']} != {T} training sigmas")
    if cfg["thresholding"]:
        raise ValueError("DDIM dynamic thresholding (thresholding=True) is not reproduced; only clip_sample is")
    t = ddim_timesteps(n, T, cfg["timestep_spacing"], cfg["steps_offset"])
    prev = t - T // n
    final = 0.0 if cfg["set_alpha_to_one"] else float(ts[0])
    s_prev = np.where(prev >= 0, ts[np.clip(prev, 0, T - 1)], final)
    return t, ts[t], s_prev


def sample_ddim_diffusers(denoiser: Denoiser, noise, sigma_t, sigma_prev, labels=None,
                          clip_range: float | None = None, progress: bool = False):
    """DDIMPipeline (eta = 0) in VE form, from DDIM's x_T = noise (unit, VP). Returns the VP sample it returns
    (before its `/ 2 + 0.5` and clamp).

    Per step (Song et al. 2021, Eq. 12 with eta = 0, written with sigma = sqrt((1 - abar) / abar)):
      x = sqrt(1 + sigma_t^2) x_vp                          (VP -> VE at the listed timestep)
      D = D(x, sigma_t);  eps_hat = (x - D) / sigma_t         (the model's eps; not recomputed after clipping)
      x0_hat = clip(D, -r, r) if clip_sample else D
      x_prev = x0_hat + sigma_prev eps_hat;  x_vp = x_prev / sqrt(1 + sigma_prev^2)
    At sigma_t = inf (zero terminal SNR) x is x_vp itself and eps_hat = x_vp (the limit of (x - D) / sigma).
    """
    sigma_t = [float(s) for s in sigma_t]
    sigma_prev = [float(s) for s in sigma_prev]
    x_vp = _as_f32(noise)
    is_np = isinstance(x_vp, np.ndarray)
    steps = range(len(sigma_t))
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="ddim (diffusers)", leave=False)
    for i in steps:
        s, sp = sigma_t[i], sigma_prev[i]
        if math.isinf(s):
            x = x_vp
            d = denoiser(x, _batch_sigma(s, x), labels)
            eps = x_vp
        else:
            x = x_vp * math.sqrt(1.0 + s * s)
            d = denoiser(x, _batch_sigma(s, x), labels)
            eps = (x - d) / s
        if clip_range is not None:
            d = np.clip(d, -clip_range, clip_range) if is_np else d.clamp(-clip_range, clip_range)
        x_vp = (d + sp * eps) / math.sqrt(1.0 + sp * sp)
    return x_vp


def diffusers_noise(seeds, shape):
    """DDIM's x_T as DDIMPipeline draws it with one generator per sample: torch.randn((1, C, H, W),
    generator=torch.Generator().manual_seed(seed)) for each seed, concatenated (float32, CPU)."""
    import torch

    shape = tuple(int(d) for d in shape)
    seeds = [int(s) for s in seeds]
    if not seeds:
        return torch.zeros((0, *shape))
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def sample_onestep(generator: Callable[..., Any], noise, labels=None):
    """The student: one network evaluation, G(z, labels)."""
    return generator(_as_f32(noise), labels)


SAMPLERS = {"euler": sample_euler, "ddim": sample_euler, "heun": sample_heun}


def nfe(sampler: str, steps: int) -> int:
    return {"euler": steps, "ddim": steps, "heun": max(1, 2 * steps - 1), "heun-sde": max(1, 2 * steps - 1),
            "onestep": 1}[sampler]


def steps_for_nfe(sampler: str, target_nfe: int) -> int:
    """Largest step count whose NFE does not exceed target_nfe (Heun: (nfe + 1) // 2 steps)."""
    if sampler in ("heun", "heun-sde"):
        return max(1, (target_nfe + 1) // 2)
    return max(1, target_nfe)


NOISE_CONVENTIONS = ("ours", "diffusers")


def _check_finite(x):
    ok = bool(np.isfinite(x).all()) if isinstance(x, np.ndarray) else bool(x.isfinite().all())
    if not ok:
        raise FloatingPointError("sampling produced non-finite values (NaN or inf): the model or schedule diverged")
    return x


def sample(denoiser: Denoiser, noise, labels=None, sampler: str = "heun", steps: int = 18,
           schedule: str | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
           rho: float = 7.0, progress: bool = False, noise_convention: str = "ours", churn_noise=None,
           churn: Churn | None = None):
    """Front door: builds the schedule from the denoiser's sigma range and runs a sampler (no autograd).

    noise_convention="ours" (default): `noise` is unit noise z, x = sigma_0 z, `schedule` (default karras).
    noise_convention="diffusers": the denoiser's DDIMPipeline, exactly (DiffusersEpsDenoiser only): `noise` is
    DDIM's x_T (see `diffusers_noise`), x = sqrt(1 + sigma_0^2) x_T, timesteps, clip_sample and set_alpha_to_one
    from its scheduler config; sampler must be ddim (or euler, the same update) and `schedule` None. Returns
    what the pipeline computes before its `/ 2 + 0.5` and clamp.
    sampler="heun-sde" is EDM's stochastic sampler (`sample_heun_sde`): `churn` (default `Churn()`) and the
    per-sample `churn_noise` (B, steps, *image) go with it.
    A non-finite result raises FloatingPointError.
    """
    if noise_convention not in NOISE_CONVENTIONS:
        raise ValueError(f"unknown noise_convention {noise_convention!r} ({', '.join(NOISE_CONVENTIONS)})")
    if noise_convention == "diffusers":
        cfg = getattr(denoiser, "scheduler_config", None)
        if cfg is None or getattr(denoiser, "train_sigmas", None) is None:
            raise ValueError("noise_convention='diffusers' needs a diffusers teacher (a DiffusersEpsDenoiser with "
                             "its scheduler config)")
        if sampler not in ("ddim", "euler"):
            raise ValueError(f"noise_convention='diffusers' reproduces DDIM (eta 0): sampler must be ddim, "
                             f"not {sampler!r}")
        if schedule not in (None, "diffusers"):
            raise ValueError(f"noise_convention='diffusers' takes its timesteps from the scheduler config; "
                             f"do not pass schedule={schedule!r}")
        ts = denoiser.train_sigmas
        ts = ts if isinstance(ts, np.ndarray) else ts.detach().cpu().double().numpy()
        _, s_t, s_prev = diffusers_ddim_plan(ts, cfg, steps)
        c = ddim_config(cfg)
        clip = float(c["clip_sample_range"]) if c["clip_sample"] else None
        if isinstance(noise, np.ndarray):
            return _check_finite(sample_ddim_diffusers(denoiser, noise, s_t, s_prev, labels, clip, progress))
        import torch

        with torch.no_grad():
            return _check_finite(sample_ddim_diffusers(denoiser, noise, s_t, s_prev, labels, clip, progress))
    schedule = schedule or "karras"
    smin = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", 0.002)
    smax = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", 80.0)
    train_sigmas = getattr(denoiser, "train_sigmas", None)
    if train_sigmas is not None and not isinstance(train_sigmas, np.ndarray):
        train_sigmas = train_sigmas.detach().cpu().double().numpy()
    sigmas = make_sigmas(schedule, steps, smin, smax, rho, train_sigmas)
    if sampler == "heun-sde":
        def fn(d, z, sig, lab, prog):
            return sample_heun_sde(d, z, sig, lab, prog, churn_noise, churn or Churn())
    elif churn_noise is not None or churn is not None:
        raise ValueError(f"churn applies to sampler 'heun-sde' only, not {sampler!r}")
    else:
        fn = SAMPLERS.get(sampler)
    if fn is None:
        raise ValueError(f"unknown sampler {sampler!r} ({', '.join([*SAMPLERS, 'heun-sde'])})")
    if isinstance(noise, np.ndarray):
        return _check_finite(fn(denoiser, noise, sigmas, labels, progress))
    import torch

    with torch.no_grad():
        return _check_finite(fn(denoiser, noise, sigmas, labels, progress))
