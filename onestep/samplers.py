"""Sigma schedules and samplers: plain functions of (denoiser, noise, sigmas).

Array-agnostic and torch-free: the same loops run a PyTorch denoiser (training, evaluation) and an
onnxruntime one inside the serving path (numpy), so a served N-step teacher is the evaluated one.
Every sampler takes UNIT noise z (from `onestep.noise.seeded_noise`) and starts from x = sigma_0 * z, so the
same seeds drive the teacher at any step count and the one-step student. Sigmas are a decreasing float64
numpy array ending in 0 (the last step returns the denoised image).
"""

from __future__ import annotations

import math
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


def sample_euler(denoiser: Denoiser, noise, sigmas, labels=None, progress: bool = False):
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM Eq. 3 with sigma(t)=t).

    With sigmas taken from a DDPM schedule this is deterministic DDIM (eta = 0). NFE = len(sigmas) - 1.
    """
    sigmas = [float(s) for s in sigmas]
    x = _as_f32(noise) * sigmas[0]
    steps = range(len(sigmas) - 1)
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

    NFE = 2 * (len(sigmas) - 1) - 1.
    """
    sigmas = [float(s) for s in sigmas]
    x = _as_f32(noise) * sigmas[0]
    steps = range(len(sigmas) - 1)
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


def sample_onestep(generator: Callable[..., Any], noise, labels=None):
    """The student: one network evaluation, G(z, labels)."""
    return generator(_as_f32(noise), labels)


SAMPLERS = {"euler": sample_euler, "ddim": sample_euler, "heun": sample_heun}


def nfe(sampler: str, steps: int) -> int:
    return {"euler": steps, "ddim": steps, "heun": max(1, 2 * steps - 1), "onestep": 1}[sampler]


def steps_for_nfe(sampler: str, target_nfe: int) -> int:
    """Largest step count whose NFE does not exceed target_nfe (Heun: (nfe + 1) // 2 steps)."""
    if sampler == "heun":
        return max(1, (target_nfe + 1) // 2)
    return max(1, target_nfe)


def sample(denoiser: Denoiser, noise, labels=None, sampler: str = "heun", steps: int = 18,
           schedule: str = "karras", sigma_min: float | None = None, sigma_max: float | None = None,
           rho: float = 7.0, progress: bool = False):
    """Front door: builds the schedule from the denoiser's sigma range and runs a sampler (no autograd)."""
    smin = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", 0.002)
    smax = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", 80.0)
    train_sigmas = getattr(denoiser, "train_sigmas", None)
    if train_sigmas is not None and not isinstance(train_sigmas, np.ndarray):
        train_sigmas = train_sigmas.detach().cpu().double().numpy()
    sigmas = make_sigmas(schedule, steps, smin, smax, rho, train_sigmas)
    fn = SAMPLERS.get(sampler)
    if fn is None:
        raise ValueError(f"unknown sampler {sampler!r} ({', '.join(SAMPLERS)})")
    if isinstance(noise, np.ndarray):
        return fn(denoiser, noise, sigmas, labels, progress)
    import torch

    with torch.no_grad():
        return fn(denoiser, noise, sigmas, labels, progress)
