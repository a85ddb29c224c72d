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


def test_curve_cli_writes_json_md_png_and_refuses_a_run_without_the_metric(tmp_path):
    run = _run(tmp_path, [json.dumps({"it": 500, "metric/classifier_fd": 3.0})])
    out = tmp_path / "curve"
    assert main(["--run", f"teacher={run}:10", "--metric", "classifier_fd", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["curves"]["teacher"]["points"][0]["kimg"] == 42.0
    assert out.with_suffix(".png").stat().st_size > 0 and "| 500 | 42.0 | 3.000 |" in out.with_suffix(".md").read_text()
    assert main(["--run", f"teacher={run}", "--metric", "classifier_kid", "--out", str(out)]) == 2
