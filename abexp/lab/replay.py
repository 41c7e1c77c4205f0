"""Replays of a spec's real asynchronous runs: each finished ``delay.kind: async`` run trained
again by the simulator, told the staleness and the batch of every update (its ``trace.txt``).

A replay needs its async run's trace, which exists only once that run has finished, so it
cannot be a static line of the spec. ``abexp replay SPEC`` writes ``RESULTS/replays/<name>.yaml``:
a spec of the same experiment whose base is SPEC's, with one variant ``<variant>_replay`` per
async variant; its ``zip`` lists, for each finished async run, the keys that run's grid and
variant set, its delay keys replaced by ``delay.kind: trace`` and ``delay.trace:
RESULTS/runs/<id>/trace.txt``. It is an ordinary spec: ``abexp run``, ``plan``, ``status`` and
``figures`` take it, and its runs are exactly once and resumable like any other. A replay
equals its async run bitwise (one torch thread per process; docs/async.md), so a study that
replays every async run checks that claim at scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from abexp import io
from abexp.train.folder import RunFolder
from abexp.config import ConfigError, parse_override
from abexp.lab.spec import PlannedRun, Spec, load_spec

# a trace run's delay keys, written out so that a base which sets async keys is overridden too
TRACE_DELAY = {"delay.kind": "trace", "delay.steps": 0, "delay.workers": None, "delay.order": "arrival",
               "delay.slowdown": None, "delay.pause_prob": 0.0, "delay.pause_s": 0.0}
SUFFIX = "_replay"


def finished_async_runs(plan: list[PlannedRun], results: str | Path) -> tuple[list[PlannedRun], int]:
    """The spec's async runs that completed (with their trace), and how many have not finished
    (a diverged run has no whole trace to replay: it is neither)."""
    async_runs = [r for r in plan if r.config.delay.kind == "async"]
    done = [r for r in async_runs if RunFolder.of(results, r.run_id).trace.exists()
            and _completed(RunFolder.of(results, r.run_id))]
    return done, sum(not RunFolder.of(results, r.run_id).finished() for r in async_runs)


def _completed(folder: RunFolder) -> bool:
    try:
        return folder.read_result().get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def replay_spec(spec: Spec, runs: list[PlannedRun], results: str | Path,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """The replay spec of ``runs``, finished async runs of ``spec`` (a YAML-ready mapping)."""
    variants: dict[str, dict[str, list]] = {}
    for run in runs:
        keys = {k: v for k, v in run.overrides.items() if k != "variant" and not k.startswith("delay.")}
        keys["delay.trace"] = str(RunFolder.of(results, run.run_id).trace)
        rows = variants.setdefault(f"{run.overrides.get('variant') or 'async'}{SUFFIX}", {})
        for key, value in keys.items():
            rows.setdefault(key, []).append(value)
    base: dict[str, Any] = {"extends": str(spec.path.resolve())}
    for item in overrides or []:  # the --set of the async runs holds for their replays too
        key, value = parse_override(item, "--set")
        base[key] = value
    return {"name": spec.name,
            "description": f"Replays of the finished async runs of {spec.path} from their trace.txt "
                           f"(written by abexp replay; {len(runs)} runs).",
            "base": base,
            "variants": {name: {**TRACE_DELAY, "zip": rows} for name, rows in variants.items()}}


def write_replay_spec(spec_path: str | Path, results: str | Path,
                      overrides: list[str] | None = None) -> tuple[Path, int, int]:
    """Write RESULTS/replays/<name>.yaml; (its path, replays in it, async runs not finished)."""
    spec = load_spec(spec_path, overrides)
    runs, pending = finished_async_runs(spec.expand(warn=lambda msg: None), results)
    if not runs:
        raise ConfigError(str(spec_path), "delay.kind", f"no finished async run of this spec in {results} "
                          f"to replay ({pending} async run(s) not finished)")
    doc = replay_spec(spec, runs, results, overrides)
    path = Path(results) / "replays" / f"{spec.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(path, yaml.safe_dump(doc, sort_keys=False, width=120))
    return path, len(runs), pending
