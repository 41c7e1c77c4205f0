"""``make gpu-check``: what a first GPU session must learn, in a few minutes, in one folder.

    python -m abexp.tools.gpu_check --out gpu-check [--device cuda] [--quick]

Runs with the python it is started by (a cluster node's own CUDA torch; no venv, no network)
and writes at most seven files to ``--out``:

- ``env.json``: GPU, driver, CUDA, cuDNN, torch, torchvision, Python, abexp commit;
- ``test_gpu.xml``: tests/test_gpu.py as JUnit XML (a skipped test counts as failed here);
- ``probe.json``: resume after a stop vs an uninterrupted run; two identical runs with and
  without ``train.deterministic``; CPU vs GPU after 20 identical steps; ResNet-20 batch 128
  step time for fp32 / tf32 / bf16 / bf16 + channels_last, SGDM and AB, with the share of wall
  time the GPU is busy; packed K = 1 / 8 / 32 step time and peak memory; a ResNet-50 224x224
  bf16 step at D = 32;
- ``bench.json`` / ``bench.md``: a trimmed ``abexp.tools.bench`` (figures a-d);
- ``summary.md``: the table the README shows; ``log.txt``: everything printed.

Each section runs on its own (``abexp.tools.sections``): a failure is its one error line, the
files are rewritten after every section, and on a GPU each section has a time limit so that the
whole check stays within 7 minutes. What the python lacks is named in one line first (exit 2).

``--device cpu --quick`` runs the same code at toy sizes (the test suite does, so the script
cannot rot between GPU sessions); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from abexp.tools import gpu_deps  # the standard library only

if __name__ == "__main__" and gpu_deps.missing():  # one line, before torch or pydantic is imported
    print(gpu_deps.missing_line(gpu_deps.missing()), file=sys.stderr)
    raise SystemExit(2)

import torch  # noqa: E402

from abexp import io  # noqa: E402
from abexp.process_env import init_process_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]  # the repository: abexp/tools/gpu_check.py -> .
GPU_TESTS = ROOT / "tests" / "test_gpu.py"


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        from abexp.tv_compat import import_torchvision
        env["torchvision"] = import_torchvision().__version__
    except Exception as err:  # noqa: BLE001 - recorded, not fatal
        env["torchvision"] = f"unavailable: {err}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", gpus_visible=torch.cuda.device_count())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
    else:
        from abexp.tools.bench import machine_name
        env["cpu"] = machine_name(device)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        env["abexp_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    return env


def run_gpu_tests(out: Path, log, require_gpu: bool = True, limit_s: float | None = None) -> dict:
    """tests/test_gpu.py under pytest, as JUnit XML in ``out``. With ``require_gpu`` (a GPU
    node) a skipped test is a failure; without (``--device cpu``) the tests skip, and only
    their collection is checked. No XML (pytest could not start): pytest's own last line."""
    xml = out.resolve() / "test_gpu.xml"  # absolute: pytest runs in the repository, not in our cwd
    xml.unlink(missing_ok=True)  # never report a previous session's file
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("ABEXP_REQUIRE_GPU", None)
    if require_gpu:
        env["ABEXP_REQUIRE_GPU"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(GPU_TESTS),
                               f"--junitxml={xml}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired as late:
        said = (late.stdout or b"").decode(errors="replace") if isinstance(late.stdout, bytes) else (late.stdout or "")
        log(said[-4000:])
        return {"exit_code": None, "require_gpu": require_gpu, "passed": False,
                "error": f"pytest stopped after its limit of {limit_s:g} s (the log has how far it got)"}
    log(proc.stdout[-4000:] + proc.stderr[-2000:])
    counts: dict = {"exit_code": proc.returncode, "require_gpu": require_gpu}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] = int(suite.get(key, 0))
    if not counts.get("tests"):  # pytest did not start, or collected nothing: say why in its words
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        what = "no JUnit XML" if not xml.exists() else "no test collected"
        counts.update(passed=False, error=f"{what} (pytest exit {proc.returncode}): {lines[-1] if lines else 'no output'}")
        return counts
    counts["passed"] = proc.returncode == 0 and (counts["skipped"] == 0 or not require_gpu)
    return counts


