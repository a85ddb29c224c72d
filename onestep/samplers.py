"""Sigma schedules and samplers: plain functions of (denoiser, noise, sigmas).

Every sampler takes UNIT noise z (the output of `onestep.noise.seeded_noise`) and starts from
x = sigma_0 * z, so the same seeds drive the teacher at any step count and the one-step student.
Sigmas are a decreasing 1-d tensor ending in 0 (the final step returns the denoised image).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

Denoiser = Callable[..., torch.Tensor]


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, plus 0."""
    if n < 1:
        raise ValueError("need at least one step")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def loglinear_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform in log-sigma (the rho -> infinity limit of Eq. 5)."""
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    s = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


def vp_train_sigmas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Sigmas of the discrete DDPM linear-beta schedule (Ho et al. 2020): sigma_t = sqrt((1-abar_t)/abar_t)."""
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    return np.sqrt((1 - abar) / abar)


def ddim_sigmas(train_sigmas, n: int, spacing: str = "uniform") -> torch.Tensor:
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
        idx = np.unique((np.linspace(0, np.sqrt(T * 0.8), n) ** 2).astype(np.int64))
    elif spacing == "trailing":
        idx = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r} (uniform, quadratic, trailing)")
    idx = np.sort(np.unique(np.clip(idx, 0, T - 1)))[::-1]
    return torch.cat([torch.as_tensor(ts[idx].copy()), torch.zeros(1, dtype=torch.float64)])


def make_sigmas(schedule: str, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                train_sigmas=None) -> torch.Tensor:
    """Named schedules: karras | loglinear | ddim-uniform | ddim-quadratic | ddim-trailing."""
    if schedule == "karras":
        return karras_sigmas(n, sigma_min, sigma_max, rho)
    if schedule == "loglinear":
        return loglinear_sigmas(n, sigma_min, sigma_max)
    if schedule.startswith("ddim-"):
        return ddim_sigmas(vp_train_sigmas() if train_sigmas is None else train_sigmas, n, schedule[5:])
    raise ValueError(f"unknown schedule {schedule!r}")


def _step_sigma(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(device=x.device, dtype=torch.float32).expand(x.shape[0])


@torch.no_grad()
def sample_euler(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, labels=None,
                 progress: bool = False) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM Eq. 3 with sigma(t)=t).

    With sigmas taken from a DDPM schedule this is deterministic DDIM (eta = 0). NFE = len(sigmas) - 1.
    """
    x = noise.to(torch.float32) * float(sigmas[0])
    steps = range(len(sigmas) - 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="euler", leave=False)
    for i in steps:
        s, s_next = sigmas[i], sigmas[i + 1]
        x0_hat = denoiser(x, _step_sigma(s, x), labels)
        d = (x - x0_hat) / float(s)
        x = x + (float(s_next) - float(s)) * d
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, labels=None,
                progress: bool = False) -> torch.Tensor:
    """EDM Algorithm 1 (deterministic, S_churn = 0): Heun's 2nd-order method, Euler on the last step.

    NFE = 2 * (len(sigmas) - 1) - 1.
    """
    x = noise.to(torch.float32) * float(sigmas[0])
    steps = range(len(sigmas) - 1)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc="heun", leave=False)
    for i in steps:
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoiser(x, _step_sigma(sigmas[i], x), labels)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:  # Algorithm 1, lines 9-11: second-order correction
            d_next = (x_next - denoiser(x_next, _step_sigma(sigmas[i + 1], x), labels)) / s_next
            x_next = x + (s_next - s) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x


@torch.no_grad()
def sample_onestep(generator: Callable[..., torch.Tensor], noise: torch.Tensor, labels=None) -> torch.Tensor:
    """The student: one network evaluation, G(z, labels)."""
    return generator(noise.to(torch.float32), labels)


def nfe(sampler: str, steps: int) -> int:
    return {"euler": steps, "heun": max(1, 2 * steps - 1), "onestep": 1}[sampler]


def steps_for_nfe(sampler: str, target_nfe: int) -> int:
    """Largest step count whose NFE does not exceed target_nfe (Heun: (nfe + 1) // 2 steps)."""
    if sampler == "heun":
        return max(1, (target_nfe + 1) // 2)
    return max(1, target_nfe)


def sample(denoiser: Denoiser, noise: torch.Tensor, labels=None, sampler: str = "heun", steps: int = 18,
           schedule: str = "karras", sigma_min: float | None = None, sigma_max: float | None = None,
           rho: float = 7.0, progress: bool = False) -> torch.Tensor:
    """Convenience front door: builds the schedule from the denoiser's sigma range and runs a sampler."""
    smin = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", 0.002)
    smax = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", 80.0)
    sigmas = make_sigmas(schedule, steps, smin, smax, rho, getattr(denoiser, "train_sigmas", None))
    fn = {"euler": sample_euler, "ddim": sample_euler, "heun": sample_heun}.get(sampler)
    if fn is None:
        raise ValueError(f"unknown sampler {sampler!r} (euler, ddim, heun)")
    return fn(denoiser, noise, sigmas, labels, progress)
