"""W&B across a SIGKILL: the resumed run's W&B history holds every epoch exactly once, as
wandb's own offline reader (`wandb leet inspect --json`) reads it back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from abexp.config import load_config, run_id
from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def wandb_history(wandb_file):
    """History rows of one offline log, read by the installed wandb's CLI (not abexp's code)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
                         capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_every_epoch_reaches_wandb_once_after_a_sigkill_between_epochs(tmp_path):
    overrides = TINY + ["train.epochs=5", "tracking.wandb.mode=offline", "experiment=wbkill"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "abexp.cli", "train", str(cfg_file), "--out", str(out), "--device", "cpu"]
    for o in overrides:
        cmd += ["--set", o]
    # no WANDB_* from this process: an earlier in-process test may have left its wandb service
    # address (WANDB_SERVICE), which would outlive the kill and hold the run id
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and wandb's service process with it
    proc.wait()
    assert len(metrics.read_text().splitlines()) in (2, 3), "killed too late to test anything"

    rid = run_id(load_config(cfg_file, overrides))
    logs = lambda: sorted(out.glob(f"wandb/offline-run-*-{rid}/run-{rid}.wandb"))  # noqa: E731
    before = {f: [r["epoch"] for r in wandb_history(f)] for f in logs()}
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    assert len(logs()) == 2  # one offline folder per process, both under the run id
    rows = [row for f in logs() for row in wandb_history(f)]
    assert sorted(r["epoch"] for r in rows) == [1, 2, 3, 4, 5], (before, rows)
    truth = {r["epoch"]: r["test_acc"] for r in map(json.loads, metrics.read_text().splitlines())}
    assert {r["epoch"]: r["test_acc"] for r in rows} == truth
    # the first process's log kept only what wandb had flushed; the rest came from the checkpoint
    assert [r["epoch"] for r in wandb_history(logs()[0])] == next(iter(before.values()))


PACK = """
import sys
from abexp.config import load_config
from abexp.train.packed import train_pack
cfgs = [load_config(None, sys.argv[2:] + [f"seed={s}", f"optim.name={o}"]) for s, o in ((0, "sgdm"), (1, "ab"))]
train_pack(cfgs, [f"{sys.argv[1]}/a", f"{sys.argv[1]}/b"], device="cpu", log=lambda m: None)
"""


def test_packed_runs_log_every_epoch_to_their_own_wandb_run(tmp_path):
    """A pack of two runs: each run's own offline W&B log holds its epochs, once, with the
    values of its metrics.jsonl (packed runs logged nothing to W&B before the shared lifecycle)."""
    overrides = TINY + ["train.epochs=3", "tracking.wandb.mode=offline", "experiment=wbpack"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", WANDB_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", PACK, str(tmp_path), *overrides], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("a", "b"):
        out = tmp_path / name
        rid = json.loads((out / "result.json").read_text())["run_id"]
        logs = sorted(out.glob(f"wandb/offline-run-*-{rid}/run-{rid}.wandb"))
        assert len(logs) == 1
        rows = wandb_history(logs[0])
        truth = {r["epoch"]: r["test_acc"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
        assert {r["epoch"]: r["test_acc"] for r in rows} == truth and len(rows) == 3


BLOCK_WANDB = '''
import sys
class _NoWandb:
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoWandb())
'''


def test_auto_mode_falls_back_to_disabled_where_wandb_cannot_be_imported(tmp_path):
    """A GPU node's image without wandb: `tracking.wandb.mode: auto` trains, W&B off, one note."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK_WANDB)
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{ROOT}"}
    env.pop("WANDB_MODE", None)
    assert subprocess.run([sys.executable, "-c", "import wandb"], env=env, capture_output=True).returncode != 0
    config = tmp_path / "run.yaml"
    config.write_text("model: {name: resnet8}\ndata: {name: digits, subset: 64, test_subset: 32}\n"
                      "train: {epochs: 2, batch_size: 32}\ntracking: {wandb: {mode: auto}}\n")
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "train", str(config), "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("note: tracking.wandb.mode auto: wandb cannot be imported") == 1, proc.stderr
    assert json.loads((tmp_path / "run" / "result.json").read_text())["epochs_completed"] == 2
    assert not (tmp_path / "run" / "wandb").exists()
