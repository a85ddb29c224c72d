import json

import numpy as np
import pytest
import torch

from benchmarks.heldout_loss import compare, heldout_losses, main, sigma_levels
from conftest import needs_fmnist


def test_sigma_levels_are_the_mid_quantiles_of_the_edm_lognormal():
    # exp(-1.2 -/+ 1.2 * 0.6744898) and exp(-1.2 + 1.2 * (-0.9674216, 0, 0.9674216)), written down once
    np.testing.assert_allclose(sigma_levels(2), [0.134071, 0.676642], rtol=1e-5)
    np.testing.assert_allclose(sigma_levels(3), [0.094335, 0.301194, 0.961660], rtol=1e-5)


def test_losses_of_known_denoisers():
    torch.manual_seed(1)
    y = torch.rand(6, 1, 4, 4) * 2 - 1
    sig = np.array([0.2, 1.5])
    sd = 0.5
    lam = (sig**2 + sd**2) / (sig * sd) ** 2
    # the perfect denoiser (returns the clean image) scores 0 at every level
    clean = lambda x, s, lb: y[: len(x)]  # noqa: E731
    assert np.all(heldout_losses(clean, y, None, sig, batch=16) == 0)
    # the zero denoiser scores lambda(sigma) * mean(y^2), whatever the noise
    zero = lambda x, s, lb: torch.zeros_like(x)  # noqa: E731
    np.testing.assert_allclose(heldout_losses(zero, y, None, sig, batch=4),
                               lam[None, :] * (y**2).flatten(1).mean(1).numpy()[:, None], rtol=1e-5)
    # the identity scores lambda * sigma^2 * mean(n^2): about (sigma^2 + sd^2) / sd^2, and the noise is fixed by
    # the seed, the same for every call and any batch size
    ident = lambda x, s, lb: x  # noqa: E731
    a = heldout_losses(ident, y, None, sig, seed=3, batch=4)
    b = heldout_losses(ident, y, None, sig, seed=3, batch=16)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a.mean(0), (sig**2 + sd**2) / sd**2, rtol=0.35)
    assert not np.allclose(a, heldout_losses(ident, y, None, sig, seed=4))


@needs_fmnist
def test_compare_pairs_models_on_the_same_inputs(tiny_artifacts, tmp_path):
    ckpt = str(tiny_artifacts["teacher_ckpt"])
    res = compare([("a", ckpt), ("b", ckpt)], n=8, levels=2)
    a, b = res["rows"]
    assert a["loss"] == b["loss"] and b["diff_vs_first"] == 0.0 and a["loss"] > 0
    assert main(["--model", f"a={ckpt}", "--n", "8", "--levels", "2", "--out", str(tmp_path / "h")]) == 0
    saved = json.loads((tmp_path / "h.json").read_text())
    assert saved["rows"][0]["loss"] == pytest.approx(a["loss"])
    assert "| a |" in (tmp_path / "h.md").read_text()
    with pytest.raises(SystemExit):
        main(["--model", "no-equals-sign", "--out", str(tmp_path / "x")])