def tests_line(tests: dict) -> str:
    """The summary's line on tests/test_gpu.py."""
    if tests.get("skipped_by_flag"):
        return "tests/test_gpu.py: not run (--skip-tests)"
    if "error" in tests:
        return f"tests/test_gpu.py: FAIL, {tests['error']}"
    note = "" if tests.get("require_gpu", True) else " (no GPU: skips expected)"
    return (f"tests/test_gpu.py: {tests['tests']} tests, {tests['failures']} failed, {tests['errors']} errors, "
            f"{tests['skipped']} skipped{note} -> {'PASS' if tests['passed'] else 'FAIL'}")


# ---------------------------------------------------------------- probe

def tiny_run_config(device: torch.device, quick: bool, *extra: str) -> list[str]:
    size = 256 if quick else 2048
    return ["model.name=resnet8" if quick else "model.name=resnet20", "data.name=synthetic",
            f"data.synthetic_size={size}", "train.batch_size=32" if quick else "train.batch_size=128",
            "train.epochs=2", "optim.name=ab", "optim.lr=0.05", "delay.steps=4", "schedule.name=constant",
            "tracking.wandb.mode=disabled", *extra]


def train_to_end(overrides: list[str], out: Path, device: torch.device, stop_after: int | None = None):
    from abexp.config import load_config
    from abexp.train.start import train_run

    return train_run(load_config(None, overrides), out, device=device.type, stop_after_epochs=stop_after,
                     log=lambda m: None)


def weights(out: Path) -> dict[str, torch.Tensor]:
    from abexp.train.folder import RunFolder

    return io.load_torch(RunFolder(out).weights, map_location="cpu")


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def resume_and_determinism(device: torch.device, quick: bool, work: Path) -> dict:
    """Resume after a stop vs uninterrupted, and two identical runs, deterministic or not."""
    report = {}
    for det in (True, False):
        cfg = tiny_run_config(device, quick, f"train.deterministic={str(det).lower()}")
        a, b, c = (work / f"det{det}_{name}" for name in ("a", "b", "stopped"))
        ra, rb = train_to_end(cfg, a, device), train_to_end(cfg, b, device)
        report[f"identical_runs_equal_deterministic_{det}"] = max_abs_diff(weights(a), weights(b)) == 0.0
        report[f"identical_runs_max_abs_diff_deterministic_{det}"] = max_abs_diff(weights(a), weights(b))
        report[f"identical_runs_test_acc_deterministic_{det}"] = [ra["test_acc"], rb["test_acc"]]
        train_to_end(cfg, c, device, stop_after=1)
        train_to_end(cfg, c, device)
        report[f"resume_equal_deterministic_{det}"] = max_abs_diff(weights(a), weights(c)) == 0.0
        report[f"resume_max_abs_diff_deterministic_{det}"] = max_abs_diff(weights(a), weights(c))
    return report


def cpu_vs_gpu(device: torch.device, quick: bool, steps: int = 20) -> dict:
    """The same initial weights and batches on the CPU and on ``device``, 20 fp32 steps."""
    from abexp.config import load_config
    from abexp.train.run import Run

    cfg = load_config(None, tiny_run_config(device, quick, "train.precision=fp32"))
    cpu, dev = Run(cfg, "/nonexistent", "cpu", log=lambda m: None), Run(cfg, "/nonexistent", device.type, log=lambda m: None)
    # the same initial weights: both models are initialised on the CPU from cfg.seed
    batches = iter(cpu.batches.epoch(0))
    for i in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(cpu.batches.epoch(i))
            x, y = next(batches)
        cpu.train_step(x, y, 0.05)
        dev.train_step(x.to(device), y.to(device), 0.05)
    w_cpu, w_dev = cpu.engine.w.double(), dev.engine.w.double().cpu()
    return {"steps": steps, "relative_l2": float((w_cpu - w_dev).norm() / w_cpu.norm()),
            "max_abs": float((w_cpu - w_dev).abs().max())}


