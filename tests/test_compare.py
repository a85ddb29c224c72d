"""The students table: budgets read from run folders, carried over from an earlier table, and chained when a run
continued from another student's weights."""

import json

from benchmarks import compare


def _quality(path, model, kid, nfe=1, sampler="onestep", steps=1):
    row = {"nfe": nfe, "sampler": sampler, "steps": steps, "inception_kid": kid, "inception_kid_std": 1e-4,
           "inception_fid": 30.0, "classifier_kid": 5.0, "class_agreement": 0.8}
    path.write_text(json.dumps({"model": model, "rows": [row], "n": 100, "n_inception": 100,
                                "baselines": {"inception": {"fid": 1.0, "kid": 0.0}, "classifier": {"kid": 0.0}}}))
    return path


def _run_dir(d, its, batch, sec_per_it, init=None):
    d.mkdir()
    rows = [{"it": i, "kimg": round(i * batch / 1000, 1), "sec_per_it": sec_per_it} for i in range(0, its + 1, its // 2)][1:]
    (d / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "config.json").write_text(json.dumps({"train": {"batch_size": batch, "num_threads": 2},
                                               "machine": {"cpu_model": "AMD EPYC"}, "device": {"type": "cpu"},
                                               "init": init}))
    return d


def test_budgets_come_from_run_folders_earlier_tables_and_chain_on_continuation(tmp_path):
    teacher = _quality(tmp_path / "t.json", "teacher.safetensors", 0.015, nfe=17, sampler="heun", steps=9)
    earlier = tmp_path / "earlier.json"
    gpu = {"iterations": 1200, "batch": 128, "kimg": 153.6, "train_seconds": 480.0, "device": "NVIDIA H200"}
    earlier.write_text(json.dumps({"rows": [{"name": "sid", "budget": gpu},
                                            {"name": "emd", "budget": {**gpu, "kimg": 89.6, "iterations": 700}}]}))
    sid_run = _run_dir(tmp_path / "sid", 2000, 32, 2.4, init={"source": "artifacts/old-sid.safetensors"})
    plain_run = _run_dir(tmp_path / "ds", 100, 64, 0.6)
    out = tmp_path / "students"
    assert compare.main(["--teacher", str(teacher),
                         "--student", f"sid={_quality(tmp_path / 's.json', 'sid.safetensors', 0.014)}:{sid_run}",
                         "--student", f"emd={_quality(tmp_path / 'e.json', 'emd.safetensors', 0.03)}",
                         "--student", f"ds={_quality(tmp_path / 'd.json', 'ds.safetensors', 0.02)}:{plain_run}",
                         "--budgets", str(earlier), "--out", str(out)]) == 0
    md = (tmp_path / "students.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "1200 it x 128 (153.6 kimg), 8 min NVIDIA H200, then 2000 it x 32 (64.0 kimg), 80 min CPU" in rows["sid"]
    assert "700 it x 128 (89.6 kimg), 8 min NVIDIA H200" in rows["emd"]
    assert "100 it x 64 (6.4 kimg), 1 min CPU" in rows["ds"] and "then" not in rows["ds"]
    res = json.loads((tmp_path / "students.json").read_text())
    sid = next(r for r in res["rows"] if r["name"] == "sid")
    assert sid["budget"]["init_from"] == "artifacts/old-sid.safetensors" and sid["budget"]["before"] == gpu


def test_latency_is_carried_over_from_the_earlier_table_when_not_measured(tmp_path):
    src = json.loads(open("benchmarks/results/students_attn_gpu.json").read())
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"rows": src["rows"], "latency": src["latency"]}))
    teacher = _quality(tmp_path / "t.json", "teacher.safetensors", 0.015, nfe=17, sampler="heun", steps=9)
    out = tmp_path / "students"
    assert compare.main(["--teacher", str(teacher),
                         "--student", f"adv-kd={_quality(tmp_path / 'a.json', 'a.safetensors', 0.18)}",
                         "--student", f"new-name={_quality(tmp_path / 'n.json', 'n.safetensors', 0.02)}",
                         "--budgets", str(earlier), "--out", str(out)]) == 0
    res = json.loads((tmp_path / "students.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    adv, teacher_ms = src["latency"]["models"]["adv-kd"], src["latency"]["models"]["teacher"]["p50_ms"]
    assert rows["adv-kd"]["latency_ms"] == adv["p50_ms"] and rows["adv-kd"]["params"] == adv["params"]
    assert adv["p50_ms"] < teacher_ms / 2  # the smaller network keeps its own time, not the teacher's
    assert rows["new-name"]["latency_ms"] == teacher_ms  # a name timed nowhere: one teacher step (same network)
    assert res["latency"]["carried_from"] == str(earlier)
    assert "Latency carried over from" in (tmp_path / "students.md").read_text()
    assert (tmp_path / "students-pareto.png").exists()


def test_training_time_from_windowed_and_older_cumulative_rows():
    from benchmarks.compare import _train_seconds

    windowed = [{"it": 2, "sec_per_it": 1.0, "elapsed_s": 2.0}, {"it": 4, "sec_per_it": 3.0, "elapsed_s": 8.0}]
    assert _train_seconds(windowed) == 8.0
    # older logs: the average since the process started (1 s/it for 2 iterations, then 3 s/it for 2 more)
    cumulative = [{"it": 2, "sec_per_it": 1.0}, {"it": 4, "sec_per_it": 2.0}]
    assert _train_seconds(cumulative) == 8.0
    # an older run resumed with the current trainer: its older part, then the new rows' windows
    assert _train_seconds(cumulative + [{"it": 6, "sec_per_it": 5.0, "elapsed_s": 10.0}]) == 18.0


def test_teacher_results_join_and_the_best_row_sets_the_ratio(tmp_path):
    """--teacher repeated: rows of later measurements of the same teacher join; the best Inception KID among them
    is the teacher's best, and every student's KID is shown as a ratio to it. Another model is refused."""
    t9 = _quality(tmp_path / "t9.json", "teacher.safetensors", 0.016, nfe=17, sampler="heun", steps=9)
    t16 = _quality(tmp_path / "t16.json", "teacher.safetensors", 0.008, nfe=16, sampler="euler", steps=16)
    out = tmp_path / "students"
    assert compare.main(["--teacher", str(t9), "--teacher", str(t16),
                         "--student", f"sid={_quality(tmp_path / 's.json', 'sid.safetensors', 0.012)}",
                         "--out", str(out)]) == 0
    res = json.loads((tmp_path / "students.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert "teacher, best (euler 16 NFE)" in rows
    assert abs(rows["sid"]["kid_vs_teacher_best"] - 1.5) < 1e-9
    assert rows["teacher, best (euler 16 NFE)"]["grid"] == "t16-grids/grid-euler-16.png"
    assert rows["teacher, best (euler 16 NFE)"]["classifier_kid"] == 5.0
    t16n = tmp_path / "t16n.json"  # classifier metrics at another N: not shown
    t16n.write_text(json.dumps({**json.loads(t16.read_text()), "n": 50}))
    assert compare.main(["--teacher", str(t9), "--teacher", str(t16n), "--out", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "students.json").read_text())["rows"]}
    assert rows["teacher, best (euler 16 NFE)"]["classifier_kid"] is None
    other = tmp_path / "o.json"
    other.write_text(json.dumps({**json.loads(t16.read_text()), "n_inception": 50}))
    assert compare.main(["--teacher", str(t9), "--teacher", str(other), "--out", str(out)]) == 2


def test_a_carried_continued_budget_is_not_chained_twice(tmp_path):
    teacher = _quality(tmp_path / "t.json", "teacher.safetensors", 0.015, nfe=17, sampler="heun", steps=9)
    gpu = {"iterations": 1200, "batch": 128, "kimg": 153.6, "train_seconds": 480.0, "device": "NVIDIA H200"}
    cpu = {"iterations": 2000, "batch": 32, "kimg": 64.0, "train_seconds": 4800.0, "device": "cpu",
           "init_from": "artifacts/old-sid.safetensors", "before": gpu}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"rows": [{"name": "sid", "budget": cpu}]}))
    assert compare.main(["--teacher", str(teacher), "--student",
                         f"sid={_quality(tmp_path / 's.json', 'sid.safetensors', 0.014)}", "--budgets", str(earlier),
                         "--out", str(tmp_path / "students")]) == 0
    row = next(line for line in (tmp_path / "students.md").read_text().splitlines() if line.startswith("| sid "))
    assert row.count("2000 it x 32") == 1 and "1200 it x 128" in row


