"""What a first GPU user would hit, checked where a CPU can reach it: which GPUs each worker
gets, the SLURM script's process count, RNG state and weights whatever device they were
mapped to, a device change on resume, the deterministic option and gpu-check itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abexp.config import ConfigError, load_config, run_id
from abexp.lab.local import gpu_slots, visible_gpus
from abexp.train.lifecycle import read_checkpoint
from abexp.train.run import CHECKPOINT, Run, RunDirError
from abexp.train.start import train_run

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.name=resnet8", "data.name=digits", "data.subset=64", "data.test_subset=32", "train.epochs=2",
        "train.batch_size=32", "optim.name=ab", "delay.steps=2", "schedule.name=constant"]


def fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_workers_get_the_gpus_the_parent_was_given(monkeypatch):
    fake_cuda(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # a node restricted to GPUs 2 and 3
    assert visible_gpus() == ["2", "3"]
    assert gpu_slots(None, None, 1) == ["2", "3"]
    assert gpu_slots(None, None, 2) == ["2", "2", "3", "3"]
    assert gpu_slots(None, ["1"], 1) == ["3"]  # --gpus counts as torch does: the second visible one
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8c1e,MIG-4f2a/1/0")  # UUID and MIG names
    assert gpu_slots(None, None, 1) == ["GPU-8c1e", "MIG-4f2a/1/0"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_slots(None, None, 1, gpus_per_run=2) == ["0,1"]


def test_more_gpus_per_run_than_present_is_one_clear_error(monkeypatch):
    fake_cuda(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError, match="--gpus-per-run"):
        gpu_slots(None, None, 1, gpus_per_run=4)
    with pytest.raises(ConfigError, match="--gpus"):
        gpu_slots(None, ["5"], 1)


def test_no_gpu_means_cpu_workers(monkeypatch):
    fake_cuda(monkeypatch, 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # set, but this torch sees no GPU
    assert gpu_slots(2, None, 1) == [None, None]


def test_sweep_workers_are_spread_over_the_gpus(monkeypatch):
    from abexp.lab.sweep import worker_envs

    fake_cuda(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    envs = worker_envs(4)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4", "5", "4", "5"]
    assert all(e["ABEXP_NPROC"] == "1" for e in envs)
    fake_cuda(monkeypatch, 0)  # no GPU: CPU workers, the parent's variable untouched, no process count
    cpu = worker_envs(2)
    assert all(e["CUDA_VISIBLE_DEVICES"] == "4,5" and "ABEXP_NPROC" not in e for e in cpu)


def test_slurm_script_starts_one_process_per_gpu_of_a_run():
    from abexp.lab.slurm import Node, Request, check_request, script_text

    nodes = [Node("gpu", True, 16, 64000, 8, float("inf"))]
    req = check_request(Request(array=2, cpus_per_task=4, partition="gpu"), nodes, gpus_per_run=4)
    text = script_text(req, ["python", "-m", "abexp.lab.runner"], Path("/tmp/s"), "x")
    assert "#SBATCH --gres=gpu:4" in text and "export ABEXP_NPROC=4" in text
    one = check_request(Request(array=2, cpus_per_task=4, partition="gpu"), nodes, gpus_per_run=1)
    assert "ABEXP_NPROC" not in script_text(one, ["python"], Path("/tmp/s"), "x")


def test_a_checkpoint_is_read_onto_the_cpu_whatever_the_run_device(tmp_path):
    """The saved RNG state must reach torch.set_rng_state as a CPU ByteTensor: mapping the
    checkpoint to the run's device (a GPU) made every resume raise (the same TypeError as
    setting a meta-device state on the CPU). The checkpoint is now read onto the CPU, whatever
    the run's device, and each consumer copies what it needs onto its own."""
    cfg = load_config(None, TINY)
    assert train_run(cfg, tmp_path, device="cpu", stop_after_epochs=1, log=lambda m: None) is None
    with pytest.raises(TypeError, match="ByteTensor"):
        torch.set_rng_state(torch.get_rng_state().to("meta"))
    run = Run(cfg, tmp_path, "cpu", log=lambda m: None)
    state = read_checkpoint(tmp_path, run.run_id, True, print)
    tensors = [state["rng"]["torch"], *state["buffers"].values(), state["engine"]["w"]]
    assert all(t.device.type == "cpu" for t in tensors)
    run.load_state_dict(state)  # raised TypeError: RNG state must be a torch.ByteTensor
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])


