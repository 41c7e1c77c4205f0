"""The paired table of abexp figures: t quantiles and power against published values, the
table against a naive recomputation on a hand-made results table."""

import math
import statistics

import pandas as pd
import pytest

from abexp.figures import paired, stats
from conftest import runs_table

# Student-t quantiles from printed tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 7: 2.365, 10: 2.228, 30: 2.042, 100: 1.984}
T_80 = {1: 1.376, 5: 0.920, 10: 0.879, 30: 0.854}


def test_t_quantiles_match_printed_tables():
    for df, t in T_975.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=6e-4)
        assert stats.t_quantile(0.025, df) == pytest.approx(-t, abs=6e-4)
    for df, t in T_80.items():
        assert stats.t_quantile(0.8, df) == pytest.approx(t, abs=6e-4)
    assert stats.t_cdf(0.0, 4) == 0.5
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/π


def test_t_quantiles_match_scipy_where_installed():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 9, 25, 60):
        for p in (0.6, 0.8, 0.9, 0.975, 0.995):
            assert stats.t_quantile(p, df) == pytest.approx(st.t.ppf(p, df), abs=1e-8)


def test_seeds_for_80pct_power_match_published_sample_sizes():
    # one-sample / paired t-test, two-sided alpha 0.05, power 0.8 (Cohen 1988; G*Power):
    # d = 0.5 needs 34, d = 0.8 needs 15, d = 1.0 needs 10
    assert stats.seeds_for_power(0.5, 1.0) == 34
    assert stats.seeds_for_power(0.004, 0.005) == 15  # d = 0.8 in accuracy units
    assert stats.seeds_for_power(-1.0, 1.0) == 10  # the sign does not matter
    # and the power at those n is just above 0.8, one fewer just below
    assert stats.paired_power(0.5, 34) >= 0.8 > stats.paired_power(0.5, 33)
    assert stats.seeds_for_power(0.0, 1.0) is None and stats.seeds_for_power(0.1, float("nan")) is None


def test_paired_p_values_match_closed_forms_and_holm_a_hand_computation():
    # df = 2: P(T > t) = 1/2 − t/(2√(2 + t²)); df = 1 (Cauchy): P(T > t) = 1/2 − atan(t)/π
    diffs = [1.0, 2.0, 3.0]  # mean 2, sd 1, t = 2√3
    t = 2 * math.sqrt(3)
    assert stats.paired_t_p(2.0, 1.0, 3) == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), abs=1e-12)
    assert stats.paired_t_p(statistics.mean(diffs), statistics.stdev(diffs), 3) == pytest.approx(0.0742, abs=1e-4)
    assert stats.paired_t_p(-0.5, 0.5, 2) == pytest.approx(2 * (0.5 - math.atan(math.sqrt(2)) / math.pi))
    assert math.isnan(stats.paired_t_p(0.1, float("nan"), 1)) and math.isnan(stats.paired_t_p(float("-inf"), 1.0, 4))
    # no spread (equal differences, exactly or up to float noise): t is infinite, no test, not p = 0
    assert math.isnan(stats.paired_t_p(0.3, 0.0, 4)) and math.isnan(stats.paired_t_p(0.0, 0.0, 4))
    noisy = [0.1 + 0.2, 0.3]
    assert math.isnan(stats.paired_t_p(statistics.mean(noisy), statistics.stdev(noisy), 2))
    # Holm: sorted 0.01, 0.03, 0.04 -> ×3, ×2 (0.06), ×1 (0.04, raised to 0.06 to stay monotone); NaN not in the family
    assert stats.holm([0.04, 0.01, float("nan"), 0.03]) == pytest.approx([0.06, 0.03, float("nan"), 0.06], nan_ok=True)
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0] and stats.holm([]) == []


def test_paired_p_values_match_scipy_where_installed():
    st = pytest.importorskip("scipy.stats")
    for values in ([0.01, 0.03, -0.005, 0.02], [0.2, 0.1, 0.4, 0.3, 0.25, 0.05, 0.15, 0.35], [-0.3, 0.1]):
        mean, sd = statistics.mean(values), statistics.stdev(values)
        assert stats.paired_t_p(mean, sd, len(values)) == pytest.approx(st.ttest_1samp(values, 0.0).pvalue, abs=1e-9)


