"""Plugins (abexp.registry, abexp.plugins): a researcher's own model, dataset and update rule,
loaded by name, through the whole harness; and every way loading one can go wrong. The plugin
is the example package, examples/breast_cancer, imported from its source folder here
(tests/test_example_plugin.py installs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import abexp
from abexp.config import load_config
from abexp.data.common import DataError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "breast_cancer"
SPEC = EXAMPLE / "experiments" / "breast_cancer_mlp.yaml"
PLUGIN = "abexp_breast_cancer"


def abexp_cli(argv, cwd, env_extra=None, pythonpath=()):
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("ABEXP_PLUGINS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *map(str, pythonpath)])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "abexp.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture
def plugin(monkeypatch):
    """The example plugin loaded into this process (as ``--plugin`` would)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("ABEXP_PLUGINS", PLUGIN)
    from abexp.registry import load_plugins
    assert PLUGIN in load_plugins()
    return PLUGIN


# ---------------------------------------------------------------- loading it, and failing to

def test_a_spec_naming_an_unregistered_model_says_how_to_load_a_plugin(tmp_path):
    proc = abexp_cli(["plan", str(SPEC)], tmp_path)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert str(SPEC) in line and "model.name" in line and "'bc_mlp'" in line
    assert "resnet20" in line and "--plugin MODULE" in line and "ABEXP_PLUGINS" in line


@pytest.mark.parametrize("how", ["flag", "flag_after", "env"])
def test_a_plugin_that_does_not_import_is_one_line_naming_it(tmp_path, how):
    (tmp_path / "broken_plugin.py").write_text("import abexp\nraise RuntimeError('no GPU driver here')\n")
    argv = {"flag": ["--plugin", "broken_plugin", "plan", str(SPEC)],
            "flag_after": ["plan", str(SPEC), "--plugin=broken_plugin"],
            "env": ["plan", str(SPEC)]}[how]
    env = {"ABEXP_PLUGINS": "broken_plugin"} if how == "env" else {}
    proc = abexp_cli(argv, tmp_path, env, pythonpath=[tmp_path])
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "broken_plugin" in line and "no GPU driver here" in line


def test_a_missing_plugin_module_is_exit_2(tmp_path):
    proc = abexp_cli(["--plugin", "no_such_plugin", "stability", "--optim", "sgdm", "--delays", "0"], tmp_path)
    assert proc.returncode == 2 and "no_such_plugin" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_loads_no_plugin(tmp_path):
    """--help and usage errors never import a plugin (they stay fast, and a broken one
    cannot stop them)."""
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('imported')\n")
    proc = abexp_cli(["--help"], tmp_path, {"ABEXP_PLUGINS": "broken_plugin"}, pythonpath=[tmp_path])
    assert proc.returncode == 0 and "--plugin" in proc.stdout and "imported" not in proc.stderr


# ---------------------------------------------------------------- a plugin run, everywhere