def test_header_names_each_classifier_n_and_prints_the_note(tmp_path):
    """Teacher and students measured at different classifier N: the header says which rows are at which N (the
    old header named the teacher's N for every row); --note lands under it and in the JSON."""
    teacher = _quality(tmp_path / "t.json", "teacher.safetensors", 0.015, nfe=17, sampler="heun", steps=9)
    big = tmp_path / "s2000.json"
    big.write_text(json.dumps({**json.loads(_quality(big, "sid.safetensors", 0.014).read_text()), "n": 2000,
                               "baselines": {"inception": {"fid": 1.0, "kid": 0.0}, "classifier": {"kid": -0.8726}}}))
    out = tmp_path / "students"
    assert compare.main(["--teacher", str(teacher), "--student", f"sid={big}",
                         "--student", f"emd={_quality(tmp_path / 'e.json', 'emd.safetensors', 0.03)}",
                         "--note", "Budgets read from logs.", "--out", str(out)]) == 0
    md = (tmp_path / "students.md").read_text()
    assert "teacher rows at N=100 (real-vs-real 0.00); sid at N=2000 (real-vs-real -0.87); emd at N=100" in md
    assert "\nBudgets read from logs.\n" in md
    assert json.loads((tmp_path / "students.json").read_text())["note"] == "Budgets read from logs."