def test_the_paired_table_matches_a_naive_recomputation(tmp_path):
    # (optimizer, delay, lr): per seed (val_acc, test_acc); None = diverged
    cells = {
        ("sgdm", 8, 0.05): [(0.80, 0.81), (0.82, 0.80), (0.81, 0.79)],
        ("sgdm", 8, 0.1): [(0.70, 0.90), (0.70, 0.90), (0.70, 0.90)],   # test likes it, validation not
        ("ab", 8, 0.05): [(0.90, 0.84), (0.91, 0.83), (None, None)],    # seed 2 diverged: counts 0
        ("ab", 8, 0.1): [(0.60, 0.95), (0.60, 0.95), (0.60, 0.95)],
        ("sgdm", 32, 0.05): [(0.60, 0.61), (0.62, 0.60)],
        ("ab", 32, 0.05): [(0.70, 0.66), (0.71, 0.68)],
        ("ab", 32, 0.1): [(0.75, 0.70)],                                # one seed of two: waits
    }
    runs_table(cells, tmp_path / "runs.csv")
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figs")])
    out = pd.read_csv(tmp_path / "figs" / "paired.csv").set_index("delay")
    assert list(out["series"]) == ["AB", "AB"] and set(out["selected_on"]) == {"val_acc"}

    # naive: D = 8, both at lr 0.05 (validation's choice), test accuracies paired by seed
    d8 = out.loc[8]
    assert d8["lr"] == 0.05 and d8["baseline_lr"] == 0.05
    diffs = [0.84 - 0.81, 0.83 - 0.80, 0.0 - 0.79]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = T_975[2] * sd / math.sqrt(3)
    assert d8["mean_diff"] == pytest.approx(mean) and d8["sd_diff"] == pytest.approx(sd)
    assert d8["ci_low"] == pytest.approx(mean - half, abs=1e-3) and d8["ci_high"] == pytest.approx(mean + half, abs=1e-3)
    assert d8["seeds"] == 3 and d8["seed_list"] == "0 1 2"
    assert d8["diffs"] == "+0.0300 +0.0300 -0.7900"
    assert d8["seeds_for_80pct_power"] == stats.seeds_for_power(mean, sd)
    # D = 32: AB's lr 0.1 has one seed of two, so 0.05 is its lr; 2 seeds: t(0.975, 1) = 12.706
    d32 = out.loc[32]
    diffs = [0.66 - 0.61, 0.68 - 0.60]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    assert d32["lr"] == 0.05 and d32["mean_diff"] == pytest.approx(mean)
    assert d32["ci_low"] == pytest.approx(mean - T_975[1] * sd / math.sqrt(2), abs=1e-3)
    # d = 0.065 / 0.0212 = 3.06: n = 4 (power 0.87 there; 3 seeds give 0.59)
    assert d32["seeds_for_80pct_power"] == 4
    # p (Holm) over the table's two rows, from the closed forms: df = 2 (D = 8), df = 1 (D = 32, Cauchy)
    t8 = d8["mean_diff"] / (d8["sd_diff"] / math.sqrt(3))
    t32 = d32["mean_diff"] / (d32["sd_diff"] / math.sqrt(2))
    raw = [2 * (0.5 - abs(t8) / (2 * math.sqrt(2 + t8 * t8))), 2 * (0.5 - math.atan(abs(t32)) / math.pi)]
    low, high = sorted(raw)
    holm = {low: min(1, 2 * low), high: max(min(1, 2 * low), high)}
    assert [d8["p_value"], d32["p_value"]] == pytest.approx(raw, abs=1e-9)
    assert [d8["p_holm"], d32["p_holm"]] == pytest.approx([holm[raw[0]], holm[raw[1]]], abs=1e-9)
    text = (tmp_path / "figs" / "paired.md").read_text()
    assert "Student-t interval" in text and "selected on validation" in text
    assert f"| {paired.p_text(holm[raw[0]])} |" in text.splitlines()[4]  # the D = 8 row's last cell
    assert "| 8 | AB | 0.05 | 0.05 | +0.0300 +0.0300 -0.7900 |" in text


