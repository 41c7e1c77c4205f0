"""make bench's report: the figures are consistent with the timings they are computed from.

Tiny settings (a step or two per figure); the speeds themselves are not asserted.
"""

import json

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
