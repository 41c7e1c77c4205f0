"""Paired comparison of every optimizer with a named baseline (default SGDM), per delay.

Each optimizer at its selected lr per delay (abexp.figures.tuned_lr: on the mean validation
accuracy when every run has one, else on test; a study with one lr per cell uses it) is paired
with the baseline at *its* selected lr, seed by seed: difference = acc(rule, seed s, D) −
acc(baseline, seed s, D), test accuracy, a diverged run counting 0. The table gives the per-seed
differences, their mean, the two-sided 95% Student-t interval of the mean (mean ± t(0.975, n−1)
· sd/√n over the n paired seeds; no interval from one seed), n and the seeds, and how many
paired seeds a two-sided paired t-test at alpha 0.05 needs to detect a true difference of the
observed mean size with 80% power when the differences spread as observed (exact noncentral-t
power, abexp.figures.stats). With 2 seeds that sd, and so that count, is itself very uncertain.
The last column is the paired t-test's two-sided p-value, Holm-adjusted over every comparison of
the one table (a table of several rules and delays is that many tests; the intervals are not
adjusted).
A language model's runs (common.Metric) are compared on test loss in nats per character
(lr selected on validation loss, a diverged run counting infinite loss): a negative difference is
the better rule. Writes paired.md and paired.csv; and paired_cost.md/.csv, the same pairing of
what the delay cost each rule (its value at the delay against its own undelayed run, seed by
seed): whether a rule is more robust to delay than the baseline, not only better under it.
Several baselines (``--baseline`` repeated, one series each of different optimizers) read an
ablation study: each series is paired with its own optimizer's baseline (the unablated arm),
not across optimizers; a series whose optimizer has no baseline then is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from abexp.figures import common, stats, tuned_lr

LEVEL, POWER, ALPHA = 0.95, 0.8, 0.05


@dataclass
class Selection:
    tuned: pd.DataFrame  # one row per (series, delay): the selected lr and its per-seed values
    on_val: bool  # whether validation (not test) selected the lrs
    metric: common.Metric
    series: dict[str, str]  # series name -> optimizer, in the fixed order of every figure


def selected(table: pd.DataFrame) -> Selection:
    """Each optimizer's selected lr per delay (tuned_lr.best) with its per-seed accuracies (or
    losses), as the tuned-lr table selects it. Adds ``acc`` (the reported metric, a diverged run
    scored), ``sel`` (the selecting one, when validation selects) and ``series`` to ``table``."""
    metric = common.Metric(table)  # accuracy, or a language model's loss (lower is better)
    table["acc"] = metric.scores(table)
    on_val = tuned_lr.selects_on_validation(table, metric.val)
    if on_val:
        table["sel"] = metric.scores(table, metric.val)
    series = common.add_series(table, axes=("delay.steps", "optim.lr"))
    return Selection(tuned_lr.best(tuned_lr.per_lr(table), metric), on_val, metric, series)


def by_seed(row) -> dict[int, float]:
    return dict(zip((int(s) for s in str(row["seed_list"]).split()), (float(a) for a in str(row["accs"]).split())))


def against_reference(tuned: pd.DataFrame, group: str, member: str, reference, sort: bool):
    """For each ``group`` of ``tuned`` that has the ``reference`` ``member``: every other member's
    row with its per-seed values and the reference's, (group, member, row, reference row, mine, theirs)."""
    for key, cells in tuned.groupby(group, sort=sort):
        cells = cells.set_index(member)
        if reference not in cells.index:
            continue
        theirs = by_seed(cells.loc[reference])
        for name, cell in cells.iterrows():
            if name != reference:
                yield key, name, cell, cells.loc[reference], by_seed(cell), theirs


