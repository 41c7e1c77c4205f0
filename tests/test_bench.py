"""make bench's report: the figures are consistent with the timings they are computed from.

Tiny settings (a step or two per figure); the speeds themselves are not asserted.
"""

import json
from pathlib import Path

import pytest

from abexp.tools import bench


def test_grid_figure_compares_packed_and_process_sharing():
    naive_epoch_s = 100.0
    g = bench.grid_throughput("cpu", packs=[1, 2], procs=[2], steps=2, naive_epoch_s=naive_epoch_s)
    assert [(r["mode"], r["K"]) for r in g["rows"]] == [("packed", 1), ("packed", 2), ("processes", 2)]
    for r in g["rows"]:  # recomputed from the measured time for all K runs to take one step
        epoch_s = r["step_s"] * bench.STEPS_PER_CIFAR_EPOCH
        assert abs(r["run_epochs_per_hour"] - 3600 * r["K"] / epoch_s) <= 0.01 * r["run_epochs_per_hour"] + 0.1
        assert abs(r["epoch_s_per_run"] - epoch_s / r["K"]) <= 0.01 * r["epoch_s_per_run"]
    best = max(g["rows"], key=lambda r: r["run_epochs_per_hour"])
    assert (g["best_mode"], g["best_K"]) == (best["mode"], best["K"])
    assert abs(g["best_speedup_over_naive"] - best["run_epochs_per_hour"] / (3600 / naive_epoch_s)) < 0.01
    md = bench.to_markdown({"machine": "m", "torch": "t", "device": "cpu", "date": "d",
                            "delay_overhead": {"model": "resnet20", "batch": 128, "step_ms_delay0": 1,
                                               "step_ms_delay32": 1, "ratio_delay32_over_delay0": 1.0},
                            "grid_throughput": g})
    assert md.count("| packed |") == 2 and md.count("| processes |") == 1