def test_a_saved_cuda_rng_list_longer_than_the_visible_gpus_is_restored(tmp_path, monkeypatch):
    from abexp.train.run import restore_rng

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=None: seen.update(state=s, device=device))
    states = [torch.zeros(16, dtype=torch.uint8) + i for i in range(4)]  # saved on a 4-GPU node
    restore_rng({"torch": torch.get_rng_state(), "cuda": states}, torch.device("cuda", 0))
    assert torch.equal(seen["state"], states[0])


def test_resume_on_another_device_kind_is_refused_in_one_line(tmp_path):
    cfg = load_config(None, TINY)
    train_run(cfg, tmp_path, device="cpu", stop_after_epochs=1, log=lambda m: None)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["device"] == "cpu"
    state["device"] = "cuda"  # as if the first epoch had run on a GPU
    torch.save(state, tmp_path / CHECKPOINT)
    with pytest.raises(RunDirError, match="cuda") as err:
        train_run(cfg, tmp_path, device="cpu", log=lambda m: None)
    assert "\n" not in str(err.value) and str(tmp_path / CHECKPOINT) in str(err.value)


def test_model_weights_are_saved_as_cpu_tensors(tmp_path):
    train_run(load_config(None, TINY), tmp_path, device="cpu", log=lambda m: None)
    weights = torch.load(tmp_path / "model.pt", weights_only=True)  # no map_location needed
    assert weights and all(v.device.type == "cpu" for v in weights.values())


def test_deterministic_is_on_by_default_and_keeps_stored_run_ids():
    cfg = load_config(None, TINY)
    assert cfg.train.deterministic is True
    stored = cfg.model_dump()
    del stored["train"]["deterministic"]  # a run stored before the key existed
    assert run_id(stored) == run_id(cfg)
    assert run_id(load_config(None, TINY + ["train.deterministic=false"])) != run_id(cfg)


def test_the_global_pool_keeps_the_cpu_numerics():
    """On CUDA the pool is a mean (its backward is deterministic; adaptive_avg_pool2d's is
    not); on the CPU it stays adaptive_avg_pool2d, bit for bit, so stored results hold."""
    from abexp.train.models import global_avg_pool

    x = torch.randn(3, 8, 5, 5)
    assert torch.equal(global_avg_pool(x), torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))
    assert torch.allclose(global_avg_pool(x), x.mean((2, 3)))