def test_the_baseline_is_named(tmp_path):
    rows = [{"run_id": f"r{o}{s}", "experiment": "e", "status": "completed", "test_acc": a,
             "optim.name": o, "delay.steps": 4, "optim.lr": 0.1, "seed": s, "delay.kind": "constant"}
            for o, accs in {"sgdm": [0.5, 0.6], "ab": [0.7, 0.7], "sc": [0.4, 0.6]}.items()
            for s, a in enumerate(accs)]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "f"), "--baseline", "ab"])
    out = pd.read_csv(tmp_path / "f" / "paired.csv")
    assert set(out["baseline"]) == {"AB"} and list(out["series"]) == ["SGDM", "SC"]
    assert list(out["mean_diff"]) == pytest.approx([-0.15, -0.2]) and set(out["selected_on"]) == {"test_acc"}
    assert "no validation set" in (tmp_path / "f" / "paired.md").read_text()


def test_an_ablation_pairs_against_one_series_of_an_optimizer_by_its_label(tmp_path):
    """Two AB series (ρ 1 and ρ 2): the optimizer name is ambiguous, the label is not."""
    rows = [{"run_id": f"r{rho}{s}", "experiment": "e", "status": "completed", "test_acc": a,
             "optim.name": "ab", "optim.rho": rho, "delay.steps": 4, "optim.lr": 0.1, "seed": s,
             "delay.kind": "constant"}
            for rho, accs in {1.0: [0.70, 0.72], 2.0: [0.74, 0.73]}.items() for s, a in enumerate(accs)]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    with pytest.raises(SystemExit):  # "ab" names two series: skipped, said in a line
        paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "f"), "--baseline", "ab"])
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "f"), "--baseline", "AB, ρ 1"])
    out = pd.read_csv(tmp_path / "f" / "paired.csv")
    assert list(out["series"]) == ["AB, ρ 2"] and set(out["baseline"]) == {"AB, ρ 1"}
    assert out["diffs"].iloc[0] == "+0.0400 +0.0100" and out["mean_diff"].iloc[0] == pytest.approx(0.025)


def test_several_baselines_pair_each_optimizers_series_with_its_own_unablated_arm(tmp_path):
    """An ablation study of two rules: AB's ρ 2 against AB's ρ 1, LWP's momentum look-ahead
    against LWP's linear one, never across rules; SGDM (no baseline of its own) is left out."""
    accs = {("ab", 1.0, "linear"): [0.70, 0.72, 0.71], ("ab", 2.0, "linear"): [0.74, 0.73, 0.70],
            ("lwp", 1.0, "linear"): [0.60, 0.65, 0.61], ("lwp", 1.0, "momentum"): [0.66, 0.64, 0.69],
            ("sgdm", 1.0, "linear"): [0.5, 0.5, 0.5]}
    rows = [{"run_id": f"r{o}{rho}{look}{s}", "experiment": "e", "status": "completed", "test_acc": a,
             "optim.name": o, "optim.rho": rho, "optim.lwp_lookahead": look, "delay.steps": d,
             "optim.lr": 0.1, "seed": s, "delay.kind": "constant"}
            for (o, rho, look), values in accs.items() for d in (8, 32) for s, a in enumerate(values)]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    bases = ["AB, ρ 1", "LWP, lwp lookahead linear"]
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "f"),
                 *[a for b in bases for a in ("--baseline", b)]])
    out = pd.read_csv(tmp_path / "f" / "paired.csv")
    assert list(zip(out["delay"], out["series"], out["baseline"])) == [
        (d, s, b) for d in (8, 32) for s, b in (("AB, ρ 2", bases[0]), ("LWP, lwp lookahead momentum", bases[1]))]
    naive = {"AB, ρ 2": [0.74 - 0.70, 0.73 - 0.72, 0.70 - 0.71], "LWP, lwp lookahead momentum": [0.06, -0.01, 0.08]}
    for r in out.to_dict("records"):
        assert r["mean_diff"] == pytest.approx(statistics.mean(naive[r["series"]]))
        assert r["sd_diff"] == pytest.approx(statistics.stdev(naive[r["series"]]))
    # p (Holm): the table's four comparisons are one family; recomputed naively (t-test, then Holm by hand)
    raw = []
    for r in out.to_dict("records"):
        values = naive[r["series"]]
        t = statistics.mean(values) / (statistics.stdev(values) / math.sqrt(3))
        raw.append(2 * (0.5 - abs(t) / (2 * math.sqrt(2 + t * t))))  # df = 2's closed form
    order = sorted(range(4), key=raw.__getitem__)
    holm, running = [0.0] * 4, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * raw[i]))
        holm[i] = running
    assert list(out["p_value"]) == pytest.approx(raw, abs=1e-9) and list(out["p_holm"]) == pytest.approx(holm, abs=1e-9)
    text = (tmp_path / "f" / "paired.md").read_text()
    assert "| 8 | LWP, lwp lookahead momentum | LWP, lwp lookahead linear | 0.1 | 0.1 | +0.0600 -0.0100 +0.0800 |" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| 8 | {out['series'][0]} |"))
    assert row.endswith(f"| {paired.p_text(holm[0])} |") and "Holm-adjusted" in text
    with pytest.raises(SystemExit):  # two baselines of one optimizer: which one would AB's ρ 2 pair with?
        paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "g"),
                     "--baseline", "AB, ρ 1", "--baseline", "AB, ρ 2"])
    assert not (tmp_path / "g" / "paired.csv").exists()


