"""The table of bad inputs and damaged files a user can produce. Each case: the exit code, one
line on stderr naming the file and the key or flag, and every file in the folder byte-for-byte
as it was (no new file either), unless the case says which file may change and why."""

import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from abexp.cli import main
from abexp.config import load_config, run_id
from abexp.lab.spec import load_spec

TINY = "model: {name: resnet8}\ndata: {name: digits, subset: 64, test_subset: 32}\ntrain: {epochs: 1, batch_size: 32}\n"


def spec_text(name: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        name: {name}
        base:
          model: {{name: resnet8}}
          data: {{name: digits, subset: 64, test_subset: 32}}
          train: {{epochs: 1, batch_size: 32}}
        grid:
          optim.name: [sgdm, ab]
        """) + extra


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None), relative to ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def foreign_run_folder(tmp: Path) -> None:
    """results/runs/<id of the sgdm run>/config.yaml holds the ab run's config (a copied folder)."""
    from abexp.config import dump_yaml

    write(tmp, {"s.yaml": spec_text("s")})
    sgdm, ab = load_spec(tmp / "s.yaml").expand()
    write(tmp, {f"r/runs/{sgdm.run_id}/config.yaml": dump_yaml(ab.config)})


# label, files, argv, exit code, fragments of the one stderr line
CASES = [
    ("spec extends itself", {"self.yaml": "name: s\nbase: {extends: self.yaml}\n"},
     ["plan", "self.yaml"], 2, ["self.yaml", "base.extends", "cycle"]),
    ("specs extend each other", {"a.yaml": "name: a\nbase: {extends: b.yaml}\n",
                                 "b.yaml": "name: b\nbase: {extends: a.yaml}\n"},
     ["plan", "a.yaml"], 2, ["base.extends", "cycle"]),
    ("duplicate key in a config", {"c.yaml": "optim:\n  lr: 0.1\n  lr: 0.2\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "lr", "given twice", "line 3"]),
    ("duplicate key in a spec", {"s.yaml": spec_text("s", "grid:\n  seed: [0, 1]\n")},
     ["plan", "s.yaml"], 2, ["s.yaml", "grid", "given twice"]),
    ("nan in a config", {"c.yaml": TINY + "optim: {lr: .nan}\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "optim.lr"]),
    ("infinity in a config", {"c.yaml": TINY + "optim: {momentum: 0.9, rho: .inf}\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "optim.rho", "finite"]),
    ("an epoch factor per epoch, one short", {"c.yaml": TINY + "schedule: {epoch_factors: [0.5, 0.7]}\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "schedule.epoch_factors", "2 given", "train.epochs is 1"]),
    ("a zero epoch factor", {"c.yaml": TINY + "schedule: {epoch_factors: [0.0]}\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "schedule.epoch_factors", "positive"]),
    ("infinity through --set", {"c.yaml": TINY},  # YAML reads inf as a string: refused, not coerced
     ["train", "c.yaml", "--set", "optim.lr=inf", "--out", "o"], 2, ["--set", "optim.lr", "'inf'"]),
    ("YAML's infinity through --set", {"c.yaml": TINY},
     ["train", "c.yaml", "--set", "optim.lr=.inf", "--out", "o"], 2, ["--set", "optim.lr", "finite"]),
    ("a string for a boolean", {"c.yaml": TINY + "optim: {momentum: 0.9, nesterov: 'yes'}\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "optim.nesterov", "boolean", "'yes'"]),
    ("a string for an integer", {"c.yaml": TINY.replace("epochs: 1", "epochs: '1'")},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "train.epochs", "integer"]),
    ("a misspelt key", {"c.yaml": TINY + "optim: {momentum: 0.9, nesterv: true}\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "optim.nesterv", "did you mean optim.nesterov"]),
    ("a misspelt spec key", {"s.yaml": spec_text("s").replace("grid:", "gird:")},
     ["plan", "s.yaml"], 2, ["s.yaml", "gird", "did you mean grid"]),
    ("a misspelt key in a spec's grid", {"s.yaml": spec_text("s").replace("optim.name:", "optim.nme:")},
     ["plan", "s.yaml"], 2, ["s.yaml", "optim.nme", "did you mean optim.name"]),
    ("more pipeline stages than parameter tensors", {"s.yaml": spec_text("s").replace(
        "batch_size: 32}\n", "batch_size: 32}\n  delay: {kind: pipeline, stages: 24}\n")},
     ["run", "s.yaml", "--results", "r"], 2, ["s.yaml", "delay.stages", "resnet8 has 23 parameter tensors"]),
    ("more stage delays than parameter tensors",
     {"c.yaml": TINY + "delay: {kind: pipeline, stage_delays: [" + ", ".join(["1"] * 24) + "]}\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "delay.stage_delays", "at most 23 stages"]),
    ("a misspelt section", {"c.yaml": TINY + "optimizer: {momentum: 0.9}\n"},
     ["train", "c.yaml", "--out", "o"], 2, ["c.yaml", "optimizer", "did you mean optim"]),
    ("nan in a spec's grid", {"s.yaml": spec_text("s").replace("[sgdm, ab]", "[sgdm]\n  optim.lr: [.nan]")},
     ["plan", "s.yaml"], 2, ["s.yaml", "optim.lr"]),
    ("a run folder holding another run", foreign_run_folder,
     ["run", "s.yaml", "--results", "r", "--no-progress"], 2, ["config.yaml", "holds run"]),
    ("results path is a file", {"s.yaml": spec_text("s"), "r": "not a folder\n"},
     ["run", "s.yaml", "--results", "r"], 2, ["--results", "is a file"]),
    ("--workers -1", {"s.yaml": spec_text("s")},
     ["run", "s.yaml", "--results", "r", "--workers", "-1"], 2, ["--workers"]),
    ("--workers 0", {"s.yaml": spec_text("s")},
     ["run", "s.yaml", "--results", "r", "--workers", "0"], 2, ["--workers"]),
    ("--set on a key the grid varies", {"s.yaml": spec_text("s")},
     ["run", "s.yaml", "--results", "r", "--set", "optim.name=ab"], 2, ["optim.name", "--set"]),
    ("--set with a value of the wrong type", {"s.yaml": spec_text("s")},
     ["plan", "s.yaml", "--set", "optim.lr=abc"], 2, ["--set", "optim.lr"]),
    ("missing data folder", {"s.yaml": spec_text("s").replace("{name: digits, subset: 64, test_subset: 32}",
                                                              "{name: cifar10, root: nowhere}")},
     ["run", "s.yaml", "--results", "r"], 2, ["CIFAR-10", "nowhere"]),
    ("collect to an unknown format", {}, ["collect", "--results", "r", "-o", "x.xlsx"], 2, ["-o", "x.xlsx"]),
    ("stability with a negative delay", {}, ["stability", "--delays", "-1"], 2, ["--delays"]),
    ("sweep objective as a string", {"w.yaml": "name: w\nbase: {}\nspace: {optim.lr: {type: float, low: 0.01, "
                                               "high: 0.1}}\nobjective: test_acc\n"},
     ["sweep", "w.yaml", "--results", "r"], 2, ["w.yaml", "objective"]),
    ("sweep over a missing dataset", {"w.yaml": "name: w\nbase: {data: {name: fashion_mnist, root: nowhere}}\n"
                                                "space: {optim.lr: {type: float, low: 0.01, high: 0.1}}\n"},
     ["sweep", "w.yaml", "--results", "r"], 2, ["nowhere"]),
    ("a spec name that is a path", {"s.yaml": spec_text("../../evil_escape")},
     ["run", "s.yaml", "--results", "r"], 2, ["s.yaml", "name", "'../../evil_escape'", "plain name"]),
    ("a spec name with a leading dot", {"s.yaml": spec_text(".hidden")},
     ["replay", "s.yaml", "--results", "r"], 2, ["s.yaml", "name", "leading dot"]),
    ("a sweep name that is a path", {"w.yaml": "name: ../../evil_escape\nbase: {}\nspace: {optim.lr: {type: float, "
                                               "low: 0.01, high: 0.1}}\n"},
     ["sweep", "w.yaml", "--results", "r/sweeps"], 2, ["w.yaml", "name", "plain name"]),
    ("a sweep whose base has more stages than parameter tensors",
     {"w.yaml": "name: w\nbase: {model: {name: resnet8}, delay: {kind: pipeline, stages: 40}}\n"
                "space: {optim.lr: {type: float, low: 0.01, high: 0.1}}\nn_trials: 1\n"},
     ["sweep", "w.yaml", "--results", "r"], 2, ["w.yaml", "delay.stages", "resnet8 has 23 parameter tensors"]),
    ("sweep max_consecutive_failures 0", {"w.yaml": "name: w\nbase: {}\nspace: {optim.lr: {type: float, low: 0.01, "
                                                    "high: 0.1}}\nmax_consecutive_failures: 0\n"},
     ["sweep", "w.yaml", "--results", "r"], 2, ["w.yaml", "max_consecutive_failures", "positive integer"]),
    ("sweep --best before any trial", {"w.yaml": "name: w\nbase: {}\nspace: {optim.lr: {type: float, low: 0.01, "
                                                 "high: 0.1}}\n"},
     ["sweep", "w.yaml", "--results", "r", "--best"], 1, ["w", "no study"]),
]


@pytest.mark.parametrize("label, files, argv, code, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, monkeypatch, capsys, label, files, argv, code,
                                                   fragments):
    monkeypatch.chdir(tmp_path)
    files(tmp_path) if callable(files) else write(tmp_path, files)
    before = snapshot(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        rc = exit.code
    assert rc == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- permissions and a full disk
# As root, permission bits do not apply; dropping the two capabilities that bypass them
# (setpriv) makes them apply to root too. A full disk is simulated by a file-size limit: the
# write fails with EFBIG where it would fail with ENOSPC, through the same code path.

NO_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def abexp(argv, cwd, prefix=(), preexec=None):
    return subprocess.run([*prefix, sys.executable, "-m", "abexp.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ, WANDB_MODE="disabled"), preexec_fn=preexec,
                          timeout=300)


def permission_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    probe = subprocess.run(NO_OVERRIDE + ["true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("root without setpriv: permission bits cannot be made to apply")
    return NO_OVERRIDE


def test_a_results_folder_without_write_permission(tmp_path):
    prefix = permission_prefix()
    write(tmp_path, {"s.yaml": spec_text("s")})
    (tmp_path / "r").mkdir()
    (tmp_path / "r").chmod(0o500)
    before = snapshot(tmp_path)
    try:
        proc = abexp(["run", "s.yaml", "--results", "r", "--no-progress"], tmp_path, prefix)
    finally:
        (tmp_path / "r").chmod(0o700)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--results" in proc.stderr and "permission denied" in proc.stderr
    assert snapshot(tmp_path) == before


def test_an_unreadable_spec(tmp_path):
    prefix = permission_prefix()
    write(tmp_path, {"s.yaml": spec_text("s")})
    (tmp_path / "s.yaml").chmod(0o000)
    before = snapshot(tmp_path) if not prefix else None
    try:
        proc = abexp(["plan", "s.yaml", "--results", "r"], tmp_path, prefix)
    finally:
        (tmp_path / "s.yaml").chmod(0o600)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "s.yaml" in proc.stderr and "cannot read" in proc.stderr
    assert before is None or snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path):
    write(tmp_path, {"c.yaml": TINY.replace("epochs: 1", "epochs: 2")})
    assert abexp(["train", "c.yaml", "--out", "o", "--stop-after", "1"], tmp_path).returncode == 0
    before = snapshot(tmp_path)
    limit = len(before["o/checkpoint.pt"]) // 2  # config and metrics fit; a checkpoint does not

    proc = abexp(["train", "c.yaml", "--out", "o"], tmp_path,
                 preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("abexp:")]
    assert err == [line for line in proc.stderr.splitlines() if line.strip()] and len(err) == 1, proc.stderr
    assert "o/checkpoint.pt" in err[0] and "cannot write" in err[0]
    after = snapshot(tmp_path)
    # events.jsonl is the audit log: it records the attempt; everything else is as it was
    assert {k: v for k, v in after.items() if k != "o/events.jsonl"} == \
        {k: v for k, v in before.items() if k != "o/events.jsonl"}
    # and with room again the run finishes from that checkpoint
    assert abexp(["train", "c.yaml", "--out", "o"], tmp_path).returncode == 0
    cfg = load_config(tmp_path / "c.yaml")
    assert (tmp_path / "o" / "result.json").exists() and run_id(cfg) in (tmp_path / "o" / "result.json").read_text()


def test_a_yaml_boolean_key_in_a_spec_is_one_line(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(spec_text("s") + "on: 3\n")  # YAML 1.1 reads `on` as True
    assert main(["plan", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s.yaml: True: unknown key" in err[0]


@pytest.mark.parametrize("written", ["1e-4", "1E6", "2.5e+3", "1.0e-4", "3e0"])
def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides(tmp_path, written):
    """PyYAML (YAML 1.1) reads `1e-4` as a string, which the strict config would refuse:
    researchers write it that way, so a file, --set and a spec's grid read it as float() does."""
    (tmp_path / "c.yaml").write_text(TINY + f"optim: {{lr: {written}}}\n")
    assert load_config(tmp_path / "c.yaml").optim.lr == float(written)
    assert load_config(None, [f"optim.weight_decay={written}"]).optim.weight_decay == float(written)
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text("s") + f"  optim.lr: [{written}]\n")
    assert {r.config.optim.lr for r in load_spec(spec).expand()} == {float(written)}
