import math

import numpy as np
import pytest
import torch

from onestep.denoiser import DiffusersEpsDenoiser, OneStepGenerator
from onestep.noise import seeded_noise
from onestep.samplers import (ddim_sigmas, karras_sigmas, make_sigmas, nfe, sample, sample_euler, sample_heun,
                              sample_onestep, steps_for_nfe, vp_train_sigmas)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser for data ~ N(0, s_d^2 I): D(x, sigma) = x s_d^2 / (s_d^2 + sigma^2)."""

    def __init__(self, sd=0.5):
        super().__init__()
        self.sd = sd

    def forward(self, x, sigma, labels=None):
        s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)
        return x * self.sd**2 / (self.sd**2 + s**2)


def test_karras_schedule_values():
    s = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert len(s) == 19 and s[-1] == 0
    assert math.isclose(float(s[0]), 80.0) and math.isclose(float(s[-2]), 0.002, rel_tol=1e-9)
    # EDM Eq. 5 at i = 9 of 18, computed by hand
    mid = (80 ** (1 / 7) + 9 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(float(s[9]), mid, rel_tol=1e-12)
    assert np.all(s[:-1] > s[1:])


def test_ddim_spacings():
    ts = vp_train_sigmas()
    assert math.isclose(ts[0], math.sqrt(1e-4 / (1 - 1e-4)), rel_tol=1e-6)
    for spacing in ("uniform", "quadratic", "trailing"):
        s = ddim_sigmas(ts, 10, spacing)
        assert len(s) == 11 and s[-1] == 0 and np.all(s[:-2] > s[1:-1])
    assert math.isclose(float(ddim_sigmas(ts, 10, "trailing")[0]), ts[-1])
    with pytest.raises(ValueError):
        make_sigmas("nope", 4)


def test_heun_beats_euler_on_exact_ode():
    """For Gaussian data the PF-ODE is solvable: x(0) = x(sigma_max) * s_d / sqrt(s_d^2 + sigma_max^2)."""
    D = GaussianDenoiser(0.5)
    z = torch.from_numpy(seeded_noise([0, 1], (1, 2, 2)))
    exact = z * 80.0 * 0.5 / math.sqrt(0.25 + 80.0**2)

    def err(fn, n):
        return (fn(D, z, karras_sigmas(n, 0.002, 80.0)) - exact).abs().max().item()

    assert err(sample_heun, 64) < err(sample_euler, 64) / 5
    assert err(sample_heun, 64) < 5e-3
    # first order vs second order: doubling the steps halves Euler's error and quarters Heun's
    assert 1.6 < err(sample_euler, 64) / err(sample_euler, 128) < 2.5
    assert 3.0 < err(sample_heun, 64) / err(sample_heun, 128) < 5.0


def test_numpy_and_torch_run_the_same_loop():
    D = GaussianDenoiser(0.5)
    z = seeded_noise([4], (1, 2, 2))
    sig = karras_sigmas(5)
    np_out = sample_heun(lambda x, s, l: x * 0.25 / (0.25 + s.reshape(-1, 1, 1, 1) ** 2), z, sig)
    torch.testing.assert_close(torch.from_numpy(np_out), sample_heun(D, torch.from_numpy(z), sig), atol=1e-5, rtol=0)


def test_nfe_bookkeeping():
    assert nfe("heun", 18) == 35 and nfe("euler", 7) == 7 and nfe("onestep", 1) == 1
    assert steps_for_nfe("heun", 35) == 18


def test_edm_preconditioning(tiny_denoiser):
    x = torch.randn(2, 1, 32, 32)
    y = torch.tensor([1, 2])
    out = tiny_denoiser(x, 0.5, y)
    assert out.shape == x.shape
    # c_skip -> 1, c_out -> 0 as sigma -> 0: D(x, sigma) -> x
    torch.testing.assert_close(tiny_denoiser(x, 1e-6, y), x, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="labels must lie"):
        tiny_denoiser(x, 0.5, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="pass labels"):
        tiny_denoiser(x, 0.5, None)
    with pytest.raises(ValueError, match="entries for a batch"):
        tiny_denoiser(x, torch.tensor([1.0, 2.0, 3.0]), y)


def test_sampling_is_batch_invariant(tiny_denoiser):
    shape = (1, 32, 32)
    alone = sample(tiny_denoiser, torch.from_numpy(seeded_noise([7], shape)), torch.tensor([3]), "heun", 3)
    batched = sample(tiny_denoiser, torch.from_numpy(seeded_noise([1, 7, 9], shape)), torch.tensor([0, 3, 5]),
                     "heun", 3)
    # float32 convolutions may block differently by batch size; the bound is 40x below one uint8 level (2/255)
    torch.testing.assert_close(alone[0], batched[1], atol=2e-4, rtol=0)


def test_one_step_generator(tiny_denoiser):
    G = OneStepGenerator(tiny_denoiser, 2.5)
    z = torch.from_numpy(seeded_noise([3], (1, 32, 32)))
    torch.testing.assert_close(sample_onestep(G, z, torch.tensor([4])),
                               tiny_denoiser(2.5 * z, 2.5, torch.tensor([4])))
    with pytest.raises(ValueError):
        OneStepGenerator(tiny_denoiser, 0.0)


def test_diffusers_adapter_matches_vp_formula(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, add_attention=False)
    sched = DDPMScheduler(num_train_timesteps=1000)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    sched.save_pretrained(tmp_path / "pipe" / "scheduler")
    D = DiffusersEpsDenoiser.from_pretrained(tmp_path / "pipe").eval()
    t = 500
    abar = sched.alphas_cumprod[t]
    sigma = float(((1 - abar) / abar).sqrt())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        got = D(x, sigma)
        eps = unet(x / math.sqrt(1 + sigma**2), torch.tensor([float(t)] * 2)).sample
    torch.testing.assert_close(got, x - sigma * eps, atol=1e-4, rtol=1e-4)
    assert abs(float(D.sigma_to_t(torch.tensor([sigma]))) - t) < 1e-3
    # the adapter plugs into the samplers unchanged (DDIM spacing over its own training sigmas)
    out = sample(D, torch.randn(1, 1, 8, 8), None, "ddim", 5, "ddim-uniform")
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(FileNotFoundError):
        DiffusersEpsDenoiser.from_pretrained(tmp_path / "missing")


# --- EDM Algorithm 2 (stochastic sampler) ----------------------------------------------------------------------
def test_churn_gammas_follow_algorithm_2():
    from onestep.samplers import Churn

    sig = karras_sigmas(10, 0.002, 80.0)
    g = Churn(S_churn=3.0, S_tmin=0.05, S_tmax=50.0).gammas(sig)
    assert len(g) == 10
    inside = (sig[:-1] >= 0.05) & (sig[:-1] <= 50.0)
    np.testing.assert_allclose(g[inside], 0.3)  # S_churn / N, under the cap sqrt(2) - 1
    assert (g[~inside] == 0).all() and inside.any() and (~inside).any()
    assert np.allclose(Churn(S_churn=100.0, S_tmin=0.0, S_tmax=1e9).gammas(sig), math.sqrt(2) - 1)  # the cap
    with pytest.raises(ValueError):
        Churn(S_churn=-1.0)
    with pytest.raises(ValueError):
        Churn(S_tmin=2.0, S_tmax=1.0)


def test_heun_sde_without_churn_is_heun():
    from onestep.samplers import Churn, sample_heun_sde

    D = GaussianDenoiser(0.5)
    z = torch.from_numpy(seeded_noise([0, 1, 2], (1, 4, 4)))
    sig = karras_sigmas(7)
    torch.testing.assert_close(sample_heun_sde(D, z, sig, churn=Churn(S_churn=0.0)), sample_heun(D, z, sig),
                               rtol=0, atol=0)


def test_heun_sde_keeps_the_gaussian_marginal():
    """Exact denoiser of N(0, 0.5^2): churn re-noises x_t to sigma_hat exactly, so the samples keep the data's
    standard deviation up to the discretisation error (first order in the step with churn: 0.024 at 32 steps, 0.004
    at 128 here); dropping the noise (std ~0) or inflating it (S_noise 1.1: std 0.55) would not."""
    from onestep.samplers import Churn, sample_heun_sde

    D = GaussianDenoiser(0.5)
    gen = torch.Generator().manual_seed(0)
    n, steps = 4096, 128
    z = torch.randn(n, 1, 4, 4, generator=gen)
    eps = torch.randn(n, steps, 1, 4, 4, generator=gen)
    churn = Churn(S_churn=80.0, S_tmin=0.0, S_tmax=1e9, S_noise=1.0)
    x = sample_heun_sde(D, z, karras_sigmas(steps, 0.002, 80.0), churn_noise=eps, churn=churn)
    assert abs(x.std().item() - 0.5) < 0.008
    ode = sample_heun(D, z, karras_sigmas(steps, 0.002, 80.0))
    assert (x - ode).abs().mean() > 0.1  # the churn really moved the samples


def test_heun_sde_same_seed_same_image_in_any_batch():
    from onestep.noise import seeded_noise_steps
    from onestep.samplers import Churn

    D = GaussianDenoiser(0.5)
    seeds, shape, steps = [3, 7, 11], (1, 4, 4), 6
    churn = Churn(S_churn=10.0, S_tmin=0.0, S_tmax=100.0)

    def run(s):
        return sample(D, torch.from_numpy(seeded_noise(s, shape)), None, "heun-sde", steps,
                      churn_noise=torch.from_numpy(seeded_noise_steps(s, shape, steps)), churn=churn)

    batch = run(seeds)
    for i, s in enumerate(seeds):
        torch.testing.assert_close(run([s])[0], batch[i], rtol=0, atol=0)
    assert nfe("heun-sde", steps) == 2 * steps - 1 and steps_for_nfe("heun-sde", 11) == 6


def test_seeded_noise_steps_continue_the_seed_stream():
    from onestep.noise import seeded_noise_steps

    shape = (1, 4, 4)
    full = seeded_noise([5, 9], (4, *shape))
    np.testing.assert_array_equal(full[:, 0], seeded_noise([5, 9], shape))
    np.testing.assert_array_equal(seeded_noise_steps([5, 9], shape, 3), full[:, 1:])
    with pytest.raises(ValueError):
        seeded_noise_steps([5], shape, -1)


def test_heun_sde_rejects_missing_or_misshapen_noise():
    from onestep.samplers import Churn, sample_heun_sde

    D = GaussianDenoiser(0.5)
    z = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="needs churn_noise"):
        sample_heun_sde(D, z, karras_sigmas(4))
    with pytest.raises(ValueError, match="expected"):
        sample_heun_sde(D, z, karras_sigmas(4), churn_noise=torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(ValueError, match="finite sigma_max"):
        sample_heun_sde(D, z, np.array([math.inf, 1.0, 0.0]), churn=Churn(S_churn=0.0))
    with pytest.raises(ValueError, match="applies to sampler"):
        sample(D, z, None, "heun", 4, churn=Churn())
