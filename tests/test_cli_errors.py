"""Bad input: exit code 2, one line naming the file and the dotted key, nothing written."""

import subprocess
import sys

import pytest

from abexp.cli import main

CASES = [
    ("unknown key", "optim:\n  lrr: 0.1\n", "optim.lrr"),
    ("unknown section", "optimizer:\n  lr: 0.1\n", "optimizer"),
    ("wrong type", "train:\n  epochs: many\n", "train.epochs"),
    ("wrong type list", "optim:\n  lr: [0.1]\n", "optim.lr"),
    ("lr zero", "optim:\n  lr: 0\n", "optim.lr"),
    ("lr negative", "optim:\n  lr: -0.1\n", "optim.lr"),
    ("momentum one", "optim:\n  momentum: 1.0\n", "optim.momentum"),
    ("momentum negative", "optim:\n  momentum: -0.1\n", "optim.momentum"),
    ("negative delay", "delay:\n  steps: -1\n", "delay.steps"),
    ("negative rho", "optim:\n  rho: -0.5\n", "optim.rho"),
    ("unknown model", "model:\n  name: resnet9\n", "model.name"),
    ("unknown data", "data:\n  name: svhn\n", "data.name"),
    ("unknown optimizer", "optim:\n  name: lamb\n", "optim.name"),
    ("section not a mapping", "optim: 3\n", "optim"),
]


@pytest.mark.parametrize("label,text,key", CASES, ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_file_and_key(tmp_path, capsys, label, text, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(cfg) in err and f": {key}:" in err
    assert not out.exists()


def test_bad_set_override_names_the_key(tmp_path, capsys):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("seed: 1\n")
    assert main(["train", str(cfg), "--set", "delay.stepz=3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "delay.stepz" in err and str(cfg) in err and not (tmp_path / "o").exists()


def test_unreadable_yaml(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("optim: [\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "broken.yaml" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_yaml_never_executes_code(tmp_path, capsys):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("seed: !!python/object/apply:os.system ['touch pwned']\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "pwned").exists()


def test_missing_dataset_names_data_root(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{name: cifar10, root: {tmp_path / 'none'}}}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "cifar-10-batches-py" in err and not (tmp_path / "o").exists()


def test_console_script_exit_code(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim:\n  lr: -1\n")
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "train", str(cfg)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "optim.lr" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "abexp.cli", "train"], capture_output=True, text=True)
    assert proc.returncode == 2


def test_batch_not_divisible_by_processes_is_caught_before_launch(tmp_path, capsys):
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text("train:\n  batch_size: 32\n  micro_batches: 2\n")
    out = tmp_path / "o"
    assert main(["train", str(cfg), "--nproc", "3", "--out", str(out)]) == 2  # 32 % (3 x 2) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cfg) in err and ": train.batch_size:" in err
    assert not out.exists()
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nbase:\n  train: {batch_size: 30}\ngrid:\n  seed: [0, 1]\n")
    assert main(["run", str(spec), "--gpus-per-run", "4", "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(spec) in err and ": train.batch_size:" in err and not (tmp_path / "r").exists()


def test_set_on_a_key_the_grid_varies_is_an_error_not_ignored(tmp_path, capsys):
    spec = "experiments/digits_tiny.yaml"
    results = tmp_path / "results"
    assert main(["run", spec, "--results", str(results), "--set", "delay.steps=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set: delay.steps: is varied by" in err and spec in err
    assert not results.exists()
    assert main(["plan", spec, "--results", str(results), "--set", "optim.lr=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("abexp: error: --set: optim.lr:")  # blamed on the flag, not the spec


def test_help_does_not_import_torch():
    """--help must be instant: argument parsing happens before torch (seconds) is imported."""
    code = ("import sys\nfrom abexp.cli import main\ntry:\n    main(['run', '--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_every_option_of_every_command_has_help_text():
    import argparse

    from abexp.cli import build_parser
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{name} {a.option_strings or a.dest}" for name, sub in commands.choices.items()
            for a in sub._actions if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert bare == []


def test_version_is_the_pyproject_version(capsys):
    import tomllib
    from pathlib import Path

    expected = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"abexp {expected}"