def test_every_figure_that_draws_error_bars_says_what_they_are():
    """An error bar without a caption reads as a confidence interval: each module that draws one
    puts common.ERRORBARS (±1 sd over seeds) into its title, or its own BAND caption."""
    import ast
    from pathlib import Path

    from abexp.figures import common
    assert "sd over seeds" in common.ERRORBARS and "not a CI" in common.ERRORBARS
    folder = Path(paired.__file__).parent
    drawing = []
    for module in sorted(folder.glob("*.py")):
        tree = ast.parse(module.read_text())
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        if calls & {"errorbar", "fill_between"}:
            drawing.append(module.stem)
            text = module.read_text()  # or a band of another quantity, captioned as such (brake.BAND)
            assert "common.ERRORBARS" in text or ("BAND = " in text and "not an interval" in text), module.name
    assert {"accuracy_vs_delay", "accuracy_vs_stages", "rho_sensitivity", "async_vs_model"} <= set(drawing)


def test_abexp_figures_passes_the_baseline_to_the_paired_table_only():
    import argparse

    from abexp.figures import make
    assert "paired" in make.RUN_SCRIPTS
    ns = argparse.Namespace(baseline=["ab"])
    assert make.extra_args("paired", ns) == ["--baseline", "ab"] and make.extra_args("tuned_lr", ns) == []
    ns = argparse.Namespace(baseline=["AB, ρ 1", "LWP, lwp lookahead linear"])  # an ablation study's arms
    assert make.extra_args("paired", ns) == ["--baseline", "AB, ρ 1", "--baseline", "LWP, lwp lookahead linear"]


def test_equivalence_power_matches_a_simulation_of_two_one_sided_tests():
    """TOST power (true difference 0) against 40,000 simulated studies of n normal differences:
    equivalent when the 90% t-interval of the mean lies inside ±margin."""
    import numpy as np
    rng = np.random.default_rng(0)
    for n, margin_sd in ((5, 1.5), (10, 1.1), (20, 0.6)):
        d = rng.normal(0.0, 1.0, (40_000, n))
        half = stats.t_quantile(0.95, n - 1) * d.std(axis=1, ddof=1) / math.sqrt(n)
        hits = ((d.mean(axis=1) - half > -margin_sd) & (d.mean(axis=1) + half < margin_sd)).mean()
        assert stats.equivalence_power(margin_sd, n) == pytest.approx(hits, abs=0.01)
    n = stats.seeds_for_equivalence(0.05, 0.045)
    assert stats.equivalence_power(0.05 / 0.045, n) >= 0.8 > stats.equivalence_power(0.05 / 0.045, n - 1)
    assert stats.seeds_for_equivalence(0.05, 0.045) < stats.seeds_for_equivalence(0.05, 0.09)