def busy_share(step, device: torch.device, steps: int) -> float | None:
    """The share of wall time the GPU spends in kernels over ``steps`` steps (profiler)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(steps)
        torch.cuda.synchronize(device)
    wall_us = (time.perf_counter() - start) * 1e6
    busy_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                  for e in prof.key_averages())
    return round(busy_us / wall_us, 3)


def step_times(device: torch.device, quick: bool) -> list[dict]:
    from abexp.tools.bench import step_timer

    model, batch, steps = ("resnet8", 32, 3) if quick else ("resnet20", 128, 50)
    rows = []
    variants = {"fp32": ("train.precision=fp32",), "tf32": ("train.precision=tf32",),
                "bf16": ("train.precision=bf16",), "bf16+channels_last": ("train.precision=bf16", "train.channels_last=true")}
    for optim in ("sgdm", "ab"):
        for name, extra in variants.items():
            _, timer = step_timer(32, model, batch, device.type, optim=optim, extra=extra)
            timer(3)
            rows.append({"model": model, "batch": batch, "optim": optim, "precision": name, "delay": 32,
                         "step_ms": round(timer(steps) * 1e3, 3), "gpu_busy_share": busy_share(timer, device, min(steps, 20))})
    return rows


def packed(device: torch.device, quick: bool) -> list[dict]:
    from abexp.tools.bench import packed_step_time

    rows = []
    for k in ((1, 2) if quick else (1, 8, 32)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        ms = packed_step_time(device.type, k, 2 if quick else 20, batch=32 if quick else 128) * 1e3
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"k": k, "step_ms": round(ms, 3), "ms_per_run_step": round(ms / k, 3),
                     "peak_memory_gib": None if peak is None else round(peak, 2)})
    return rows


def resnet50_step(device: torch.device, quick: bool) -> dict:
    """An ImageNet-sized step: ResNet-50 at 224x224 (112 in quick mode), bf16, delay 32."""
    from abexp.sim.engine import DelayedSGD, FlatParams
    from abexp.config import load_config
    from abexp.train.models import build_model
    from abexp.train.run import autocast, set_determinism, set_precision

    batch, size, steps = (4, 112, 2) if quick else (128, 224, 20)
    cfg = load_config(None, ["delay.steps=32", "optim.name=ab", "train.precision=bf16", "train.channels_last=true"])
    # process-wide flags: set here, not inherited from whichever section ran before
    set_precision(cfg.train.precision)
    set_determinism(cfg.train.deterministic, device)
    torch.manual_seed(0)
    model = build_model("resnet50", 1000).to(device).to(memory_format=torch.channels_last)
    flat = FlatParams(model, True)
    engine = DelayedSGD(flat.data, flat.sizes, cfg.optim, cfg.delay, 0)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def grad_fn(w):
        flat.data.copy_(w)
        flat.grad.zero_()
        with autocast(device, cfg.train.precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        return flat.grad

    def timer(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            engine.step(grad_fn, 0.1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / n

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer(2)
    ms = timer(steps) * 1e3
    return {"batch": batch, "image": size, "precision": "bf16+channels_last", "delay": 32, "optim": "ab",
            "deterministic": cfg.train.deterministic, "tf32": torch.backends.cuda.matmul.allow_tf32,
            "step_ms": round(ms, 2), "images_per_s": round(batch / ms * 1e3, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None}


def summary_markdown(env: dict, tests: dict, probe: dict) -> str:
    gpu = env.get("gpu") or env.get("cpu")
    lines = [f"# abexp gpu-check: {gpu}", "",
             f"torch {env['torch']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, driver {env.get('driver')}, "
             f"Python {env['python']}, abexp {env.get('abexp_commit')}, {env['date']}", "",
             tests_line(tests), ""]
    det = probe.get("determinism", {})
    if det:
        lines += ["| check | deterministic on | off |", "|---|---|---|"]
        for key, label in (("resume_equal", "resume = uninterrupted (bitwise)"),
                           ("identical_runs_equal", "two identical runs equal (bitwise)")):
            lines.append(f"| {label} | {det.get(key + '_deterministic_True')} | {det.get(key + '_deterministic_False')} |")
        lines.append("")
    if "cpu_vs_gpu" in probe:
        c = probe["cpu_vs_gpu"]
        lines += [f"CPU vs GPU after {c['steps']} fp32 steps: relative L2 {c['relative_l2']:.3g}, max abs {c['max_abs']:.3g}", ""]
    if probe.get("step_times"):
        lines += ["| optim | precision | step ms | GPU busy |", "|---|---|---|---|"]
        lines += [f"| {r['optim']} | {r['precision']} | {r['step_ms']} | {r['gpu_busy_share']} |" for r in probe["step_times"]]
        lines.append("")
    if probe.get("packed"):
        lines += ["| K packed | step ms | ms per run-step | peak GiB |", "|---|---|---|---|"]
        lines += [f"| {r['k']} | {r['step_ms']} | {r['ms_per_run_step']} | {r['peak_memory_gib']} |" for r in probe["packed"]]
        lines.append("")
    if "resnet50" in probe:
        r = probe["resnet50"]
        lines += [f"ResNet-50 {r['image']}px batch {r['batch']} {r['precision']} AB at D = 32: {r['step_ms']} ms/step, "
                  f"{r['images_per_s']} images/s, peak {r['peak_memory_gib']} GiB", ""]
    for key, err in probe.get("failed", {}).items():
        lines.append(f"- {key} FAILED: {err}")
    for key, err in (probe.get("bench") or {}).get("failed", {}).items():
        lines.append(f"- bench {key} FAILED: {err}")
    return "\n".join(lines) + "\n"


# Wall-clock limits per section on a GPU (seconds): with the start-up, under the 7 minutes a lent
# device gives gpu-check. A section past its limit is reported as failed; the others still run.
LIMITS_S = {"tests": 110, "determinism": 35, "cpu_vs_gpu": 20, "step_times": 35, "packed": 25, "resnet50": 30}
# the trimmed bench: figures a-d (e, the parameter server with its ResNet-50 gradients, is CPU-only)
BENCH_LIMITS_S = {"delay_overhead": 20, "path_vs_naive": 30, "compile": 40, "grid_throughput": 60}


def main(argv: list[str] | None = None) -> int:
    init_process_env()  # first: cuBLAS reads it once per process; pytest's process inherits it
    parser = argparse.ArgumentParser(prog="python -m abexp.tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the (at most seven) files")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: the same code at --quick sizes, to test the script itself")
    parser.add_argument("--quick", action="store_true", help="toy sizes (seconds)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run tests/test_gpu.py")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: torch.cuda.is_available() is False with this python "
              f"({sys.executable}, torch {torch.__version__})", file=sys.stderr)
        return 2
    from abexp.tools.sections import run_sections

    device = torch.device(args.device)
    limited = device.type == "cuda"  # on a CPU (--quick, testing the script) nothing is timed out
    limit = lambda name: LIMITS_S.get(name) if limited else None  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logged: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        logged.append(msg)

    env = environment(device)
    io.write_json(out / "env.json", env)
    log(json.dumps(env))
    tests = {"skipped_by_flag": True} if args.skip_tests else \
        run_gpu_tests(out, log, require_gpu=device.type == "cuda", limit_s=limit("tests"))
    work = out / ".work"
    parts = [("determinism", lambda: resume_and_determinism(device, args.quick, work)),
             ("cpu_vs_gpu", lambda: cpu_vs_gpu(device, args.quick)),
             ("step_times", lambda: step_times(device, args.quick)),
             ("packed", lambda: packed(device, args.quick)),
             ("resnet50", lambda: resnet50_step(device, args.quick)),
             ("bench", lambda: trimmed_bench(device, args.quick, out, limited, log))]
    # each part on its own: one that fails or overruns costs only its own figures
    probe = run_sections([(name, part, limit(name)) for name, part in parts], {},
                         lambda rep: io.write_json(out / "probe.json", rep), log)
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    summary = summary_markdown(env, tests, probe)
    io.write_text(out / "summary.md", summary)
    log(summary)
    io.write_text(out / "log.txt", "\n".join(logged) + "\n")
    bench_failed = (probe.get("bench") or {}).get("failed")
    return 0 if (tests.get("passed") or args.skip_tests) and not probe["failed"] and not bench_failed else 1


def trimmed_bench(device: torch.device, quick: bool, out: Path, limited: bool, log) -> dict:
    """abexp.tools.bench's figures a-d at fewer steps and packs (its bench.json / bench.md),
    each under its limit on a GPU; a failed figure is in the report's ``failed``."""
    from abexp.tools import bench

    sections = ("delay_overhead",) if quick else tuple(BENCH_LIMITS_S)
    steps, rounds = (2, 1) if quick else (10, 2)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        return bench.run_bench(device, steps, rounds, [1, 8, 32], [4, 16], [], sections, out,
                               BENCH_LIMITS_S if limited else None, log=lambda m: log(f"bench {m}"))


if __name__ == "__main__":
    raise SystemExit(main())
