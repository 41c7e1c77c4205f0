"""The example plugin package, installed as a user would install it (its own pyproject.toml,
the ``abexp.plugins`` entry point), found by abexp with no --plugin and no ABEXP_PLUGINS:
plan, a 4-run grid on 2 workers, a 3-trial sweep and the figures. It is installed into a
temporary folder on PYTHONPATH, never into the shared environment."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "breast_cancer"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(environment, copy of the example folder): the package pip-installed into a temporary
    target from a copy (the build writes build/ and *.egg-info beside the sources)."""
    base = tmp_path_factory.mktemp("example")
    source, target = base / "breast_cancer", base / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(source)], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0 and "setuptools" in proc.stderr:
        pytest.skip(f"no setuptools to build the example: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([str(ROOT), str(target)]))
    env.pop("ABEXP_PLUGINS", None)
    return env, source


def cli(argv, env, cwd):
    return subprocess.run([sys.executable, "-m", "abexp.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_installed_example_runs_plan_grid_sweep_and_figures(installed, tmp_path):
    env, source = installed
    spec, sweep = source / "experiments" / "breast_cancer_mlp.yaml", source / "sweeps" / "breast_cancer_lr.yaml"
    res = tmp_path / "results"
    plan = cli(["plan", str(spec), "--results", str(res)], env, tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("pending") == 4
    grid = cli(["run", str(spec), "--workers", "2", "--results", str(res), "--no-progress"], env, tmp_path)
    assert grid.returncode == 0, grid.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (res / "runs").glob("*/result.json")]
    assert len(results) == 4 and all(r["status"] == "completed" for r in results)
    assert {r["config"]["optim"]["name"] for r in results} == {"sgdm", "gap_damped"}
    assert all(json.loads(p.read_text()) == {"abexp_breast_cancer": "0.1.0"}  # the installed version
               for p in (res / "runs").glob("*/plugins.json"))
    trials = cli(["sweep", str(sweep), "--workers", "1", "--results", str(res), "--no-progress"], env, tmp_path)
    assert trials.returncode == 0, trials.stderr[-3000:]
    listed = cli(["sweep", str(sweep), "--trials", "--results", str(res)], env, tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "3 trials (3 COMPLETE)" in listed.stdout, listed.stdout
    figures = cli(["figures", "--results", str(res)], env, tmp_path)
    assert figures.returncode == 0, figures.stderr[-3000:]
    assert (res / "figures" / "breast_cancer_mlp" / "accuracy_vs_delay.png").is_file()
    assert any((res / "figures").rglob("sweep_*.png"))


def test_help_does_not_import_the_installed_plugin(installed, tmp_path):
    env, _ = installed
    probe = ("import sys, abexp.cli\n"
             "try:\n    abexp.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('abexp_breast_cancer' in sys.modules, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stdout + proc.stderr