def test_the_async_equivalence_table_is_the_paired_difference_per_seed(tmp_path):
    """async_vs_model's equivalence test against a naive recomputation on a hand-made table:
    per seed real − constant, the 90% and 95% t-intervals, and the verdict they allow."""
    from abexp.figures import async_vs_model
    real = {("sgdm", 4): [0.86, 0.88, 0.85, 0.87], ("sgdm", 8): [0.70, 0.74, 0.72, 0.71],
            ("ab", 8): [0.80, 0.78, 0.82, 0.79]}
    model = {("sgdm", 4): [0.87, 0.87, 0.86, 0.86], ("sgdm", 8): [0.79, 0.82, 0.80, 0.80],
             ("ab", 8): [0.70, 0.85, 0.76, 0.88]}
    rows = [{"optim": o, "series": series, "N": n, "seed": s, "test_acc": v}
            for series, source in (("async", real), ("constant", model))
            for (o, n), vals in source.items() for s, v in enumerate(vals)]
    rows.append({"optim": "sgdm", "series": "async", "N": 4, "seed": 9, "test_acc": 0.1})  # no partner: left out
    table = async_vs_model.equivalence(pd.DataFrame(rows), 0.05).set_index(["optim", "N"])
    for key in real:
        diffs = [r - m for r, m in zip(real[key], model[key])]
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        t90, t95 = 2.353363, 3.182446  # t quantiles 0.95 and 0.975 at 3 degrees of freedom
        row = table.loc[key]
        assert row["seeds"] == 4 and row["mean_diff"] == pytest.approx(mean)
        assert row["low90"] == pytest.approx(mean - t90 * sd / 2, abs=1e-6)
        assert row["high95"] == pytest.approx(mean + t95 * sd / 2, abs=1e-6)
    assert table.loc[("sgdm", 4), "verdict"] == "equivalent within ±0.05"
    assert table.loc[("sgdm", 8), "verdict"] == "different"  # 0.08 apart, tightly
    assert table.loc[("ab", 8), "verdict"] == "not resolved"  # wide: neither claim
    async_vs_model.equivalence_table(table.reset_index(), async_vs_model.names(pd.DataFrame(rows)), tmp_path)
    text = (tmp_path / "async_equivalence.md").read_text()
    assert "| SGDM | real async, N workers | 4 | 4 |" in text and "not resolved" in text


def test_pipeline_runs_get_tables_of_their_own_against_the_stage_count(tmp_path):
    """A study with a pipeline variant (S) and a constant one (D): tuned_lr and paired write the
    constant tables as before and the pipeline's per stage count S (files *_stages), the stage
    count never a series key; each number a naive recomputation of the hand-made table."""
    from abexp.figures import tuned_lr
    cells = {("sgdm", 1, 0.1): [(0.90, 0.89), (0.91, 0.90)], ("sgdm", 1, 0.05): [(0.88, 0.88), (0.89, 0.87)],
             ("sgdm", 8, 0.1): [(0.70, 0.71), (0.74, 0.72)], ("sgdm", 8, 0.05): [(0.80, 0.79), (0.82, 0.83)],
             ("ab", 1, 0.1): [(0.90, 0.91), (0.90, 0.88)], ("ab", 8, 0.1): [(0.86, 0.85), (0.84, 0.86)]}
    rows = [{"run_id": f"p{i}_{s}", "experiment": "e", "status": "completed", "val_acc": v, "test_acc": t,
             "optim.name": o, "delay.stages": stages, "delay.steps": 0, "optim.lr": lr, "seed": s,
             "delay.kind": "pipeline"}
            for i, ((o, stages, lr), pairs) in enumerate(cells.items()) for s, (v, t) in enumerate(pairs)]
    rows += [{**r, "run_id": "c" + r["run_id"], "delay.kind": "constant", "delay.steps": 2 * (r["delay.stages"] - 1),
              "delay.stages": 4} for r in rows]  # the same numbers as constant runs at D = 2(S - 1)
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    tuned_lr.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path)])
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path)])
    stages = pd.read_csv(tmp_path / "paired_stages.csv").set_index("delay")
    constant = pd.read_csv(tmp_path / "paired.csv").set_index("delay")
    assert list(stages.index) == [1, 8] and list(constant.index) == [0, 14]
    # at S = 8 SGDM's validation picks 0.05 (0.81 > 0.72); AB - SGDM per seed: 0.85 - 0.79, 0.86 - 0.83
    assert stages.loc[8, "baseline_lr"] == 0.05
    assert stages.loc[8, "mean_diff"] == pytest.approx(((0.85 - 0.79) + (0.86 - 0.83)) / 2)
    assert constant.loc[14, "mean_diff"] == pytest.approx(stages.loc[8, "mean_diff"])
    text = (tmp_path / "tuned_lr_stages.md").read_text()
    assert "| S=1 | S=8 |" in text and "D=" not in text.split("\n\n")[1]
    assert "| D=0 | D=14 |" in (tmp_path / "tuned_lr.md").read_text()
    assert (tmp_path / "tuned_lr_stages.png").exists()


