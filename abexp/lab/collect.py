"""The results table: one row per run folder, from the files in results/runs alone."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from abexp import io
from abexp.config import ConfigError, flatten, load_config
from abexp.lab.runner import run_state, runs_dir
from abexp.train.folder import RunFolder

SUMMARY = ["run_id", "experiment", "variant", "status", "val_acc", "val_loss", "best_val_acc", "test_acc", "test_acc_running_bn", "best_test_acc",
           "epochs_completed", "steps", "wall_s", "eval_bn", "device",
           # a language model's (lower is better): losses in nats, and bits, per character
           "test_loss", "best_val_loss", "best_test_loss", "val_bpc", "test_bpc"]


def _read_result(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise io.DamagedFile(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(result, dict) or not isinstance(result.get("config"), dict):
        raise io.DamagedFile(f"{path}: not a result record (no config)")
    if result.get("run_id") != path.parent.name:
        raise io.DamagedFile(f"{path}: belongs to run {result.get('run_id')}, not {path.parent.name}")
    return result


def _row(run_dir: Path) -> dict | None:
    folder = RunFolder(run_dir)
    result_file, config_file = folder.result, folder.config
    if result_file.exists():
        result = _read_result(result_file)
        config = result.pop("config")
        epochs = io.read_jsonl(folder.metrics)
        if len(epochs) < (result.get("epochs_completed") or 0):  # never a partial run as complete
            raise io.DamagedFile(f"{folder.metrics}: {len(epochs)} epochs, but {folder.RESULT} "
                                 f"says {result.get('epochs_completed')}")
    elif config_file.exists():
        try:
            config = load_config(config_file, check_names=False).model_dump()  # no plugin needed
        except ConfigError as err:
            raise io.DamagedFile(str(err)) from None
        state = run_state(run_dir)
        result = {"run_id": run_dir.name, "status": state}
        result["epochs_completed"] = len(io.read_jsonl(folder.metrics))
        if folder.failed.exists() and state == "failed":
            result["error"] = folder.read_failure().get("error")
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


def warn(message: str) -> None:
    import sys
    print(f"abexp: warning: skipped {message}", file=sys.stderr)


def collect(results: str | Path, run_ids: list[str] | None = None,
            damaged: list[str] | None = None) -> pd.DataFrame:
    """One row per run folder. A damaged folder is skipped with one warning naming the file
    (and appended to ``damaged``), never read as a complete run."""
    root = runs_dir(results)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []
    if run_ids is not None:
        wanted = set(run_ids)
        folders = [p for p in folders if p.name in wanted]
    rows = []
    for folder in folders:
        try:
            row = _row(folder)
        except io.DamagedFile as err:
            warn(str(err))
            if damaged is not None:
                damaged.append(str(err))
            continue
        if row is not None:
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=SUMMARY)
    return table


def collect_epochs(results: str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long table of per-epoch metrics (metrics.jsonl), joined with each run's config columns."""
    runs = collect(results) if runs is None else runs
    frames = []
    for run in runs.to_dict("records"):
        try:
            rows = io.read_jsonl(RunFolder.of(results, run["run_id"]).metrics)
        except io.DamagedFile as err:  # collect() skipped finished ones already; this is a partial run
            warn(str(err))
            continue
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


def readable(table: pd.DataFrame, summary: list[str]) -> pd.DataFrame:
    """The printed table: run id, experiment, the config keys that vary between runs (the
    optimizer, delay and seed first), then the results; sorted by those keys."""
    from abexp.config import NON_IDENTITY_KEYS
    if table.empty:
        return table
    first = ["optim.name", "delay.kind", "delay.steps", "delay.stages", "seed"]
    config = [c for c in table.columns if "." in c or c == "seed"]
    config = [c for c in config if not any(c == k or c.startswith(k + ".") for k in NON_IDENTITY_KEYS)]
    varying = [c for c in config if table[c].astype(str).nunique() > 1]
    keys = [c for c in first if c in varying] + sorted(c for c in varying if c not in first)
    results = [c for c in summary if c in table.columns and c not in ("run_id", "experiment", "variant")]
    columns = ["run_id", "experiment"] + keys + results
    return table[columns].sort_values(["experiment"] + keys, kind="stable")