def test_a_plugin_grid_plans_runs_exactly_once_and_draws(tmp_path):
    """Plan, a 4-run grid on 2 worker processes (which load the plugin from the environment
    abexp gives them), a second run that trains nothing, collect and figures."""
    res = tmp_path / "res"
    plan = abexp_cli(["--plugin", PLUGIN, "plan", str(SPEC), "--results", str(res)], tmp_path, pythonpath=[EXAMPLE])
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count("pending") == 4
    run = abexp_cli(["run", str(SPEC), "--workers", "2", "--results", str(res), "--no-progress", "--plugin", PLUGIN],
                    tmp_path, pythonpath=[EXAMPLE])  # the workers learn of it from abexp alone
    assert run.returncode == 0, run.stderr[-2000:]
    folders = sorted(p for p in (res / "runs").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(folders) == 4
    for folder in folders:
        assert json.loads((folder / "plugins.json").read_text()) == {PLUGIN: "0.1.0"}
        result = json.loads((folder / "result.json").read_text())
        assert result["status"] == "completed" and result["test_acc"] > 0.8 and result["val_acc"] is not None
    stamps = {f: (f / "result.json").stat().st_mtime_ns for f in folders}
    again = abexp_cli(["run", str(SPEC), "--workers", "2", "--results", str(res), "--no-progress"], tmp_path,
                      {"ABEXP_PLUGINS": PLUGIN}, pythonpath=[EXAMPLE])
    assert again.returncode == 0, again.stderr[-2000:]
    assert {f: (f / "result.json").stat().st_mtime_ns for f in folders} == stamps  # nothing retrained
    figures = abexp_cli(["--plugin", PLUGIN, "figures", "--results", str(res)], tmp_path, pythonpath=[EXAMPLE])
    assert figures.returncode == 0, figures.stderr[-2000:]
    drawn = res / "figures" / "breast_cancer_mlp"
    assert (drawn / "accuracy_vs_delay.png").is_file() and (drawn / "training_curves.png").is_file()
    assert "gap-damped SGDM" in (drawn / "delay_drop.md").read_text()


def test_the_figures_say_what_the_dataset_and_model_are(plugin):
    """2 classes: chance is 1/2, not 1/10; an MLP without BN: no 'BN statistics' wording."""
    import pandas as pd

    from abexp.figures import common
    table = pd.DataFrame({"data.name": ["breast_cancer"], "model.name": ["bc_mlp"], "eval_bn": ["running"]})
    assert common.chance(table) == 0.5
    assert common.bn_note(table) == "" and common.bn_prefix(table) == ""
    resnet = pd.DataFrame({"data.name": ["cifar10"], "model.name": ["resnet20"], "eval_bn": ["running"]})
    assert common.chance(resnet) == 0.1 and "BN" in common.bn_note(resnet)
    unknown = pd.DataFrame({"data.name": ["someone_elses"], "model.name": ["x"]})
    assert common.chance(unknown) is None  # no record: no chance line rather than a wrong one


def test_a_plugin_run_resumes_bitwise(plugin, tmp_path):
    from abexp.train.start import train_run
    cfg = load_config(None, ["model.name=bc_mlp", "data.name=breast_cancer", "optim.name=gap_damped",
                             "delay.steps=3", "train.epochs=3", "train.batch_size=64", "schedule.name=constant",
                             "optim.lr=0.05"])
    straight = train_run(cfg, tmp_path / "a", "cpu", log=lambda m: None)
    assert train_run(cfg, tmp_path / "b", "cpu", stop_after_epochs=1, log=lambda m: None) is None
    resumed = train_run(cfg, tmp_path / "b", "cpu", log=lambda m: None)
    assert resumed["test_acc"] == straight["test_acc"] and resumed["train_loss"] == straight["train_loss"]
    a, b = (torch.load(tmp_path / x / "model.pt", weights_only=True) for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tabular_data_is_not_augmented_and_keeps_its_dtype(plugin):
    from abexp.data.images import Batches
    from abexp.data.load import load_image_data
    cfg = load_config(None, ["model.name=bc_mlp", "data.name=breast_cancer", "data.val_split=0.2"])
    data = load_image_data(cfg, "cpu")
    assert isinstance(data, abexp.TensorData) and data.num_classes == 2 and len(data.val_y) == 91
    batches = Batches(data, 32, augment=True, seed=0)  # data.augment true, but nothing to apply
    assert not batches.augment
    x, y = next(batches.epoch(0))
    index = [torch.nonzero((data.train_x == row).all(1))[0, 0] for row in x]
    assert torch.equal(x, data.train_x[torch.stack(index)]) and x.dtype == torch.float32


def test_token_ids_pass_as_integers_with_their_own_augmentation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (40, 6), generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    flipped = abexp.TensorData(x, y, x[:8], y[:8], num_classes=3, augment=lambda xb, g: xb.flip(1))
    from abexp.data.images import Batches
    batches = Batches(flipped, 10, augment=True, seed=0)
    xb, yb = next(batches.epoch(0))
    assert xb.dtype == torch.int64 and batches.augment
    assert all(any(torch.equal(row.flip(0), r) for r in x) for row in xb)  # each a flipped row
    assert not any(torch.equal(row, r) for row in xb for r in x if not torch.equal(r, r.flip(0)))


@pytest.mark.parametrize("bad,match", [
    (dict(y=torch.zeros(10)), "int64"),
    (dict(y=torch.zeros(9, dtype=torch.int64)), "labels"),
    (dict(y=torch.full((10,), 5, dtype=torch.int64)), "classes"),
])
def test_bad_tensor_data_is_a_data_error_naming_the_dataset(bad, match):
    x, y = torch.zeros(10, 4), bad.get("y")
    with pytest.raises(DataError, match=match) as err:
        abexp.TensorData(x, y, x, y if len(y) == 10 else torch.zeros(10, dtype=torch.int64), num_classes=3).check("mine")
    assert "data.name=mine" in str(err.value)


def test_a_model_whose_batch_norm_contradicts_its_record_is_refused(plugin):
    from abexp.registry import MODELS
    from abexp.train.catalog import build

    @abexp.register_model("bn_mlp_unsaid", inputs=("tabular",))
    def bn_mlp(cfg):
        return nn.Sequential(nn.Linear(30, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    try:
        cfg = load_config(None, ["model.name=bn_mlp_unsaid", "data.name=breast_cancer"])
        with pytest.raises(TypeError, match="batch_norm=False"):
            build(cfg, 2, (30,), 30)
    finally:
        MODELS.remove("bn_mlp_unsaid")


def test_a_config_still_only_names_entries(plugin):
    """A module path where a name belongs is an unknown name, never an import."""
    from abexp.config import ConfigError
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.name=os:system"])
    assert err.value.key == "model.name" and "bc_mlp" in err.value.message
    with pytest.raises(ConfigError) as err:  # an image model on tabular data
        load_config(None, ["model.name=resnet20", "data.name=breast_cancer"])
    assert "tabular" in err.value.message


def test_a_slurm_job_loads_the_plugins_its_submission_loaded(monkeypatch):
    """The job script exports ABEXP_PLUGINS (a requeued job or its resubmission, started
    outside the submitting shell, still loads them); without plugins it is as before."""
    from abexp.lab.slurm import Request, script_text
    monkeypatch.delenv("ABEXP_PLUGINS", raising=False)
    assert "ABEXP_PLUGINS" not in script_text(Request(), ["w"], Path("/f"), "x")
    monkeypatch.setenv("ABEXP_PLUGINS", "abexp_breast_cancer,other_mod")
    assert "export ABEXP_PLUGINS=abexp_breast_cancer,other_mod\n" in script_text(Request(), ["w"], Path("/f"), "x")


def test_collect_lists_a_plugin_run_without_the_plugin(tmp_path):
    """A table needs no plugin: an unfinished run of a plugin's model is a row, not 'damaged'."""
    from abexp.config import dump_yaml
    cfg = load_config(None, ["model.name=bc_mlp", "data.name=breast_cancer", "optim.name=gap_damped"],
                      check_names=False)
    from abexp.config import run_id
    folder = tmp_path / "res" / "runs" / run_id(cfg)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    proc = abexp_cli(["collect", "--results", str(tmp_path / "res"), "-o", str(tmp_path / "t.csv")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "t.csv").read_text()
    assert "bc_mlp" in text and "damaged" not in text


@pytest.mark.parametrize("kind", ["torchrun", "async"])
def test_ranks_and_async_workers_load_the_plugin(tmp_path, kind):
    """abexp train --nproc 2 (two torchrun ranks) and delay.kind async (a server and two
    worker processes) on the plugin's model: each process it starts loads the plugin named on
    the command line. An async run of a model without BN is evaluated at the server with
    eval.bn running (there are no BN statistics to lack)."""
    delay = "{steps: 2}" if kind == "torchrun" else "{kind: async, workers: 2}"
    (tmp_path / "c.yaml").write_text(
        "model: {name: bc_mlp}\ndata: {name: breast_cancer}\ntrain: {epochs: 2, batch_size: 32}\n"
        f"optim: {{name: gap_damped, lr: 0.05}}\nschedule: {{name: constant}}\ndelay: {delay}\n")
    extra = ["--nproc", "2"] if kind == "torchrun" else []
    proc = abexp_cli(["train", "c.yaml", "--device", "cpu", "--out", "run", *extra, "--plugin", PLUGIN], tmp_path,
                     pythonpath=[EXAMPLE])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "completed" and result["processes"] == (2 if kind == "torchrun" else 3)
    assert result["test_acc"] > 0.8
    assert json.loads((tmp_path / "run" / "plugins.json").read_text()) == {PLUGIN: "0.1.0"}


def test_a_plugin_launch_backend_is_found_by_abexp_run(tmp_path):
    """A plugin registers a launch backend with abexp.register_backend; `abexp run --backend
    NAME` loads the plugins, checks and launches through it (nothing of the local backend's)."""
    (tmp_path / "echo_backend.py").write_text(
        "import abexp\n"
        "class Echo:\n"
        "    name = 'echo'\n"
        "    def check(self, launch):\n"
        "        print('checked', len(launch.plan))\n"
        "    def launch(self, launch):\n"
        "        print('launched', sorted(run.run_id for run in launch.plan)[0])\n"
        "        return 0\n"
        "abexp.register_backend('echo', Echo)\n")
    argv = ["--plugin", PLUGIN, "--plugin", "echo_backend", "run", str(SPEC), "--results", "r",
            "--backend", "echo"]
    proc = abexp_cli(argv, tmp_path, pythonpath=[EXAMPLE, tmp_path])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert any(line.startswith("checked ") and int(line.split()[1]) > 0 for line in out)
    assert not (tmp_path / "r").exists()  # the local backend would have made the results folder
    unknown = abexp_cli(["--plugin", PLUGIN, "run", str(SPEC), "--results", "r", "--backend", "nowhere"], tmp_path,
                        pythonpath=[EXAMPLE])
    assert unknown.returncode == 2 and "no such launch backend" in unknown.stderr and "--plugin" in unknown.stderr