def test_a_pipelines_one_stage_runs_stand_in_for_a_missing_constant_d0(tmp_path):
    """experiments/shakespeare_gpt.yaml runs its undelayed reference once, as S = 1 (bitwise
    D = 0): the constant delays' tables and delay_drop then read those runs as D = 0."""
    from abexp.figures import delay_drop, tuned_lr
    loss = {("adamw", "pipeline", 1): [(2.00, 2.05), (2.02, 2.06)], ("adamw", "constant", 16): [(2.40, 2.45), (2.30, 2.36)],
            ("muon", "pipeline", 1): [(1.70, 1.75), (1.72, 1.78)], ("muon", "constant", 16): [(1.90, 1.92), (1.94, 1.99)]}
    rows = [{"run_id": f"r{i}_{s}", "experiment": "e", "status": "completed", "val_loss": v, "test_loss": t,
             "optim.name": o, "delay.kind": kind, "delay.stages": d if kind == "pipeline" else 4,
             "delay.steps": d if kind == "constant" else 0, "optim.lr": 0.01, "seed": s, "data.name": "shakespeare"}
            for i, ((o, kind, d), vals) in enumerate(loss.items()) for s, (v, t) in enumerate(vals)]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    delay_drop.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path)])
    drop = pd.read_csv(tmp_path / "delay_drop.csv").set_index("series")
    assert drop.loc["AdamW", "drop_mean"] == pytest.approx(((2.45 - 2.05) + (2.36 - 2.06)) / 2)
    assert drop.loc["Muon", "acc_D0"] == pytest.approx((1.75 + 1.78) / 2) and drop.loc["Muon", "seeds"] == 2
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path), "--baseline", "adamw"])
    pairs = pd.read_csv(tmp_path / "paired.csv").set_index("delay")
    assert list(pairs.index) == [0, 16]  # D = 0 from the pipeline's S = 1
    assert pairs.loc[0, "mean_diff"] == pytest.approx(((1.75 - 2.05) + (1.78 - 2.06)) / 2)


