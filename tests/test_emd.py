import json

import numpy as np
import torch

from onestep.config import override
from training.presets import get_preset
from training.run import build_method, train


def _method(tiny_artifacts, *sets):
    rc = override(get_preset("tiny-emd"), [f"teacher={json.dumps(str(tiny_artifacts['teacher_ckpt']))}", *sets])
    return rc, build_method(rc)


def _perturb(net, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_k0_is_exactly_the_diff_instruct_vsd_gradient(tiny_artifacts):
    _, m = _method(tiny_artifacts)
    _perturb(m.trainable["fake"])  # make the fake score differ from the teacher (else both gradients vanish)
    G = m.trainable["generator"]
    labels = torch.tensor([1, 7])
    torch.manual_seed(0)
    z, eps = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    sigma = torch.tensor([0.7, 3.0])

    z_k, disp, eps_k = m.e_step(z, eps, sigma, labels, K=0)
    assert torch.equal(z_k, z) and torch.equal(eps_k, eps) and disp.abs().max() == 0
    G.zero_grad()
    m.m_step_loss(z_k, disp, eps_k, sigma, labels)["loss"].backward()
    emd = [p.grad.clone() for p in G.parameters()]

    # Diff-Instruct / VSD: grad = E[ w (D_psi(x_t) - D_T(x_t))^T dg/dtheta ], x_t = g(z) + sigma eps
    G.zero_grad()
    x = G(z, labels)
    with torch.no_grad():
        x_t = x + sigma.reshape(-1, 1, 1, 1) * eps
        d_T, d_psi = m.teacher(x_t, sigma, labels), m.trainable["fake"](x_t, sigma, labels)
        w = 1 / (x - d_T).abs().mean((1, 2, 3), keepdim=True)
    (w * (d_psi - d_T) * x).sum().div(2).backward()
    vsd = [p.grad.clone() for p in G.parameters()]
    assert sum(float(g.abs().sum()) for g in vsd) > 0
    a, b = torch.cat([g.flatten() for g in emd]), torch.cat([g.flatten() for g in vsd])
    # the same gradient up to float re-association: relative error of the whole vector
    assert float((a - b).norm() / b.norm()) < 1e-4


def test_noise_cancellation_removes_exactly_the_injected_noise(tiny_artifacts):
    """At initialisation fake == teacher, so Delta = 0 and the eps-chain is e <- (1-g) e + sqrt(2g) xi. Replaying
    the same random draws, the displacement must be exactly the drift with the injected noise removed."""
    _, m = _method(tiny_artifacts)
    K, g = 3, m.emd_cfg.step_eps
    sigma, labels = torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    z, eps = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    for nc in (True, False):
        torch.manual_seed(5)
        _, disp, _ = m.e_step(z, eps, sigma, labels, K=K, noise_cancellation=nc)
        torch.manual_seed(5)
        e, noise = eps.clone(), torch.zeros_like(eps)
        for _ in range(K):
            xi_e = torch.randn_like(eps)
            torch.randn_like(z)  # the z-chain's draw
            e = e + g * (0 - e) + (2 * g) ** 0.5 * xi_e
            noise = noise + (2 * g) ** 0.5 * xi_e
        expected = e - eps - noise if nc else e - eps
        torch.testing.assert_close(disp, expected, atol=1e-5, rtol=1e-5)
    assert float(expected.std()) > 0.5  # without cancellation the displacement is dominated by noise


def test_emd_trains_finite_teacher_frozen(tiny_artifacts, tmp_path):
    rc, _ = _method(tiny_artifacts, "train.steps=6")
    res = train(rc, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    gen = [r["generator/loss"] for r in rows if "generator/loss" in r]
    assert gen and np.all(np.isfinite(gen))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["method"] == "emd" and meta["method_config"]["K"] == 2
    from exporters.onnx_export import export_onnx

    assert export_onnx(res["model"], tmp_path / "emd.onnx")["parity"]["max_abs_err"] <= 1e-4
