"""data.val_split: a held-out part of the training set, fixed per study, never trained on,
evaluated like the test set, optimised by sweeps and used to select lrs in tuned_lr."""

import json
import textwrap

import pandas as pd
import pytest
import torch

from abexp.config import ConfigError, load_config, run_id
from abexp.data.common import ImageData, hold_out
from abexp.data.images import Batches
from abexp.data.load import load_image_data
from conftest import runs_table

TINY = ["data.name=digits", "model.name=resnet8", "train.batch_size=32", "data.subset=256",
        "data.test_subset=128", "optim.lr=0.05", "schedule.name=constant"]


def id_images(n: int) -> ImageData:
    """n training images whose label is their index: which examples a batch holds is readable."""
    x = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    return ImageData(x, torch.arange(n), x[:3], torch.arange(3), (0.5,), (0.25,))


def test_the_held_out_examples_are_never_in_a_training_batch():
    data = hold_out(id_images(200), 0.15, split_seed=3)
    held, kept = set(data.val_y.tolist()), set(data.train_y.tolist())
    assert len(held) == 30 and len(kept) == 170  # round(0.15 * 200)
    assert held.isdisjoint(kept) and held | kept == set(range(200))
    batches = Batches(data, batch_size=16, augment=False, seed=0)
    # the steps-per-epoch consequence: floor(kept / batch), not floor(all / batch)
    assert batches.steps_per_epoch == 170 // 16
    for epoch in range(3):
        seen = [int(i) for _, y in batches.epoch(epoch) for i in y]
        assert len(seen) == len(set(seen)) == 10 * 16
        assert set(seen) <= kept
    evaluated = torch.cat([y for _, y in batches.test(7, "val")]).tolist()
    assert sorted(evaluated) == sorted(held)


def test_the_split_is_the_same_for_every_run_seed_and_deterministic():
    sets = [load_image_data(load_config(None, TINY + ["data.val_split=0.25", f"seed={s}"]), "cpu")
            for s in (0, 1, 17)]
    for other in sets[1:]:
        assert torch.equal(other.val_x, sets[0].val_x) and torch.equal(other.val_y, sets[0].val_y)
        assert torch.equal(other.train_x, sets[0].train_x)
    assert len(sets[0].val_y) == 64 and len(sets[0].train_y) == 192
    # the split seed, not the run seed, moves it
    moved = load_image_data(load_config(None, TINY + ["data.val_split=0.25", "data.split_seed=1"]), "cpu")
    assert not torch.equal(moved.val_x, sets[0].val_x)
    # held-out + kept is exactly the training set without a split
    plain = load_image_data(load_config(None, TINY), "cpu")
    assert plain.val_x is None
    both = torch.cat([sets[0].train_x, sets[0].val_x]).flatten(1)
    key = lambda t: sorted(map(bytes, t.flatten(1).numpy()))  # noqa: E731
    assert key(both) == key(plain.train_x)


def test_no_split_keeps_every_stored_run_id():
    a = load_config(None, TINY)
    assert run_id(load_config(None, TINY + ["data.val_split=0"])) == run_id(a)
    assert run_id(load_config(None, TINY + ["data.val_split=0.1"])) != run_id(a)
    with pytest.raises(ConfigError, match="data.val_split"):
        load_config(None, TINY + ["data.val_split=1.0"])
    # a pack evaluates the test set only: runs with a validation set train alone
    from abexp.train.packed import pack_key
    assert pack_key(a) is not None and pack_key(load_config(None, TINY + ["data.val_split=0.1"])) is None