def test_the_cost_table_pairs_what_the_delay_cost_each_rule(tmp_path):
    # (optimizer, delay, lr): per seed (val_acc, test_acc)
    cells = {
        ("sgdm", 0, 0.05): [(0.90, 0.90), (0.90, 0.92), (0.90, 0.91)],
        ("sgdm", 8, 0.05): [(0.80, 0.80), (0.80, 0.85), (0.80, 0.83)],
        ("ab", 0, 0.05): [(0.90, 0.89), (0.90, 0.90), (0.90, 0.91)],
        ("ab", 8, 0.05): [(0.85, 0.86), (0.85, 0.88), (0.85, 0.87)],
        ("ab", 8, 0.1): [(0.50, 0.99), (0.50, 0.99), (0.50, 0.99)],  # test likes it; validation does not
    }
    runs_table(cells, tmp_path / "runs.csv")
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figs")])
    cost = pd.read_csv(tmp_path / "figs" / "paired_cost.csv")
    assert len(cost) == 1 and cost.loc[0, "delay"] == 8 and cost.loc[0, "lr"] == 0.05
    # naive: each seed's accuracy lost from D = 0 to D = 8, AB's minus SGDM's
    sgdm = [0.90 - 0.80, 0.92 - 0.85, 0.91 - 0.83]
    ab = [0.89 - 0.86, 0.90 - 0.88, 0.91 - 0.87]
    diffs = [a - b for a, b in zip(ab, sgdm)]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    assert cost.loc[0, "mean_diff"] == pytest.approx(mean) and cost.loc[0, "sd_diff"] == pytest.approx(sd)
    assert cost.loc[0, "ci_high"] == pytest.approx(mean + T_975[2] * sd / math.sqrt(3), abs=1e-3)
    assert "less robust" in (tmp_path / "figs" / "paired_cost.md").read_text()


def test_a_losss_cost_is_what_the_delay_added_and_a_diverged_start_has_none(tmp_path):
    """Lower is better for a language model: the cost is loss(delayed) − loss(undelayed); a seed
    whose undelayed run diverged has no cost and is left out of the pairing."""
    losses = {  # (optimizer, delay): per seed test loss; None = diverged (validation = test here)
        ("adamw", 0): [2.0, 2.1, None], ("adamw", 4): [2.5, 2.7, 2.6],
        ("muon", 0): [1.8, 1.9, 1.7], ("muon", 4): [2.2, 2.4, 2.3],
    }
    rows = [{"run_id": f"{o}{d}{s}", "experiment": "e", "status": "diverged" if v is None else "completed",
             "data.name": "shakespeare", "optim.name": o, "optim.lr": 0.01, "delay.kind": "constant",
             "delay.steps": d, "seed": s, "val_loss": v, "test_loss": v}
            for (o, d), vs in losses.items() for s, v in enumerate(vs)]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figs"), "--baseline", "adamw"])
    cost = pd.read_csv(tmp_path / "figs" / "paired_cost.csv").iloc[0]
    # naive: Muon's added loss − AdamW's, seeds 0 and 1 (AdamW's undelayed seed 2 diverged)
    diffs = [(2.2 - 1.8) - (2.5 - 2.0), (2.4 - 1.9) - (2.7 - 2.1)]
    assert cost["seed_list"] == "0 1" and cost["mean_diff"] == pytest.approx(statistics.mean(diffs))
    assert cost["mean_diff"] < 0  # Muon lost less to the delay: more robust, negative
    # no t-test where AdamW's seed 2 diverged (an infinite difference, D = 0) nor where Muon is below
    # AdamW by the same 0.3 on every seed (D = 4: no spread): '–', not p = 0, and out of the family
    pairs = pd.read_csv(tmp_path / "figs" / "paired.csv")
    assert list(pairs["delay"]) == [0, 4] and pairs["p_value"].isna().all() and pairs["p_holm"].isna().all()
    assert all(line.endswith("| – |") for line in (tmp_path / "figs" / "paired.md").read_text().splitlines()
               if line.startswith(("| 0 |", "| 4 |")))


def test_pairs_are_differences_of_full_precision_values(tmp_path):
    """A loss or a small test set's accuracy is not a 4-decimal number: the paired mean is
    taken before the table rounds it (0.00004 would round to 0.0000)."""
    rows = [{"run_id": f"r{o}{s}", "experiment": "e", "status": "completed", "test_acc": a, "optim.name": o,
             "delay.steps": 4, "optim.lr": 0.1, "seed": s, "delay.kind": "constant"}
            for o, accs in {"sgdm": [0.9, 0.9], "ab": [0.90004, 0.90004]}.items() for s, a in enumerate(accs)]
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    paired.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "f")])
    out = pd.read_csv(tmp_path / "f" / "paired.csv")
    assert out["mean_diff"].iloc[0] == pytest.approx(0.00004, abs=1e-12)