def compare(tuned: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per delay and non-baseline series: the paired differences with ``baseline`` (a series
    name) on the seeds both have, their t-interval and the seeds 80% power needs."""
    rows = []
    for delay, name, cell, base_cell, mine, base in against_reference(tuned, "delay", "series", baseline, sort=True):
        seeds = sorted(set(mine) & set(base))
        if not seeds:
            continue
        diffs = [mine[s] - base[s] for s in seeds]
        mean, sd, low, high = stats.t_interval(diffs, LEVEL)
        need = stats.seeds_for_power(mean, sd, POWER, ALPHA) if len(seeds) > 1 else None
        p_value = stats.paired_t_p(mean, sd, len(seeds))
        rows.append({"delay": int(delay), "series": name, "baseline": baseline, "lr": cell["lr"],
                     "baseline_lr": base_cell["lr"], "seeds": len(seeds),
                     "seed_list": " ".join(map(str, seeds)),
                     "diffs": " ".join(f"{d:+.4f}" for d in diffs), "mean_diff": mean, "sd_diff": sd,
                     "ci_low": low, "ci_high": high, "interval": f"t, {LEVEL:.0%}, two-sided",
                     "seeds_for_80pct_power": need, "p_value": p_value})
    return pd.DataFrame(rows)


def with_holm(out: pd.DataFrame) -> pd.DataFrame:
    """``out`` with ``p_holm``: its p-values adjusted together, the table being the family."""
    return out.assign(p_holm=stats.holm([float(p) for p in out["p_value"]]))


def rises(tuned: pd.DataFrame, undelayed: int, harm: float, diverged: float) -> pd.DataFrame:
    """``tuned`` with each delayed cell's per-seed values replaced by what the delay cost that
    seed: harm · (value undelayed − value delayed), each at its own selected lr, on the seeds
    both have (positive: the delay hurt). compare() on it pairs the costs, not the values.
    A seed whose undelayed run diverged (value ``diverged``) has no cost to measure and is left
    out; a delayed run that diverged costs the most there is (infinite loss, all the accuracy)."""
    rows = []
    for name, delay, cell, _, mine, start in against_reference(tuned, "series", "delay", undelayed, sort=False):
        seeds = sorted(s for s in set(mine) & set(start) if start[s] != diverged)
        costs = [harm * (start[s] - mine[s]) for s in seeds]
        rows.append({**cell.to_dict(), "series": name, "delay": delay, "seed_list": " ".join(map(str, seeds)),
                     "accs": " ".join(f"{c!r}" for c in costs)})
    return pd.DataFrame(rows)


def markdown(out: pd.DataFrame, baselines: list[str], on_val: bool, metric: common.Metric | None = None,
             axis: common.DelayAxis = common.CONSTANT_AXIS, cost: bool = False) -> list[str]:
    """The table in words; several ``baselines`` (an ablation study's unablated arms) add a
    baseline column."""
    if len(baselines) > 1:
        return several_header("; ".join(baselines), on_val, metric, axis, cost) + rows_markdown(out, True)
    return one_header(baselines[0], on_val, metric, axis, cost) + rows_markdown(out)


# the words every header ends its first line with: what the interval and the power column are
INTERVAL_NOTE = (f"Interval: two-sided {LEVEL:.0%} Student-t interval of the mean difference over the paired "
                 "seeds (mean ± t(0.975, n−1)·sd/√n).")
POWER_NOTE = (f"'seeds for 80% power': paired seeds a two-sided paired t-test at alpha {ALPHA} needs to detect a "
              "true difference of the observed mean with the observed sd (exact noncentral t); with few seeds "
              "that sd is itself uncertain.")
HOLM_NOTE = ("'p (Holm)': the paired t-test's two-sided p-value, Holm-adjusted over every comparison in this "
             f"table that has one (where it is at most {ALPHA}, so is the chance of any false rejection among "
             "them; each table is its own family; the intervals are not adjusted; '–': no test — one seed, "
             "equal differences, or a diverged run's infinite one).")


def table_head(axis: common.DelayAxis, lrs: str) -> list[str]:
    """The column header: ``lrs`` names the lr columns (one baseline's name, or a baseline column)."""
    cells = ["optimizer", *lrs.split(" | "), "per-seed differences", "mean", "95% t-interval", "seeds",
             "seeds for 80% power", "p (Holm)"]
    return [f"| {axis.letter} | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]


def several_header(baselines: str, on_val: bool, metric: common.Metric | None, axis: common.DelayAxis,
                   cost: bool) -> list[str]:
    """An ablation study's header: each rule against its own optimizer's unablated arm."""
    chosen = "validation" if on_val else "test (no validation set)"
    what, diverged = (metric.name, f"{metric.diverged:g}") if metric else ("accuracy", "0")
    kind = (f"what the {axis.word} cost (each rule's test {what} at the {axis.word} against its own undelayed run)"
            if cost else f"final test {what}")
    return [f"Paired differences in {kind}, each series against its own optimizer's baseline ({baselines}): "
            f"series − baseline, same seed, same {axis.word}; each at its own lr selected on {chosen}; a diverged "
            f"run counts {diverged}. {INTERVAL_NOTE} {POWER_NOTE} {HOLM_NOTE}", "", *table_head(axis, "baseline | lr | baseline lr")]


def one_header(baseline: str, on_val: bool, metric: common.Metric | None, axis: common.DelayAxis,
               cost: bool) -> list[str]:
    """One baseline's header: every rule against it."""
    chosen = "validation" if on_val else "test (no validation set)"
    what, diverged = (metric.name, f"{metric.diverged:g}") if metric else ("accuracy", "0")
    head = table_head(axis, f"lr | {baseline} lr")
    if cost:  # the difference in what the delay cost, not in the values
        change = "added to" if metric and metric.lower else "took from"
        return [f"Paired differences in what the {axis.word} cost, against {baseline}: for each rule and seed, the "
                f"test {what} the {axis.word} {change} its own undelayed run ({axis.letter} = {axis.undelayed}; each "
                f"at its own lr selected on {chosen}; a diverged run counts {diverged}), rule's cost − {baseline}'s "
                f"cost, same seed. Positive: the {axis.word} cost the rule more than {baseline} (less robust); "
                f"negative: less (more robust). {INTERVAL_NOTE} 'seeds for 80% power', 'p (Holm)': as in the paired "
                f"table (Holm over this table's comparisons).", "", *head]
    return [f"Paired differences in final test {what} against {baseline} (rule − {baseline}, same seed, same "
            f"{axis.word}; each at its own lr selected on {chosen}; a diverged run counts {diverged}). "
            f"{INTERVAL_NOTE} {POWER_NOTE} {HOLM_NOTE}", "", *head]


def baseline_argv(baselines) -> list[str]:
    """``--baseline`` once per baseline: how abexp figures and the study tables pass them on."""
    return [arg for baseline in baselines for arg in ("--baseline", baseline)]


def rows_markdown(out: pd.DataFrame, with_baseline: bool = False) -> list[str]:
    lines = []
    for r in out.to_dict("records"):
        interval = "– (one seed)" if r["seeds"] < 2 else f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        need = r["seeds_for_80pct_power"]
        need = "–" if need is None or need != need else str(int(need))
        base = f" {r['baseline']} |" if with_baseline else ""
        lines.append(f"| {r['delay']} | {r['series']} |{base} {r['lr']:g} | {r['baseline_lr']:g} | {r['diffs']} | "
                     f"{r['mean_diff']:+.4f} | {interval} | {r['seeds']} ({r['seed_list']}) | {need} | "
                     f"{p_text(r['p_holm'])} |")
    return lines


def p_text(p: float) -> str:
    """A p-value to four places (what the 0.05 line needs), '–' where no test was possible."""
    if p != p:
        return "–"
    return "<0.0001" if p < 0.0001 else f"{p:.4f}"


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__)
    p.add_argument("--baseline", action="append",
                   help="the optimizer (optim.name) every other is paired with, or one series by its label "
                        "when the optimizer has several (an ablation: 'AB, ρ 1'); default sgdm. Repeated (one "
                        "per optimizer): each series is paired with its own optimizer's baseline")
    args = p.parse_args(argv)
    baselines = args.baseline or ["sgdm"]
    table = common.finished(common.load(args.table, args.experiment))
    if table.empty or "seed" not in table or "optim.lr" not in table:
        common.skip("paired", "no finished runs")
    common.skip_sweeps("paired", table)
    common.per_view("paired", table, lambda view, axis: report(view, axis, baselines, args.out))


def baseline_series(baselines: list[str], series: dict[str, str], stem: str) -> list[str]:
    """Each ``baselines`` entry as the one series it names (a label, or an optimizer with one
    series); several must be of different optimizers (each optimizer's arms have one reference)."""
    found = []
    for baseline in baselines:
        bases = [baseline] if baseline in series else [s for s, optim in series.items() if optim == baseline]
        if len(bases) != 1:
            common.skip(stem, f"baseline {baseline}: {len(bases)} series in this study (need exactly one)")
        found += bases
    optims = [series[b] for b in found]
    if len(set(optims)) != len(optims):
        common.skip(stem, f"baselines {'; '.join(found)}: two of one optimizer (need one per optimizer)")
    return found


def compare_each(tuned: pd.DataFrame, bases: list[str], series: dict[str, str]) -> pd.DataFrame:
    """compare() with one baseline; with several, each optimizer's series against its own."""
    if len(bases) == 1:
        return compare(tuned, bases[0])
    parts = [compare(tuned[tuned["series"].map(series) == series[base]], base) for base in bases]
    parts = [part for part in parts if not part.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def report(table: pd.DataFrame, axis: common.DelayAxis, baselines: list[str], out_dir: str) -> None:
    """The paired table of one delay axis (D, or S for pipelines)."""
    stem = f"paired{axis.suffix}"
    if table["seed"].nunique() < 2:
        common.skip(stem, "one seed: nothing to pair an interval on")
    chosen = selected(table)
    tuned, on_val, metric, series = chosen.tuned, chosen.on_val, chosen.metric, chosen.series
    bases = baseline_series(baselines, series, stem)
    out = compare_each(tuned, bases, series)
    if out.empty:
        common.skip(stem, f"no optimizer shares a seed and a {axis.letter} with {'; '.join(bases)}")
    rank = {s: i for i, s in enumerate(series)}  # the fixed optimizer order of every figure

    def ordered(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.sort_values(["delay", "series"], key=lambda c: c.map(rank) if c.name == "series" else c,
                                 ignore_index=True)

    out = with_holm(ordered(out))
    write(out, markdown(out, bases, on_val, metric, axis), stem, out_dir, metric.val if on_val else metric.test)
    costs = rises(tuned, axis.undelayed, metric.harm, metric.diverged)
    cost = compare_each(costs, bases, series) if not costs.empty else costs
    if not cost.empty:  # the same rules, judged by what the delay cost each (robustness)
        cost = with_holm(ordered(cost))
        write(cost, markdown(cost, bases, on_val, metric, axis, cost=True), f"paired_cost{axis.suffix}",
              out_dir, metric.val if on_val else metric.test)


def write(out: pd.DataFrame, lines: list[str], stem: str, out_dir: str, selected_on: str) -> None:
    print("\n".join(lines))
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out.assign(selected_on=selected_on).to_csv(folder / f"{stem}.csv", index=False)
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {folder / stem}.csv/.md")


if __name__ == "__main__":
    main()