def test_val_metrics_are_logged_and_evaluated_like_the_test_set(tmp_path):
    from abexp.train.models import build_model
    from abexp.train.start import train_run
    cfg = load_config(None, TINY + ["data.val_split=0.25", "train.epochs=2", "eval.bn=running"])
    result = train_run(cfg, tmp_path, device="cpu", log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_loss", "val_acc", "test_loss", "test_acc"} <= set(r) for r in rows)
    assert result["val_acc"] == rows[-1]["val_acc"] and result["val_loss"] == rows[-1]["val_loss"]
    assert result["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert result["steps"] == 2 * (192 // 32)  # the 64 held-out examples are not trained on
    # an independent evaluation of the final weights on the held-out examples
    data = load_image_data(cfg, "cpu")
    model = build_model("resnet8", 10, False, 3)
    model.load_state_dict(torch.load(tmp_path / "model.pt"))
    model.eval()
    with torch.no_grad():
        logits = model(data.normalize(data.val_x))
    assert rows[-1]["val_acc"] == pytest.approx(float((logits.argmax(1) == data.val_y).double().mean()))
    assert rows[-1]["val_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, data.val_y)), rel=1e-5)
    # no split: the rows and the result are as before
    plain = train_run(load_config(None, TINY + ["train.epochs=1"]), tmp_path / "plain", device="cpu",
                      log=lambda s: None)
    assert "val_acc" not in plain
    assert "val_acc" not in json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])


def write_sweep(path, val_split=None, metric=None):
    data = "{name: digits, subset: 128, test_subset: 64" + (f", val_split: {val_split}" if val_split else "") + "}"
    objective = f"objective: {{metric: {metric}}}\n" if metric else ""
    path.write_text(textwrap.dedent(f"""\
        name: {path.stem}
        base:
          model: {{name: resnet8}}
          data: {data}
          train: {{epochs: 1, batch_size: 32}}
          schedule: {{name: constant}}
        fixed: {{optim.name: sgdm}}
        sampler: {{name: random, seed: 0}}
        n_trials: 1
        space:
          optim.lr: {{type: float, low: 0.01, high: 0.1, log: true}}
        """) + objective)
    return path


def test_a_sweep_optimises_the_validation_metric_when_there_is_one(tmp_path, capsys):
    from abexp.lab.sweep import load_sweep, open_study, run_sweep, storage_url
    assert load_sweep(write_sweep(tmp_path / "plain.yaml")).metric == "test_acc"
    assert load_sweep(write_sweep(tmp_path / "own.yaml", 0.25, "test_loss")).metric == "test_loss"
    with pytest.raises(ConfigError, match="objective.metric"):
        load_sweep(write_sweep(tmp_path / "bad.yaml", None, "val_acc"))
    path = write_sweep(tmp_path / "val.yaml", 0.25)
    sweep = load_sweep(path)
    assert sweep.metric == "val_acc"
    assert run_sweep(str(path), str(tmp_path / "results"), progress=False) == 0
    assert "optimising val_acc (best, maximize) on the validation set" in capsys.readouterr().out
    study = open_study(sweep, storage_url(sweep, str(tmp_path / "results"), None))
    assert study.user_attrs["objective"].startswith("val_acc")
    trial = study.best_trial
    rows = [json.loads(line) for line in (tmp_path / "results" / "runs" / trial.user_attrs["run_id"]
                                          / "metrics.jsonl").read_text().splitlines()]
    assert trial.value == pytest.approx(max(r["val_acc"] for r in rows))
    # abexp collect carries the validation metrics
    from abexp.lab.collect import collect
    table = collect(tmp_path / "results").set_index("run_id")
    run = table.loc[trial.user_attrs["run_id"]]
    assert run["val_acc"] == pytest.approx(rows[-1]["val_acc"]) and run["best_val_acc"] == pytest.approx(trial.value)


def test_imagenet_holds_out_training_images_the_same_for_every_seed(tmp_path):
    from test_imagenet_ddp import IMAGENET, write_image_folder

    from abexp.data.imagenet import ImageNetBatches
    root = write_image_folder(tmp_path / "imnet", classes=3, train_per_class=4)
    cfgs = [load_config(None, IMAGENET + [f"data.root={root}", "train.batch_size=4", "data.workers=0",
                                          "data.val_split=0.25", f"seed={s}"]) for s in (0, 3)]
    data = [ImageNetBatches(c, torch.device("cpu")) for c in cfgs]
    assert torch.equal(data[0].held_out, data[1].held_out) and len(data[0].held_out) == 3
    assert set(data[0].held_out.tolist()).isdisjoint(data[0].indices.tolist())
    assert sorted(data[0].held_out.tolist() + data[0].indices.tolist()) == list(range(12))
    assert data[0].steps_per_epoch == 9 // 4
    # the held-out images are what split="val" evaluates: their labels, in order
    labels = torch.cat([y for _, y in data[0].test(2, "val")]).tolist()
    assert labels == [data[0].train.targets[i] for i in data[0].held_out.tolist()]


def test_tuned_lr_selects_on_validation_and_reports_test(tmp_path):
    """A hand-made table where validation and test disagree on the best lr: validation picks."""
    from abexp.figures import tuned_lr
    cells = {  # (optimizer, delay, lr): per seed (val_acc, test_acc)
        ("sgdm", 0, 0.1): [(0.90, 0.95), (0.92, 0.97)],   # test's favourite
        ("sgdm", 0, 0.2): [(0.94, 0.91), (0.96, 0.89)],   # validation's favourite
        ("ab", 0, 0.1): [(0.80, 0.70), (0.80, 0.72)],
        ("ab", 0, 0.2): [(0.70, 0.90), (None, None)],     # diverged seed: 0 for val as for test
    }
    runs_table(cells, tmp_path / "runs.csv")
    tuned_lr.main(["--table", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figs")])
    tuned = pd.read_csv(tmp_path / "figs" / "tuned_lr.csv").set_index(["series", "delay"])
    assert tuned.loc[("SGDM", 0), "lr"] == 0.2 and tuned.loc[("SGDM", 0), "mean"] == pytest.approx(0.90)
    assert tuned.loc[("AB", 0), "lr"] == 0.1 and tuned.loc[("AB", 0), "mean"] == pytest.approx(0.71)
    assert set(tuned["selected_on"]) == {"val_acc"}
    text = (tmp_path / "figs" / "tuned_lr.md").read_text()
    assert "chosen on the mean validation accuracy" in text and "test reported" in text
    assert "| SGDM | 0.900 ± 0.014 @ 0.2↑ |" in text
    # without validation accuracies the same table selects on test, and says so
    pd.read_csv(tmp_path / "runs.csv").drop(columns="val_acc").to_csv(tmp_path / "test_only.csv", index=False)
    tuned_lr.main(["--table", str(tmp_path / "test_only.csv"), "--out", str(tmp_path / "t")])
    tuned = pd.read_csv(tmp_path / "t" / "tuned_lr.csv").set_index(["series", "delay"])
    assert tuned.loc[("SGDM", 0), "lr"] == 0.1 and set(tuned["selected_on"]) == {"test_acc"}
    assert "no validation set" in (tmp_path / "t" / "tuned_lr.md").read_text()