def test_bench_writes_json_and_markdown(tmp_path):
    assert bench.main(["--only-delay", "--steps", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    d = report["delay_overhead"]
    assert abs(d["ratio_delay32_over_delay0"] - d["step_ms_delay32"] / d["step_ms_delay0"]) < 1e-3
    assert abs(d["ratio_pipeline_over_delay32"] - d["step_ms_pipeline"] / d["step_ms_delay32"]) < 1e-3
    assert report["machine"] in (tmp_path / "bench.md").read_text()


def test_the_parameter_server_figures_follow_from_their_timings():
    """Figure e: server ms = exchange + apply, workers kept busy = gradient / server; the params
    column is the model's own count; one worker is never stale; every update is rated."""
    import torch

    from abexp.tools import bench_async
    from abexp.train.models import build_model
    cost = bench_async.server_cost("resnet8", "ab", rounds=3)
    assert cost["params"] == sum(p.numel() for p in build_model("resnet8", 10).parameters())
    assert abs(cost["server_ms"] - (cost["exchange_ms"] + cost["apply_ms"])) < 2e-3
    assert abs(cost["workers_kept_busy"] - cost["gradient_ms"] / cost["server_ms"]) <= 0.06 + 0.01 * cost["workers_kept_busy"]
    before = torch.get_num_threads()
    rows = bench_async.updates_per_second([1, 2], updates=16)
    torch.set_num_threads(before)
    assert [(r["workers"], r["updates"]) for r in rows] == [(1, 16), (2, 16)]
    assert rows[0]["mean_staleness"] == 0 and rows[0]["max_staleness"] == 0 and rows[1]["max_staleness"] >= 1
    assert rows[0]["speedup_over_first"] == 1.0 and all(r["updates_per_s"] > 0 for r in rows)
    md = "\n".join(bench_async.to_markdown({"server_cost": [cost], "updates_per_second": rows}))
    assert md.count("| resnet8 |") == 1 and "| 2 | 16 |" in md


def test_ab_apply_figure_is_the_ratio_of_its_timings(tmp_path):
    assert bench.main(["--only-ab", "--rounds", "1", "--out", str(tmp_path)]) == 0
    a = json.loads((tmp_path / "bench.json").read_text())["ab_apply"]
    assert a["params"] == 25557032 - 2049000 + 20490  # torchvision's ResNet-50 with a 10-class head
    assert abs(a["ratio_ab_over_sgdm"] - a["ab_ms"] / a["sgdm_ms"]) < 2e-3 * a["ratio_ab_over_sgdm"] + 1e-3
    assert f"| {a['sgdm_ms']} | {a['ab_ms']} | {a['ratio_ab_over_sgdm']} |" in (tmp_path / "bench.md").read_text()


def test_a_failing_section_leaves_the_others_on_disk(tmp_path, monkeypatch):
    """Figure b forced to fail: a and c are still measured and written, b is named with its
    error line, c's ratio to b is left empty, and the exit status says something failed."""
    def broken(device, steps):
        raise RuntimeError("no PIL on this node")

    saved = []
    real_write = bench.io.write_json
    monkeypatch.setattr(bench, "path_vs_naive", broken)
    monkeypatch.setattr(bench.io, "write_json", lambda path, obj: (saved.append(json.loads(json.dumps(obj))),
                                                                   real_write(path, obj)))
    code = bench.main(["--skip", "compile", "async", "ab_apply", "packed_ops", "cli_help", "lm", "--steps", "1", "--rounds", "1", "--packs", "1",
                       "--procs", "--out", str(tmp_path)])
    assert code == 1
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["failed"] == {"path_vs_naive": "RuntimeError: no PIL on this node"}
    assert "delay_overhead" in report and "compile" not in report and "async" not in report
    assert [r["K"] for r in report["grid_throughput"]["rows"]] == [1]
    assert report["grid_throughput"]["best_speedup_over_naive"] is None
    assert "- path_vs_naive FAILED: RuntimeError: no PIL on this node" in (tmp_path / "bench.md").read_text()
    # written after every section: the first save already held figure a, before b was tried
    assert [sorted(k for k in s if k in bench.SECTIONS) for s in saved] == \
        [["delay_overhead"], ["delay_overhead"], ["delay_overhead", "grid_throughput"]]


def test_a_section_past_its_limit_is_stopped_and_the_next_one_runs():
    import time

    from abexp.tools.sections import run_sections

    start = time.perf_counter()
    report = run_sections([("slow", lambda: time.sleep(30), 0.5), ("next", lambda: 42, 5.0)], {}, lambda r: None)
    assert time.perf_counter() - start < 10
    assert report["failed"] == {"slow": "SectionTimeout: stopped after its limit of 0.5 s"}
    assert report["next"] == 42 and "slow" not in report


def test_packed_ops_figure_counts_the_update_once_for_any_number_of_runs():
    """Figure g: with the vectorised update the engines' share of a packed step is the same at
    K = 2 and K = 4 (one SGDM and one AB group either way); with each run's own engine it grows
    with K. The markdown carries both."""
    o = bench.packed_op_counts([2, 4], batch=2)
    two, four = o["rows"]
    assert two["engine_ops"] == four["engine_ops"] > 0
    assert four["loop_engine_ops"] > two["loop_engine_ops"] > two["engine_ops"]
    assert four["loop_engine_ops_per_run"] == round(four["loop_engine_ops"] / 4, 1)
    assert four["aten_ops"] < four["loop_aten_ops"]
    md = bench.to_markdown({"machine": "m", "torch": "t", "device": "cpu", "date": "d", "packed_ops": o})
    assert (f"| 4 | {four['aten_ops']} | {four['engine_ops']} | {four['loop_aten_ops']} | "
            f"{four['loop_engine_ops']} ({four['loop_engine_ops_per_run']}) |") in md


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "data/shakespeare/texts").is_dir(),
                    reason="data/shakespeare absent: make setup")
def test_the_lm_section_reports_characters_per_second_from_its_step_times(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # data.root: the default data/shakespeare
    assert bench.main(["--only-lm", "--steps", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    lm = json.loads((tmp_path / "bench.json").read_text())["lm"]
    assert lm["batch_chars"] == 16 * 64 and lm["params"] == 81_056  # 85-character vocabulary
    for d in (0, 16):  # chars/s is the batch's characters over the step time, by hand
        assert lm[f"chars_per_s_delay{d}"] == pytest.approx(1024 / (lm[f"step_ms_delay{d}"] / 1e3), rel=1e-3)
    assert lm["ratio_muon_over_adamw_update"] == pytest.approx(lm["update_ms_muon"] / lm["update_ms_adamw"], rel=1e-2)
    assert "Char-GPT on Shakespeare" in (tmp_path / "bench.md").read_text()
