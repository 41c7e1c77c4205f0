"""The confirmation stage of a study: more seeds at each rule's selected lr, as a spec.

A careful study tunes on few seeds and confirms on more. ``abexp confirm SPEC`` reads the
finished runs of SPEC, selects each optimizer's lr per delay (and per pipeline stage count)
exactly as the tuned-lr figure does (abexp.figures.paired.selected: the mean validation metric
when every run has one, else test), and writes a spec that runs the requested seeds at those
lrs only. The written spec extends SPEC's base and keeps SPEC's name and variant names, so its
runs have the run ids SPEC would give them: a run finished by either is finished for both, and
``abexp figures`` reads them as one study (the first stage's seeds select the lr again, and the
selected lr's cell reports every seed: tuned_lr.selection_seeds). The
selection is mechanical and recorded in the spec's description, never edited by hand; the
written spec is checked to expand to exactly the runs meant before it is written.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from abexp import io
from abexp.config import ConfigError
from abexp.figures import common, paired
from abexp.lab.spec import PlannedRun, Spec, expand, load_spec

KEEP_OUT = ("seed", "variant")  # never zipped: the seed is the new grid, the variant its own name


class _Dumper(yaml.SafeDumper):
    """Safe YAML whose multi-line strings (the description's list of selections) stay readable,
    with no anchors and aliases for values that happen to be shared."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def selected_runs(spec: Spec, table: pd.DataFrame) -> tuple[list[dict[str, Any]], list[str]]:
    """The selected cells (one dict per optimizer and delay: view, series, delay, lr, val/test
    means, seeds, run ids) and the lines that describe them."""
    cells, lines = [], []
    for axis, view in common.delay_views(table):
        selection = paired.selected(view)
        chosen = selection.metric.val if selection.on_val else selection.metric.test
        for row in selection.tuned.sort_values(["delay", "series"]).to_dict("records"):
            runs = view[(view["series"] == row["series"]) & (view["delay.steps"] == row["delay"])
                        & (view["optim.lr"] == row["lr"])]
            score = row["selection_score"]
            cells.append({"axis": axis.letter, "series": row["series"], "delay": int(row["delay"]),
                          "lr": float(row["lr"]), "run_ids": sorted(set(runs["run_id"]))})
            edge = f" (the {row['edge']} edge of {row['lrs_compared']} lrs)" if row["edge"] else ""
            lines.append(f"{axis.letter} = {row['delay']}: {row['series']} at lr {row['lr']:g}{edge}, "
                         f"mean {chosen} {score:.4f} over seeds {row['selection_seeds']}")
    return cells, lines


def incomplete(plan: list[PlannedRun], table: pd.DataFrame) -> list[str]:
    """Planned runs at the seeds the selection rests on that have not finished: selecting before
    they have would pick from part of the grid."""
    seeds = set(int(s) for s in table["seed"])
    done = set(table["run_id"])
    return [r.run_id for r in plan if r.config.seed in seeds and r.run_id not in done]


def confirm_doc(spec: Spec, out: Path, overrides: list[dict[str, Any]], seeds: list[int],
                description: str) -> dict[str, Any]:
    """A spec document whose runs are ``overrides`` (without their seeds) crossed with
    ``seeds``, under the same name and variant names as ``spec``."""
    base = {"extends": os.path.relpath(spec.path.resolve(), out.resolve().parent)}
    doc: dict[str, Any] = {"name": spec.name, "description": description, "base": base}
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for o in overrides:
        by_variant.setdefault(str(o.get("variant", "")), []).append(o)

    def zipped(rows: list[dict[str, Any]], fixed: dict[str, Any]) -> dict[str, list]:
        keys = [k for k in rows[0] if k not in KEEP_OUT and k not in fixed]
        return {k: [r[k] for r in rows] for k in keys}

    if spec.variants:
        doc["variants"] = {}
        for name, rows in by_variant.items():
            original = spec.variants[name]
            fixed = {k: v for k, v in original[0].items()
                     if all(k in r and r[k] == v for r in original)}
            entry: dict[str, Any] = dict(fixed)
            group = zipped(rows, fixed)
            if group:
                entry["zip"] = group
            doc["variants"][name] = entry
    else:
        group = zipped(by_variant[""], {})
        if group:
            doc["zip"] = [group]
    doc["grid"] = {"seed": list(seeds)}
    if spec.exclude:  # the study's exclusions hold for the new seeds too
        doc["exclude"] = [dict(rule) for rule in spec.exclude]
    return doc


def write_confirm_spec(spec_path: str | Path, results: str | Path, seeds: list[int], out: str | Path,
                       allow_partial: bool = False) -> list[str]:
    """Select, write the confirmation spec to ``out`` (atomically) and return its run ids."""
    from abexp.lab.collect import collect

    spec, out = load_spec(spec_path), Path(out)
    if out.resolve() == spec.path.resolve():
        raise ConfigError(str(out), "output", "is the study's own spec, which the written one extends")
    plan = spec.expand(warn=lambda msg: None)
    by_id = {r.run_id: r for r in plan}
    # a folder of runs, or a study's committed rows (analysis/study_rows.py): a new machine selects from those
    if Path(results).suffix == ".csv" and not Path(results).is_file():
        raise ConfigError(str(results), "rows", "no such rows file")
    table = pd.read_csv(results, dtype={"run_id": str}) if Path(results).suffix == ".csv" else collect(results)
    if table.empty or "run_id" not in table:
        raise ConfigError(str(results), "runs", f"no runs of {spec_path} here")
    table = table[table["run_id"].isin(by_id) & table["status"].isin(["completed", "diverged"])].copy()
    if table.empty:
        raise ConfigError(str(results), "runs", f"no finished run of {spec_path} here")
    missing = incomplete(plan, table)
    if missing and not allow_partial:
        raise ConfigError(str(spec_path), "seed", f"{len(missing)} planned runs at the selecting seeds "
                          f"{sorted(set(int(s) for s in table['seed']))} have not finished (e.g. {missing[0]}): "
                          "selecting now would pick from part of the grid (--allow-partial to do it anyway)")
    cells, lines = selected_runs(spec, table)
    chosen_ids = {rid for cell in cells for rid in cell["run_ids"]}
    if not chosen_ids:
        raise ConfigError(str(spec_path), "optim.lr", "nothing to select: no optimizer was run at a delay "
                          "(constant or pipeline) with a finished run")
    elsewhere = sorted(set(table.get("delay.kind", pd.Series(dtype=str)).dropna()) - {"constant", "pipeline"})
    if elsewhere:  # asynchronous and replayed runs have no tuned-lr table to select on
        lines.append(f"(runs with delay.kind {', '.join(elsewhere)} are not part of this stage)")
    base_overrides: dict[tuple, dict[str, Any]] = {}
    for r in plan:  # plan order: the written spec runs the cells in the order SPEC would
        if r.run_id in chosen_ids:
            o = {k: v for k, v in r.overrides.items() if k != "seed"}
            base_overrides.setdefault(tuple(sorted((k, str(v)) for k, v in o.items())), o)
    overrides = list(base_overrides.values())

    # the runs meant: SPEC's own expansion at the new seeds, restricted to the selected cells
    wide = Spec(spec.path, spec.name, spec.description, spec.base, {**spec.grid, "seed": list(seeds)},
                spec.variants, spec.zips, spec.exclude, spec.set_keys)
    keys = set(base_overrides)
    meant = [r.run_id for r in expand(wide, warn=lambda msg: None)
             if tuple(sorted((k, str(v)) for k, v in r.overrides.items() if k != "seed")) in keys]

    description = (f"Confirmation stage of {spec.path.name}, written by `abexp confirm` on {date.today()} from "
                   f"{len(table)} finished runs in {results}: seeds {list(seeds)} at each optimizer's lr "
                   "selected per delay as abexp figures' tuned-lr table selects it (same name and variant "
                   "names, so the same run ids). Selected:\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    doc = confirm_doc(spec, out, overrides, seeds, description)
    text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True,
                     default_flow_style=None)
    check = out.with_name(f".{out.name}.check.yaml")
    io.write_text(check, text)
    try:
        written = [r.run_id for r in load_spec(check).expand(warn=lambda msg: None)]
    finally:
        check.unlink(missing_ok=True)
    if sorted(written) != sorted(meant):
        raise RuntimeError(f"confirm: the written spec expands to {len(written)} runs, not the {len(meant)} meant")
    io.write_text(out, text)
    return written