def collected_gpu_tests() -> list[str]:
    """tests/test_gpu.py's test ids as pytest itself collects them (the reference count)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return [line for line in proc.stdout.splitlines() if line.startswith("tests/test_gpu.py::")]


def test_gpu_check_runs_end_to_end_on_the_cpu_and_writes_few_files(tmp_path):
    """The real test step too (no --skip-tests), started from another folder as `make gpu-check`
    may be, with a relative --out: the XML must land there and hold test_gpu.py's tests."""
    import os
    import xml.etree.ElementTree as ET

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("ABEXP_REQUIRE_GPU", None)
    proc = subprocess.run([sys.executable, "-m", "abexp.tools.gpu_check", "--device", "cpu", "--quick",
                           "--out", "gpu-check"], cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    out = tmp_path / "gpu-check"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"env.json", "probe.json", "summary.md", "log.txt", "test_gpu.xml"} <= set(files), files
    assert not (ROOT / "abexp" / "gpu-check").exists() and not (ROOT / "gpu-check" / "test_gpu.xml").exists()
    suite = ET.parse(out / "test_gpu.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    want = collected_gpu_tests()
    assert len(want) > 20 and int(suite.get("tests")) == len(cases) == len(want)
    assert {c.get("classname") for c in cases} == {"tests.test_gpu"}
    if not torch.cuda.is_available():  # without CUDA every one of them is skipped, none fails
        assert int(suite.get("skipped")) == len(want) and int(suite.get("failures")) == 0
    summary = (out / "summary.md").read_text()
    assert f"tests/test_gpu.py: {len(want)} tests, 0 failed, 0 errors" in summary and "-> PASS" in summary
    probe = json.loads((out / "probe.json").read_text())
    assert probe["failed"] == {} and not probe["bench"]["failed"]
    assert probe["determinism"]["resume_equal_deterministic_True"] is True  # bitwise on the CPU
    assert probe["cpu_vs_gpu"]["relative_l2"] == 0.0  # CPU against itself: the probe compares like with like
    assert {r["precision"] for r in probe["step_times"]} == {"fp32", "tf32", "bf16", "bf16+channels_last"}


def test_gpu_check_reports_a_pytest_that_could_not_run_in_its_own_words(tmp_path, monkeypatch):
    from abexp.tools import gpu_check

    monkeypatch.setattr(gpu_check, "GPU_TESTS", tmp_path / "missing" / "test_gpu.py")
    tests = gpu_check.run_gpu_tests(tmp_path / "out", lambda m: None, require_gpu=False)
    assert tests["passed"] is False and tests["exit_code"] == 4
    line = gpu_check.tests_line(tests)
    assert "FAIL" in line and f"file or directory not found: {tmp_path / 'missing' / 'test_gpu.py'}" in line


# Put on PYTHONPATH as sitecustomize: records CUBLAS_WORKSPACE_CONFIG when the process first
# calls conv2d or linear (on a GPU, its first cuBLAS/cuDNN matrix product, when cuBLAS reads the
# variable) and at exit, one JSON file per process.
SPY = '''
import atexit, json, os, sys
import torch.nn.functional as F
_seen = {}
def _wrap(name):
    inner = getattr(F, name)
    def spy(*args, **kwargs):
        _seen.setdefault("first_matmul", os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return inner(*args, **kwargs)
    setattr(F, name, spy)
for _name in ("conv2d", "linear"):
    _wrap(_name)
@atexit.register
def _write():
    _seen["exit"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    with open(os.path.join(os.environ["ABEXP_SPY_DIR"], f"{os.getpid()}.json"), "w") as fh:
        json.dump({"argv": sys.argv, **_seen}, fh)
'''


def spied(tmp_path, name: str, cmd: list[str]) -> list[dict]:
    """Run ``cmd`` with no CUBLAS_WORKSPACE_CONFIG in its environment; each process's record."""
    import os

    spy, records = tmp_path / "spy", tmp_path / f"records_{name}"
    spy.mkdir(exist_ok=True)
    records.mkdir()
    (spy / "sitecustomize.py").write_text(SPY)
    env = {**os.environ, "PYTHONPATH": f"{spy}{os.pathsep}{ROOT}", "ABEXP_SPY_DIR": str(records),
           "WANDB_MODE": "disabled", "ABEXP_THREADS": "1"}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [json.loads(p.read_text()) for p in records.iterdir()]


def test_every_entry_point_sets_the_cublas_workspace_before_its_first_matrix_product(tmp_path):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, at the process's first matrix product; a run
    that set it when it wanted determinism came too late in a worker whose earlier run did not.
    Each entry point sets it first, seen from inside each process (its workers included)."""
    from abexp.process_env import CUBLAS_DETERMINISTIC
    from abexp.lab.sweep import load_sweep, open_study, storage_url

    py = sys.executable
    control = spied(tmp_path, "control", [py, "-c", "import torch; torch.nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2))"])
    assert control[0]["first_matmul"] is None  # the spy sees a process that does not set it

    base = ("{model: {name: resnet8}, data: {name: digits, subset: 64, test_subset: 32}, "
            "train: {epochs: 1, batch_size: 32, deterministic: false}}")
    config = tmp_path / "run.yaml"
    config.write_text(base + "\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: spied\nbase: {base}\ngrid: {{train.deterministic: [false, true]}}\n")
    sweep = tmp_path / "spied_sweep.yaml"
    sweep.write_text("name: spied_sweep\nbase: run.yaml\nn_trials: 1\nsampler: {name: random, seed: 0}\n"
                     "space:\n  optim.lr: {type: float, low: 0.01, high: 0.1}\n")
    loaded = load_sweep(sweep)
    url = storage_url(loaded, tmp_path / "sweep_results")
    open_study(loaded, url, create=True)
    entries = {
        "cli": [py, "-m", "abexp.cli", "train", str(config), "--out", str(tmp_path / "one")],
        "cli_run": [py, "-m", "abexp.cli", "run", str(spec), "--results", str(tmp_path / "r1"), "--no-progress"],
        "runner_worker": [py, "-m", "abexp.lab.runner", str(spec), str(tmp_path / "r2"), "session0"],
        "sweep_worker": [py, "-m", "abexp.lab.sweep", str(sweep), str(tmp_path / "sweep_results"), url, "1", "0"],
        "gpu_check": [py, "-m", "abexp.tools.gpu_check", "--help"],
        "bench": [py, "-m", "abexp.tools.bench", "--help"],
    }
    for name, cmd in entries.items():
        records = spied(tmp_path, name, cmd)
        trained = [r for r in records if "first_matmul" in r]
        if name in ("gpu_check", "bench"):  # set before its arguments are even parsed
            assert [r["exit"] for r in records] == [CUBLAS_DETERMINISTIC], name
            continue
        assert trained, (name, records)
        if name == "cli_run":  # the runner's worker process trained, not the CLI's
            assert any("abexp.lab.runner" in " ".join(r["argv"]) or r["argv"][0].endswith("runner.py")
                       for r in trained), records
        assert all(r["first_matmul"] == CUBLAS_DETERMINISTIC for r in trained), (name, records)


def test_cudnn_benchmarks_only_when_determinism_is_off():
    """The flags set_determinism gives a CUDA run (they are plain process flags: settable here)."""
    from abexp.train.run import set_determinism

    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    try:
        for on in (False, True):
            set_determinism(on, torch.device("cuda"))
            assert torch.backends.cudnn.benchmark is (not on)
            assert torch.backends.cudnn.deterministic is on and torch.are_deterministic_algorithms_enabled() is on
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2])


def test_gpu_check_names_what_the_node_lacks_in_one_line_before_importing_it(tmp_path):
    """A GPU image without pydantic (and pytest): one line naming both, exit 2, no traceback."""
    import os

    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\nclass _Gone:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pydantic', 'pytest'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Gone())\n")
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{ROOT}"}
    assert subprocess.run([sys.executable, "-c", "import pydantic"], env=env, capture_output=True).returncode != 0
    proc = subprocess.run([sys.executable, "-m", "abexp.tools.gpu_check", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "lacks pydantic, pytest:" in proc.stderr and "make gpu-wheels" in proc.stderr
    assert not (tmp_path / "out").exists()
    listed = subprocess.run([sys.executable, "-m", "abexp.tools.gpu_deps", "--missing"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.stdout.split() == ["pydantic", "pytest"]  # what make gpu-check installs from wheels/


def test_gpu_check_keeps_every_other_section_when_one_fails(tmp_path, monkeypatch):
    """The CPU-vs-GPU section forced to fail: the others' figures are in probe.json and the
    summary, the failure is one line there, and gpu-check exits 1."""
    from abexp.tools import gpu_check

    def broken(device, quick):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "resume_and_determinism", lambda d, q, w: {"resume_equal_deterministic_True": True})
    monkeypatch.setattr(gpu_check, "cpu_vs_gpu", broken)
    monkeypatch.setattr(gpu_check, "step_times", lambda d, q: [])
    monkeypatch.setattr(gpu_check, "packed", lambda d, q: [{"k": 1, "step_ms": 1.0, "ms_per_run_step": 1.0,
                                                            "peak_memory_gib": None}])
    monkeypatch.setattr(gpu_check, "resnet50_step", lambda d, q: {"batch": 4, "image": 112, "precision": "bf16",
                                                                  "step_ms": 9.0, "images_per_s": 1.0, "peak_memory_gib": None})
    monkeypatch.setattr(gpu_check, "trimmed_bench", lambda d, q, o, lim, log: {"failed": {}})
    out = tmp_path / "out"
    assert gpu_check.main(["--device", "cpu", "--quick", "--skip-tests", "--out", str(out)]) == 1
    probe = json.loads((out / "probe.json").read_text())
    assert probe["failed"] == {"cpu_vs_gpu": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert {"determinism", "step_times", "packed", "resnet50", "bench"} <= set(probe) and "cpu_vs_gpu" not in probe
    summary = (out / "summary.md").read_text()
    assert "- cpu_vs_gpu FAILED: RuntimeError: CUDA error" in summary and "| 1 | 1.0 | 1.0 | None |" in summary
    assert "9.0 ms/step" in summary
