import json

from benchmarks.training_curve import main, read_curve


def _run(tmp_path, lines):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"batch_size": 64}}))
    (run / "log.jsonl").write_text("\n".join(lines))
    return run


def test_curve_reads_metric_lines_in_kimg_with_a_warm_start_offset(tmp_path):
    run = _run(tmp_path, [json.dumps({"it": 10, "den/loss": 0.3}),
                          json.dumps({"it": 500, "metric/classifier_kid": 12.5, "metric/n": 500}),
                          json.dumps({"it": 1000, "metric/classifier_kid": 9.0}),
                          json.dumps({"it": 1000, "metric/classifier_kid": 5.5}),  # resumed: the last one counts
                          '{"it": 1250, "metric/classif'])  # cut by a kill
    c = read_curve(run, "classifier_kid", kimg0=128)
    assert [(p["it"], p["kimg"], p["value"]) for p in c["points"]] == [(500, 160.0, 12.5), (1000, 192.0, 5.5)]


def test_a_full_key_such_as_the_held_out_loss_is_read_as_it_is(tmp_path):
    run = _run(tmp_path, [json.dumps({"it": 250, "val/loss": 0.08}), json.dumps({"it": 250, "metric/val": 1.0}),
                          json.dumps({"it": 500, "val/loss": 0.07})])
    c = read_curve(run, "val/loss")
    assert [(p["it"], p["kimg"], p["value"]) for p in c["points"]] == [(250, 16.0, 0.08), (500, 32.0, 0.07)]


def test_curve_cli_writes_json_md_png_and_refuses_a_run_without_the_metric(tmp_path):
    run = _run(tmp_path, [json.dumps({"it": 500, "metric/classifier_fd": 3.0})])
    out = tmp_path / "curve"
    assert main(["--run", f"teacher={run}:10", "--metric", "classifier_fd", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["curves"]["teacher"]["points"][0]["kimg"] == 42.0
    assert out.with_suffix(".png").stat().st_size > 0 and "| 500 | 42.0 | 3.000 |" in out.with_suffix(".md").read_text()
    assert main(["--run", f"teacher={run}", "--metric", "classifier_kid", "--out", str(out)]) == 2


def _quality(path, rows, n=1000, n_inception=2000):
    path.write_text(json.dumps({"n": n, "n_inception": n_inception, "rows": rows}))
    return path


def test_eval_points_join_as_one_curve_per_label_with_error_bars(tmp_path):
    a = _quality(tmp_path / "a.json", [{"sampler": "heun", "steps": 9, "inception_kid": 0.018, "inception_kid_std": 8e-4},
                                       {"sampler": "euler", "steps": 8, "inception_kid": 0.030}])
    b = _quality(tmp_path / "b.json", [{"sampler": "heun", "steps": 9, "inception_kid": 0.015, "inception_kid_std": 7e-4}])
    out = tmp_path / "kid"
    assert main(["--eval", f"t=404:{b}:heun:9", "--eval", f"t=346:{a}:heun:9", "--metric", "inception_kid",
                 "--out", str(out)]) == 0
    pts = json.loads(out.with_suffix(".json").read_text())["curves"]["t"]["points"]
    assert [(p["kimg"], p["value"], p["std"], p["n"]) for p in pts] == [(346.0, 0.018, 8e-4, 2000),
                                                                       (404.0, 0.015, 7e-4, 2000)]
    md = out.with_suffix(".md").read_text()
    assert "| 346.0 | 0.018 | 0.0008 | 2000 | heun:9 |" in md and "--eval t=404:" in md
    # two rows carry the metric and none is named: refused, as is a spec without a kimg
    assert main(["--eval", f"t=346:{a}", "--metric", "inception_kid", "--out", str(out)]) == 2
    assert main(["--eval", f"t={a}", "--metric", "inception_kid", "--out", str(out)]) == 2
