"""ImageFolder data, torchvision ResNets, and data parallelism (gloo on CPU)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from abexp import io
from abexp.cli import main
from abexp.config import load_config
from abexp.data.common import DataError
from abexp.data.imagenet import ImageNetBatches, check_image_folder
from abexp.train.run import RESULT
from abexp.train.start import train_run

ENV = dict(os.environ, WANDB_MODE="disabled")


def write_image_folder(root: Path, classes=10, train_per_class=8, val_per_class=2, size=40) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), np.uint8) + np.uint8(c * 25)  # class-dependent colour
                noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"img_{i}.JPEG", quality=90)
    return root


IMAGENET = ["data.name=imagenet", "model.name=resnet18", "data.image_size=32", "data.workers=2",
            "train.batch_size=16", "train.epochs=1", "optim.lr=0.05", "schedule.name=constant",
            "eval.batch_size=20"]


def test_tiny_imagefolder_trains_one_epoch_of_resnet18(tmp_path):
    root = write_image_folder(tmp_path / "imnet")
    cfg = load_config(None, IMAGENET + [f"data.root={root}", "train.label_smoothing=0.1",
                                        "model.zero_init_residual=true", "delay.steps=2"])
    result = train_run(cfg, tmp_path / "run", device="cpu", log=lambda s: None)
    assert result["status"] == "completed" and result["steps"] == 80 // 16
    assert 0.0 <= result["test_acc"] <= 1.0


def test_imagefolder_batches_are_seeded_and_shaped(tmp_path):
    root = write_image_folder(tmp_path / "imnet", classes=3, train_per_class=4)
    cfg = load_config(None, IMAGENET + [f"data.root={root}", "train.batch_size=4", "data.workers=0"])
    data = ImageNetBatches(cfg, torch.device("cpu"))
    assert data.num_classes == 3 and data.steps_per_epoch == 3
    a = [y.tolist() for _, y in data.epoch(0)]
    b = [y.tolist() for _, y in data.epoch(0)]
    x, _ = next(iter(data.epoch(1)))
    assert a == b and x.shape == (4, 3, 32, 32)
    halves = [ImageNetBatches(cfg, torch.device("cpu"), rank=r, world=2) for r in (0, 1)]
    shards = [[y.tolist() for _, y in h.epoch(0)] for h in halves]
    assert [s0 + s1 for s0, s1 in zip(*shards)] == a  # ranks split each global batch


def test_imagefolder_workers_persist_and_crops_do_not_depend_on_them(tmp_path):
    """data.workers > 0: one DataLoader with persistent workers serves training, recalibration
    and evaluation (the same worker processes across epochs and passes), and an epoch's crops
    are those of a loader without workers, also for an epoch drawn first by a fresh loader (a
    resume): persistent workers keep their RNG across epochs, the crops must not."""
    import multiprocessing
    root = write_image_folder(tmp_path / "imnet", classes=3, train_per_class=4, val_per_class=2)
    cfg = load_config(None, IMAGENET + [f"data.root={root}", "train.batch_size=4", "data.workers=2"])
    data = ImageNetBatches(cfg, torch.device("cpu"))
    assert data.loader().persistent_workers and data.loader().num_workers == 2
    before = set(multiprocessing.active_children())
    first = [x for x, _ in data.epoch(0)]
    workers = set(multiprocessing.active_children()) - before
    second = [x for x, _ in data.epoch(1)]
    plain, test = list(data.plain(2)), list(data.test(4))
    assert len(workers) == 2 and set(multiprocessing.active_children()) - before == workers  # not re-forked
    none = ImageNetBatches(load_config(None, IMAGENET + [f"data.root={root}", "train.batch_size=4",
                                                         "data.workers=0"]), torch.device("cpu"))
    assert not none.loader().persistent_workers
    assert all(torch.equal(a, b) for a, b in zip(second, [x for x, _ in none.epoch(1)]))  # epoch 1 first
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in none.epoch(0)]))
    assert len(first) == len(second) == 3 and not torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(plain, none.plain(2)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(test, none.test(4)))
    assert len(test) == 2  # 6 validation images in batches of 4
    # a resume mid-epoch loads only the rest of it: the same batches as the whole epoch's tail
    rest = list(data.epoch_from(1, 1))
    assert len(rest) == 2 and all(torch.equal(a, b[0]) for a, b in zip(second[1:], rest))


def test_an_imagenet_run_stopped_mid_epoch_resumes_bitwise_loading_only_the_rest(tmp_path, monkeypatch):
    """A stop after step 2 of epoch 2: the resume loads only that epoch's last 3 batches' images
    (the first 2 are skipped, not decoded) and ends equal to an uninterrupted run."""
    import signal
    from abexp.data import imagenet
    from abexp.train import preempt
    from abexp.train.run import Run
    root = write_image_folder(tmp_path / "imnet")
    cfg = load_config(None, IMAGENET + [f"data.root={root}", "data.workers=0", "train.epochs=2", "delay.steps=1"])
    train_run(cfg, tmp_path / "full", device="cpu", log=lambda s: None)
    steps = {"n": 0}
    plain_step = Run.train_step

    def counted(self, x, y, lr):
        plain_step(self, x, y, lr)
        steps["n"] += 1

    monkeypatch.setattr(Run, "train_step", counted)
    monkeypatch.setattr(preempt, "requested", lambda: signal.SIGUSR1 if steps["n"] == 7 else None)
    with pytest.raises(preempt.Preempted):  # 5 steps an epoch: epoch 2, step 2
        train_run(cfg, tmp_path / "part", device="cpu", log=lambda s: None)
    assert io.load_torch(tmp_path / "part" / "checkpoint.pt")["step_in_epoch"] == 2
    monkeypatch.setattr(preempt, "requested", lambda: None)
    loaded = []
    plain_get = imagenet._Images.__getitem__
    monkeypatch.setattr(imagenet._Images, "__getitem__", lambda self, key: loaded.append(key[0]) or plain_get(self, key))
    train_run(cfg, tmp_path / "part", device="cpu", log=lambda s: None)
    assert loaded.count(imagenet.TRAIN) == 3 * 16
    a, b = io.load_torch(tmp_path / "full" / "model.pt"), io.load_torch(tmp_path / "part" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("breakage,needle", [
    ("no_val", "val"), ("empty_class", "holds no images"), ("class_mismatch", "classes differ"),
    ("missing_root", "train")])
def test_malformed_folder_is_a_clear_error(tmp_path, breakage, needle, capsys):
    root = write_image_folder(tmp_path / "imnet", classes=2, train_per_class=1, val_per_class=1)
    import shutil
    if breakage == "no_val":
        shutil.rmtree(root / "val")
    elif breakage == "empty_class":
        for f in (root / "train" / "n00000001").iterdir():
            f.unlink()
    elif breakage == "class_mismatch":
        (root / "val" / "n00000001").rename(root / "val" / "n00000009")
    else:
        root = tmp_path / "nothing"
    with pytest.raises(DataError, match=needle):
        check_image_folder(root)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"data: {{name: imagenet, root: {root}}}\nmodel: {{name: resnet18}}\n")
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and not (tmp_path / "o").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, overrides, out, dump):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), WANDB_MODE="disabled")
    torch.set_num_threads(1)
    from abexp.train.distributed import shutdown
    from abexp.train.run import Run
    run = Run(load_config(None, overrides), out, "cpu", log=lambda s: None)
    run.fit()
    torch.save({"w": run.engine.w, "v": run.engine.optimizer.v, "hist": run.engine.history.buffer,
                "buffers": {k: v.clone() for k, v in run.model.named_buffers()}}, f"{dump}/rank{rank}.pt")
    shutdown()


DIGITS = ["data.name=digits", "model.name=resnet8", "data.subset=128", "data.test_subset=64",
          "train.batch_size=32", "train.epochs=2", "optim.name=ab", "delay.steps=3",
          "schedule.name=constant", "optim.lr=0.05"]


def test_two_process_ddp_ranks_agree_and_match_one_process_micro_batches(tmp_path):
    import torch.multiprocessing as mp
    (tmp_path / "o").mkdir()
    mp.start_processes(_ddp_worker, args=(2, free_port(), DIGITS, str(tmp_path / "o"), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("w", "v", "hist"):
        assert torch.equal(r0[key], r1[key]), key  # identical weights, optimizer state, ring buffer
    assert all(torch.equal(r0["buffers"][k], r1["buffers"][k]) for k in r0["buffers"])
    # one process, same global batch, two micro-batches = the two ranks' halves
    single = load_config(None, DIGITS + ["train.micro_batches=2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same reduction order in the convolutions
    try:
        train_run(single, tmp_path / "single", device="cpu", log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    w_single = io.load_torch(tmp_path / "single" / "model.pt")
    from abexp.train.models import build_model
    model = build_model("resnet8")
    model.load_state_dict(w_single)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(flat, r0["w"])  # bitwise: all-reduced mean == micro-batch mean
    assert not torch.allclose(flat, torch.cat([p.detach().reshape(-1) for p in build_model("resnet8").parameters()]))


def test_cli_nproc_2_resumes_under_ddp(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 0\n")
    base = [sys.executable, "-m", "abexp.cli", "train", str(cfg), "--device", "cpu", "--nproc", "2"]
    for item in DIGITS + ["train.epochs=3"]:
        base += ["--set", item]
    env = dict(ENV, OMP_NUM_THREADS="1")
    part, full = tmp_path / "part", tmp_path / "full"
    assert subprocess.run(base + ["--out", str(part), "--stop-after", "1"], env=env,
                          capture_output=True).returncode == 0
    assert (part / "checkpoint.pt").exists() and not (part / RESULT).exists()
    assert subprocess.run(base + ["--out", str(part)], env=env, capture_output=True).returncode == 0
    assert subprocess.run(base + ["--out", str(full)], env=env, capture_output=True).returncode == 0
    a, b = io.load_torch(part / "model.pt"), io.load_torch(full / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json
    result = json.loads((part / RESULT).read_text())
    assert result["processes"] == 2 and result["epochs_completed"] == 3


def test_runner_gives_a_run_two_processes(tmp_path, monkeypatch):
    """A worker with ABEXP_NPROC=2 (what --gpus-per-run 2 sets) trains its run under torchrun."""
    import json
    from abexp.lab.runner import runs_dir, worker_loop
    from abexp.lab.spec import load_spec
    spec = tmp_path / "s.yaml"
    spec.write_text("name: nproc\nbase:\n  model: {name: resnet8}\n"
                    "  data: {name: digits, subset: 64, test_subset: 32}\n"
                    "  train: {epochs: 1, batch_size: 32}\n")
    monkeypatch.setenv("ABEXP_NPROC", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    counts = worker_loop(str(spec), str(tmp_path / "r"), "session")
    (run,) = load_spec(spec).expand()
    result = json.loads((runs_dir(tmp_path / "r") / run.run_id / "result.json").read_text())
    assert counts == {"completed": 1} and result["processes"] == 2
