import json

import numpy as np
import pytest
import torch

from onestep.config import override
from training.methods.emd import EMD, EMDConfig, vp_sigma
from training.presets import get_preset
from training.run import train

LABELS = torch.tensor([1, 7])
SIGMA = torch.tensor([0.7, 3.0])


def _emd(teacher, **kw):
    return EMD(EMDConfig(**kw), teacher)


def _perturb(net, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _inputs(seed=0):
    torch.manual_seed(seed)
    return torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)


def _score_diff(m, z, eps):
    """Delta = (D_T - D_psi)(x_t) / sigma^2 at x_t = g(z) + sigma eps, and J_g(z)^T Delta, by hand."""
    s = SIGMA.reshape(-1, 1, 1, 1)
    z = z.clone().requires_grad_(True)
    x = m.trainable["generator"](z, LABELS)
    with torch.no_grad():
        x_t = x + s * eps
        delta = (m.teacher(x_t, SIGMA, LABELS) - m.trainable["fake"](x_t, SIGMA, LABELS)) / s**2
    (jt_delta,) = torch.autograd.grad(x, z, grad_outputs=delta)
    return delta, jt_delta


@pytest.mark.parametrize("nc", [True, False])
def test_one_langevin_step_by_hand_with_a_nonzero_score_difference(tiny_denoiser, nc):
    """One step of the reparametrised chain (EMD Sec. 3, reparametrised sampling) recomputed by hand from the same draws:
    eps_1 = eps_0 + g_e (sigma Delta - eps_0) + sqrt(2 g_e) n_e, z_1 = z_0 + g_z (J^T Delta - z_0) + sqrt(2 g_z) n_z.
    With noise cancellation, exactly the drift remains: d_1 = g_e sigma Delta and z_1 = z_0 + g_z (J^T Delta - z_0)."""
    m = _emd(tiny_denoiser)
    _perturb(m.trainable["fake"])
    ge, gz = m.emd_cfg.step_eps, m.emd_cfg.step_z
    z, eps = _inputs()
    delta, jt_delta = _score_diff(m, z, eps)
    s = SIGMA.reshape(-1, 1, 1, 1)
    assert float((s * delta).abs().mean()) > 1e-3  # the fake score differs from the teacher
    torch.manual_seed(5)
    chain = m.e_step(z, eps, SIGMA, LABELS, K=1, noise_cancellation=nc)
    torch.manual_seed(5)
    xi_e, xi_z = torch.randn_like(eps), torch.randn_like(z)
    eps1 = eps + ge * (s * delta - eps) + (2 * ge) ** 0.5 * xi_e
    z1 = z + gz * (jt_delta - z) + (2 * gz) ** 0.5 * xi_z
    if nc:
        torch.testing.assert_close(chain.disp, ge * s * delta, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(chain.z, z + gz * (jt_delta - z), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(chain.eps, eps1 - (2 * ge) ** 0.5 * xi_e, atol=1e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(chain.disp, eps1 - eps, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(chain.z, z1, atol=1e-5, rtol=1e-4)


def test_noise_cancellation_removes_the_injected_noise_exactly(tiny_denoiser):
    """With the fake score equal to the teacher (Delta = 0) the chain is pure noise plus the linear pull to 0:
    after noise cancellation the eps displacement is exactly 0 and z is exactly (1 - g_z)^K z_0, whatever the
    draws; without it the displacement is dominated by the injected noise."""
    m = _emd(tiny_denoiser)
    K, gz = 3, m.emd_cfg.step_z
    z, eps = _inputs(1)
    for seed in (5, 6):
        torch.manual_seed(seed)
        chain = m.e_step(z, eps, SIGMA, LABELS, K=K, noise_cancellation=True)
        assert float(chain.disp.abs().max()) < 1e-5
        torch.testing.assert_close(chain.z, (1 - gz) ** K * z, atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    raw = m.e_step(z, eps, SIGMA, LABELS, K=K, noise_cancellation=False)
    assert float(raw.disp.std()) > 0.5


def _vsd_gradient(m, z, eps):
    """Diff-Instruct / VSD: grad = E[w (D_psi(x_t) - D_T(x_t))^T dg/dtheta], x_t = g(z) + sigma eps, with DMD's
    weight w = 1 / mean|g - D_T(x_t)|."""
    G = m.trainable["generator"]
    G.zero_grad()
    x = G(z, LABELS)
    with torch.no_grad():
        x_t = x + SIGMA.reshape(-1, 1, 1, 1) * eps
        d_T, d_psi = m.teacher(x_t, SIGMA, LABELS), m.trainable["fake"](x_t, SIGMA, LABELS)
        w = 1 / (x - d_T).abs().mean((1, 2, 3), keepdim=True)
    (w * (d_psi - d_T) * x).sum().div(2).backward()
    return torch.cat([p.grad.flatten() for p in G.parameters()])


def _emd_gradient(m, chain):
    G = m.trainable["generator"]
    G.zero_grad()
    m.m_step_loss(chain, SIGMA, LABELS)["loss"].backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in G.parameters()])


def test_one_unit_step_on_eps_with_noise_cancellation_is_the_diff_instruct_vsd_gradient(tiny_denoiser):
    """EMD Sec. 3 (relation to mode-seeking KL): a single Langevin step on eps (K = 1, step size 1, z not updated) with noise cancellation
    makes the M-step gradient the mode-seeking (Diff-Instruct / VSD) gradient; K = 0 makes it zero."""
    m = _emd(tiny_denoiser)
    _perturb(m.trainable["fake"])
    z, eps = _inputs(2)
    vsd = _vsd_gradient(m, z, eps)
    assert float(vsd.abs().sum()) > 0
    torch.manual_seed(7)
    emd = _emd_gradient(m, m.e_step(z, eps, SIGMA, LABELS, K=1, step_eps=1.0, step_z=0.0, noise_cancellation=True))
    assert float((emd - vsd).norm() / vsd.norm()) < 1e-4
    # K = 0: nothing moved, nothing learned (the M-step target is the sample itself)
    emd0 = _emd_gradient(m, m.e_step(z, eps, SIGMA, LABELS, K=0))
    assert float(emd0.abs().max()) == 0.0
    # the option that adds D_T - D_psi to the target makes K = 0 the VSD gradient instead
    m_old = _emd(tiny_denoiser, vsd_term=True)
    m_old.load_state_dict(m.state_dict())
    emd_old = _emd_gradient(m_old, m_old.e_step(z, eps, SIGMA, LABELS, K=0))
    assert float((emd_old - vsd).norm() / vsd.norm()) < 1e-4


def test_noise_levels_follow_the_vp_range(tiny_denoiser):
    """Default noise levels: t ~ U[0.02, 0.98] on the VP schedule (sigma in [0.078, 80] after the teacher's clamp);
    'karras' keeps SiD's grid (down to sigma_min = 0.002)."""
    m = _emd(tiny_denoiser)
    torch.manual_seed(0)
    s = m._m_sigma(20000, torch.device("cpu"))
    lo = float(vp_sigma(torch.tensor(0.02)))
    assert 0.07 < lo < 0.085
    assert float(s.min()) >= lo - 1e-6 and float(s.max()) <= 80.0
    assert float((s > 10).float().mean()) > 0.25  # VP spends about a third of t above sigma = 10
    k = _emd(tiny_denoiser, noise_levels="karras")._m_sigma(20000, torch.device("cpu"))
    assert float(k.min()) < 0.01 and float(k.max()) < 25


def test_fake_score_noise_levels(tiny_denoiser):
    """'edm': the fake score trains on the teacher's draw (few sigma above 10); 'm_step': on the E/M-step's own."""
    dev = torch.device("cpu")
    torch.manual_seed(0)
    edm = _emd(tiny_denoiser)._fake_sigma(20000, dev)
    assert float((edm > 10).float().mean()) < 0.01
    torch.manual_seed(0)
    m = _emd(tiny_denoiser, fake_noise_levels="m_step")
    fake = m._fake_sigma(20000, dev)
    torch.manual_seed(0)
    torch.testing.assert_close(fake, m._m_sigma(20000, dev), atol=0, rtol=0)
    assert float((fake > 10).float().mean()) > 0.25
    with pytest.raises(ValueError, match="fake_noise_levels"):
        _emd(tiny_denoiser, fake_noise_levels="uniform")


def test_emd_trains_finite_and_exports(tiny_artifacts, tmp_path):
    rc = override(get_preset("tiny-emd"), [f"teacher={json.dumps(str(tiny_artifacts['teacher_ckpt']))}",
                                           "train.steps=6"])
    res = train(rc, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    gen = [r["generator/loss"] for r in rows if "generator/loss" in r]
    assert gen and np.all(np.isfinite(gen))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["method"] == "emd" and meta["method_config"]["K"] == 2
    from exporters.onnx_export import export_onnx

    assert export_onnx(res["model"], tmp_path / "emd.onnx")["parity"]["max_abs_err"] <= 1e-4
