"""The results table: one row per run folder, from the files in results/runs alone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from abexp import io
from abexp.config import flatten, load_config
from abexp.runner import FAILED, run_state, runs_dir

SUMMARY = ["run_id", "experiment", "variant", "status", "test_acc", "best_test_acc",
           "epochs_completed", "steps", "wall_s", "eval_bn"]


def _row(run_dir: Path) -> dict | None:
    result_file, config_file = run_dir / "result.json", run_dir / "config.yaml"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        config = result.pop("config")
    elif config_file.exists():
        config = load_config(config_file).model_dump()
        state = run_state(run_dir)
        result = {"run_id": run_dir.name, "status": state}
        result["epochs_completed"] = len(io.read_jsonl(run_dir / "metrics.jsonl"))
        if (run_dir / FAILED).exists() and state == "failed":
            result["error"] = json.loads((run_dir / FAILED).read_text()).get("error")
    else:
        return None
    row = {k: result.get(k) for k in SUMMARY}
    row["experiment"] = config.get("experiment", "")
    row["variant"] = config.get("variant", "")
    if "error" in result:
        row["error"] = result["error"]
    for key, value in flatten({k: v for k, v in config.items() if k not in ("experiment", "variant")}).items():
        row[key] = json.dumps(value) if isinstance(value, list) else value
    return row


def collect(results: str | Path, run_ids: list[str] | None = None) -> pd.DataFrame:
    root = runs_dir(results)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []
    if run_ids is not None:
        wanted = set(run_ids)
        folders = [p for p in folders if p.name in wanted]
    rows = [r for r in (_row(p) for p in folders) if r is not None]
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=SUMMARY)
    return table


def collect_epochs(results: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long table of per-epoch metrics (metrics.jsonl), joined with each run's config columns."""
    runs = collect(results) if runs is None else runs
    frames = []
    for run in runs.to_dict("records"):
        rows = io.read_jsonl(runs_dir(results) / run["run_id"] / "metrics.jsonl")
        if rows:
            frame = pd.DataFrame(rows)
            for key, value in run.items():
                if key not in frame.columns:
                    frame[key] = value
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "epoch"])


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    if path.suffix == ".parquet":
        import io as stdio
        buf = stdio.BytesIO()
        table.to_parquet(buf, index=False)
        io.write_bytes(path, buf.getvalue())
    elif path.suffix == ".csv":
        io.write_text(path, table.to_csv(index=False))
    else:
        raise ValueError(f"{path}: expected a .csv or .parquet file")


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
