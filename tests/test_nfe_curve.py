import json

from benchmarks.nfe_curve import main, merge


def _result(path, rows, sha="abc", n=100):
    path.write_text(json.dumps({"model": "m.safetensors", "model_sha256": sha, "n": n, "n_inception": n,
                                "baselines": {"inception": {"kid": 0.0001, "fid": 11.0}},
                                "rows": rows, "run": {"command": "python -m benchmarks.quality ..."}}))
    return str(path)


def _row(sampler, steps, nfe, kid, churn=None):
    r = {"sampler": sampler, "steps": steps, "nfe": nfe, "inception_kid": kid, "inception_kid_std": 0.001,
         "sample_seconds": 1.0}
    if churn:
        r["churn"] = churn
    return r


def test_merge_finds_the_best_point_and_keeps_churns_apart(tmp_path):
    c = {"S_churn": 2.5, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
    a = _result(tmp_path / "a.json", [_row("euler", 8, 8, 0.010), _row("heun", 9, 17, 0.012),
                                      {"sampler": "euler", "steps": 4, "nfe": 4, "classifier_kid": 3.0}])
    b = _result(tmp_path / "b.json", [_row("heun-sde", 9, 17, 0.009, c)])
    m = merge([("t", a), ("t", b)], "inception_kid")["t"]
    assert len(m["points"]) == 3  # the row without Inception is left out
    assert m["best"]["sampler"].startswith("heun-sde (S_churn 2.5") and m["best"]["value"] == 0.009
    assert main(["--result", f"t={a}", "--result", f"t={b}", "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o.md").read_text()
    assert "**9.00 ± 1.00**" in md and "17 NFE" in md and (tmp_path / "o.png").stat().st_size > 0


def test_merge_refuses_another_model_or_n(tmp_path, capsys):
    a = _result(tmp_path / "a.json", [_row("euler", 8, 8, 0.010)])
    b = _result(tmp_path / "b.json", [_row("euler", 4, 4, 0.020)], sha="other")
    assert main(["--result", f"t={a}", "--result", f"t={b}", "--out", str(tmp_path / "o")]) == 2
    assert "differ" in capsys.readouterr().err
    c = _result(tmp_path / "c.json", [_row("euler", 4, 4, 0.020)], n=50)
    assert main(["--result", f"t={a}", "--result", f"t={c}", "--out", str(tmp_path / "o")]) == 2
