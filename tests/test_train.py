"""Whole runs: output files, resume bit-identity, divergence, BN recalibration."""

import json

import torch

from abexp import io
from abexp.cli import main
from abexp.config import load_config, run_id
from abexp.train.run import RESULT, recalibrated_bn
from abexp.train.start import train_run

REQUIRED_KEYS = ["seed", "model.name", "data.name", "data.subset", "train.epochs", "train.batch_size",
                 "optim.name", "optim.lr", "optim.momentum", "optim.rho", "delay.steps"]


def weights(folder):
    return io.load_torch(folder / "model.pt")


def test_cli_train_writes_config_metrics_and_result(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim: {name: ab, rho: 1.0}\ndelay: {steps: 4}\n")
    args = ["train", str(cfg_file), "--out", str(out), "--device", "cpu"]
    for o in tiny_overrides + ["train.epochs=2"]:
        args += ["--set", o]
    assert main(args) == 0
    result = json.loads((out / RESULT).read_text())
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the summary line
    assert printed == {k: result[k] for k in ("run_id", "status", "test_acc", "best_test_acc",
                                              "epochs_completed", "steps", "wall_s")}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "wall_s"} <= set(r)
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["train_acc"] <= 1
    assert result["status"] == "completed" and result["epochs_completed"] == 2
    assert result["steps"] == 2 * (256 // 32)
    assert result["test_acc"] == rows[-1]["test_acc"]
    assert result["best_test_acc"] == max(r["test_acc"] for r in rows)
    assert result["run_id"] == run_id(load_config(out / "config.yaml"))
    from abexp.config import flatten
    flat = flatten(result["config"])
    for key in REQUIRED_KEYS:
        assert key in flat
    assert flat["optim.name"] == "ab" and flat["delay.steps"] == 4 and flat["data.subset"] == 256


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.epochs=3", "optim.name=ab", "delay.steps=4",
                                              "schedule.name=multistep", "eval.bn=recalibrate"])
    full = tmp_path / "full"
    part = tmp_path / "part"
    train_run(cfg, full, device="cpu", log=lambda s: None)
    assert train_run(cfg, part, device="cpu", stop_after_epochs=1, log=lambda s: None) is None
    assert not (part / RESULT).exists() and (part / "checkpoint.pt").exists()
    # a crash after the metrics line but before the next checkpoint must not duplicate epochs
    with open(part / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "train_loss": 9}\n{"epo')
    train_run(cfg, part, device="cpu", log=lambda s: None)
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [{k: v for k, v in json.loads(l).items() if k not in ("wall_s", "elapsed_s")}
                      for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(full) == rows(part)
    assert not (part / "checkpoint.pt").exists()


def test_finished_run_is_not_run_again(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.epochs=1"])
    first = train_run(cfg, tmp_path, device="cpu", log=lambda s: None)
    mtime = (tmp_path / RESULT).stat().st_mtime_ns
    assert train_run(cfg, tmp_path, device="cpu", log=lambda s: None) == first
    assert (tmp_path / RESULT).stat().st_mtime_ns == mtime


def test_divergence_stops_the_run_with_status_diverged(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["train.epochs=3", "optim.lr=1e6",
                                              "train.divergence_check_every=1"])
    result = train_run(cfg, tmp_path, device="cpu", log=lambda s: None)
    assert result["status"] == "diverged" and result["epochs_completed"] == 1
    assert json.loads((tmp_path / RESULT).read_text())["status"] == "diverged"


def test_bn_recalibration_recomputes_statistics_at_current_weights_and_restores_them():
    from abexp.train.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet8")
    xs = [torch.randn(16, 3, 32, 32) for _ in range(3)]
    bn = model.bn
    bn.running_mean.fill_(5.0)
    captured = []
    with recalibrated_bn(model, iter(xs), "fp32", torch.device("cpu")):
        captured.append(bn.running_mean.clone())
    # naive: the stem BN sees conv(x); its recalibrated mean is the average of the batch means
    with torch.no_grad():
        expect = torch.stack([model.conv(x).mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    assert torch.allclose(captured[0], expect, atol=1e-5)
    assert torch.all(bn.running_mean == 5.0)  # training state untouched


def test_channels_last_views_match_torch_sgd_on_a_channels_last_model(tmp_path, tiny_overrides):
    """channels_last changes the CPU convolution algorithms (~1e-4 relative in gradients), so
    the reference is PyTorch's own channels_last model trained by torch.optim.SGD."""

    import torch.nn.functional as F
    from abexp.train.models import build_model
    from abexp.train.run import Run
    cfg = load_config(None, tiny_overrides + ["optim.name=sgdm", "optim.weight_decay=1e-4",
                                              "train.channels_last=true"])
    run = Run(cfg, tmp_path, "cpu", log=lambda s: None)
    conv = run.model.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert conv.untyped_storage().data_ptr() == run.flat.data.untyped_storage().data_ptr()
    torch.manual_seed(cfg.seed)
    ref = build_model("resnet8").to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for x, y in list(run.batches.epoch(0))[:3]:
        run.train_step(x, y, 0.05)
        opt.zero_grad()
        F.cross_entropy(ref(x.contiguous(memory_format=torch.channels_last)), y).backward()
        opt.step()
    run.use_current_weights()
    for (name, a), b in zip(run.model.named_parameters(), ref.parameters()):
        assert torch.allclose(a.detach(), b.detach(), rtol=1e-5, atol=1e-7), name


def test_compiled_training_matches_eager(tmp_path, tiny_overrides):
    """torch.compile reads the same flat-buffer parameter views (compiling takes ~20 s on CPU)."""
    from abexp.train.run import Run
    runs = [Run(load_config(None, tiny_overrides + ["optim.name=ab", "delay.steps=1", f"train.compile={c}"]),
                tmp_path, "cpu", log=lambda s: None) for c in (False, True)]
    w0 = runs[0].engine.w.clone()
    for x, y in list(runs[0].batches.epoch(0))[:3]:
        for run in runs:
            run.train_step(x, y, 0.05)
    a, b = runs[0].engine.w, runs[1].engine.w
    assert float((a - b).norm() / a.norm()) < 1e-4
    assert float((a - w0).norm() / w0.norm()) > 1e-3  # training moved the weights


def test_epoch_factors_train_as_the_schedule_they_spell(tmp_path, tiny_overrides):
    """Constant lr 0.1 with epoch factors [1, 0.5] is multistep halving at the epoch boundary
    (milestone 0.5 of 2 epochs, gamma 0.5): the same lr every step, so the same weights, bitwise."""
    base = tiny_overrides + ["train.epochs=2", "optim.name=sgdm", "optim.lr=0.1", "delay.steps=2"]
    factors = load_config(None, base + ["schedule.name=constant", "schedule.epoch_factors=[1.0, 0.5]"])
    multistep = load_config(None, base + ["schedule.name=multistep", "schedule.milestones=[0.5]",
                                          "schedule.gamma=0.5"])
    train_run(factors, tmp_path / "f", device="cpu", log=lambda s: None)
    train_run(multistep, tmp_path / "m", device="cpu", log=lambda s: None)
    a, b = weights(tmp_path / "f"), weights(tmp_path / "m")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.1, 0.05]
    assert run_id(factors) != run_id(load_config(None, base + ["schedule.name=constant"]))
