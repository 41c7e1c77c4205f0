"""The ``abexp`` command line. Bad input exits with code 2 and one line naming file and key."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from abexp.config import ConfigError
from abexp.lab import elsewhere, preflight
from abexp.process_env import init_process_env

EXIT_BAD_INPUT = 2
# the flags of `abexp run` that only a launch backend reads (Launch.options): SLURM's today
BACKEND_OPTIONS = ("array", "slurm_folder", "partition", "account", "qos", "time", "cpus_per_task", "mem",
                   "gpus_per_task")


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def rule_name(text: str) -> str:
    """A registered update rule (built-in or a loaded plugin's)."""
    from abexp.registry import RULES
    if text not in RULES:
        raise argparse.ArgumentTypeError(RULES.unknown(text))
    return text


def take_plugins(argv: list[str]) -> list[str]:
    """``--plugin MODULE`` (or ``--plugin=MODULE``), anywhere on the line and repeatable: taken
    out of argv and named in ABEXP_PLUGINS, which the registries load lazily (only a command that
    needs a name imports it) and every process abexp starts inherits (abexp.registry)."""
    rest, modules, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--plugin" and i + 1 < len(argv):
            modules.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--plugin="):
            modules.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if modules:
        from abexp.registry import add_plugins
        add_plugins(modules)
    return rest


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def cmd_train(args: argparse.Namespace) -> int:
    from abexp.config import check_processes, load_config, run_id
    from abexp.train.start import train_run

    cfg = load_config(args.config, args.set)  # validated before any process is started
    if cfg.delay.kind == "async":
        from abexp.train.async_ps import check_launched_world, launched_world, launched_worker_main
        if args.nproc not in (1, cfg.delay.workers + 1):
            raise ConfigError("--nproc", "", f"delay.kind async runs a server and delay.workers = "
                              f"{cfg.delay.workers} workers: --nproc 1 (abexp starts them) or "
                              f"{cfg.delay.workers + 1} (torchrun does), not {args.nproc}")
        launched = launched_world()
        if launched is not None:  # one process of a group torchrun or srun started
            check_launched_world(cfg, launched[1], args.config)
            if launched[0] != 0:
                return launched_worker_main(cfg, args.config)
    else:
        check_processes(cfg, args.nproc, args.config)
    preflight.check_runs([cfg], args.config)
    out = Path(args.out) if args.out else Path(args.results) / "runs" / run_id(cfg)
    preflight.check_results_dir(str(out), write=True, flag="--out" if args.out else "--results")
    if args.nproc > 1:
        return launch_torchrun(args.nproc, out, args)
    from abexp import io
    from abexp.lab.claims import ClaimLost, from_env
    from abexp.lab.runner import apply_thread_budget
    from abexp.train.distributed import shutdown
    from abexp.train import preempt
    # ABEXP_THREADS (or SLURM's CPUs) bound torch's threads, as in a worker; split among DDP ranks
    apply_thread_budget(int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if cfg.delay.kind != "async" else 1)
    preempt.install_if_forwarded()  # a rank of `--nproc N`: its launcher passes SLURM's signals on
    claim = from_env()  # a rank of a worker's multi-GPU run: fenced by the worker's claim
    try:
        with io.fenced(out, claim.check) if claim else contextlib.nullcontext():
            result = train_run(cfg, out, device=args.device, stop_after_epochs=args.stop_after)
    except preempt.Preempted as stop:  # every rank stopped after the same step; rank 0 saved it
        rank = int(os.environ.get("RANK", "0"))
        saved = f", checkpoint saved; run again to resume: {out}" if rank == 0 else ""
        print(f"abexp: rank {rank}: stop signal: stopped after {stop}{saved}", file=sys.stderr)
        return 0
    except ClaimLost as lost:
        print(lost, file=sys.stderr)
        return 3
    except RuntimeError as err:
        from abexp.train.async_ps import AsyncWorkerError
        if not isinstance(err, AsyncWorkerError):
            raise
        print(f"abexp: {err}", file=sys.stderr)  # one line: the checkpoint resumes the run
        return 1
    finally:
        shutdown()
    if result is None:
        print(f"stopped after epoch {args.stop_after}; run again to resume: {out}")
        return 0
    keys = ("run_id", "status", "test_acc", "best_test_acc", "test_loss", "test_bpc", "epochs_completed",
            "steps", "wall_s")
    lm_only = ("test_loss", "test_bpc")  # a language model's (nats, bits per character)
    print(json.dumps({k: result[k] for k in keys
                      if k in result and (k not in lm_only or "test_bpc" in result)}))
    return 0


def launch_torchrun(nproc: int, out: Path, args: argparse.Namespace) -> int:
    """Re-run this ``abexp train`` under torchrun with ``nproc`` processes on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "abexp.cli", "train", args.config, "--out", str(out), "--device", args.device]
    for item in args.set:
        cmd += ["--set", item]
    if args.stop_after is not None:
        cmd += ["--stop-after", str(args.stop_after)]
    from abexp.train import preempt
    preempt.install()  # SIGTERM/USR1/USR2 here (SLURM's, a worker's): passed on to the ranks
    return preempt.run_forwarding(cmd, grandchildren=True)


def cmd_stability(args: argparse.Namespace) -> int:
    from abexp.sim.stability import pipeline_table, stability_table

    def progress(row: dict) -> None:  # a bisection per row: say where we are
        what = f"S={row['stages']} {row['kind']}" if "stages" in row else f"D={row['delay']}"
        sys.stderr.write(f"  {row['optim']} {what}: x_max {row['x_max']:.5f}\n")

    if args.stages:
        rows = pipeline_table(args.optim, args.stages, args.momentum, args.rho, args.steps, progress)
    else:
        rows = stability_table(args.optim, args.delays, args.momentum, args.rho, args.steps, progress)
    if args.out:
        import pandas as pd
        from abexp.lab.collect import write_table
        write_table(pd.DataFrame(rows), args.out)
    keys = ("optim", "rho", "momentum", "stages", "kind", "delay", "x_max")
    if args.json:
        print(json.dumps([{k: r[k] for k in keys if k in r} for r in rows], indent=1))
        return 0
    print(f"largest stable x = eta*lambda_max on a quadratic (m={args.momentum}, rho={args.rho}, "
          f"{args.steps} steps, 50 eigenvalues on [0.01, 1])")
    stage_col = f"{'S':>3} {'kind':>8} " if args.stages else ""
    print(f"{'optim':>8} {stage_col}{'delay':>5} {'x_max':>10} {'sgdm exact':>11} {'ratio':>7}")
    for r in rows:
        stage = f"{r['stages']:>3} {r['kind']:>8} " if args.stages else ""
        print(f"{r['optim']:>8} {stage}{r['delay']:>5} {r['x_max']:>10.5f} {r['sgdm_analytic']:>11.5f} "
              f"{r['x_max'] / r['sgdm_analytic']:>7.2f}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from abexp.lab import length
    from abexp.lab.runner import run_state, runs_dir
    from abexp.lab.spec import load_spec

    preflight.check_results_dir(args.results)
    plan = load_spec(args.spec, args.set).expand()
    if args.json:
        print(json.dumps([{"run_id": r.run_id, "overrides": r.overrides,
                           "config": r.config.model_dump()} for r in plan], indent=1))
        return 0
    for r in plan:
        state = run_state(runs_dir(args.results) / r.run_id)
        label = " ".join(f"{k}={v}" for k, v in r.overrides.items()) or "(base)"
        print(f"{r.run_id}  {state:<9} {length.describe(r.config):<32} {label}")
    print(f"{len(plan)} runs")
    for line in length.summary([r.config for r in plan]):
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from abexp.lab import length
    from abexp.lab.backends import Launch, get_backend
    from abexp.lab.spec import load_spec

    backend = get_backend(args.backend)
    elsewhere.remember(args.done_rows)  # each rows file checked before anything is written
    preflight.check_results_dir(args.results, write=True)
    plan = load_spec(args.spec, args.set).expand()  # validate every run before anything starts
    if args.done_rows:  # runs another machine finished: not run here (abexp.lab.elsewhere)
        here = elsewhere.to_run_here(plan)
        print(f"{len(plan) - len(here)} of {len(plan)} runs finished elsewhere "
              f"({', '.join(args.done_rows)}): not run here", file=sys.stderr, flush=True)
        plan = here
    preflight.check_plan(plan, args.results, args.gpus_per_run, args.spec)
    launch = Launch(args.spec, args.results, plan, overrides=args.set, workers=args.workers,
                    gpus=[g for g in args.gpus.split(",") if g] if args.gpus else None,
                    runs_per_gpu=args.runs_per_gpu, gpus_per_run=args.gpus_per_run, pack=args.pack,
                    progress=not args.no_progress, options={k: getattr(args, k) for k in BACKEND_OPTIONS})
    backend.check(launch)  # bad input: one line, before anything is printed or submitted
    for line in length.summary([run.config for run in plan]):  # the run's length, before it trains
        print(line, file=sys.stderr, flush=True)
    return backend.launch(launch)


def cmd_replay(args: argparse.Namespace) -> int:
    """Write the replay spec of a spec's finished async runs, then run it like ``abexp run``."""
    from abexp.lab.local import run_local
    from abexp.lab.replay import write_replay_spec

    preflight.check_results_dir(args.results, write=True)
    path, count, pending = write_replay_spec(args.spec, args.results, args.set)
    more = f"; {pending} async run(s) not finished yet: run abexp replay again after them" if pending else ""
    print(f"wrote {path}: replays of {count} finished async run(s){more}", file=sys.stderr, flush=True)
    if args.write_only:
        return 0
    # one torch thread per process: the replay then equals its async run bitwise (docs/async.md)
    os.environ.setdefault("ABEXP_THREADS", "1")
    return run_local(str(path), args.results, args.workers, progress=not args.no_progress)


def cmd_cancel(args: argparse.Namespace) -> int:
    from abexp.lab.slurm import cancel

    if not Path(args.slurm_folder).is_dir():
        raise ConfigError("--slurm-folder", "", f"{args.slurm_folder}: no such folder")
    ids = cancel(args.slurm_folder)
    print(f"cancelled {len(ids)} job(s); their tasks checkpoint and are not requeued" if ids
          else f"no jobs recorded under {args.slurm_folder}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from abexp.lab.runner import run_state, runs_dir, summarize
    from abexp.lab.spec import load_spec

    preflight.check_results_dir(args.results)
    plan = load_spec(args.spec, args.set).expand()
    import pandas as pd
    from abexp.lab.collect import collect
    damaged: list[str] = []
    table = collect(args.results, [r.run_id for r in plan], damaged).set_index("run_id") if plan else None
    damaged_ids = {Path(d.split(":", 1)[0]).parent.name for d in damaged}
    done_elsewhere = set().union(*(elsewhere.read_finished_ids(f) for f in args.done_rows))
    states = []
    for r in plan:
        state = "damaged" if r.run_id in damaged_ids else run_state(runs_dir(args.results) / r.run_id)
        if r.run_id in done_elsewhere and state not in ("completed", "diverged"):
            state = "elsewhere"  # finished on another machine: its row is committed (abexp run --done-rows)
        states.append(state)
        acc = ""
        if table is not None and r.run_id in table.index and pd.notna(table.loc[r.run_id, "test_acc"]):
            acc = f"test_acc={float(table.loc[r.run_id, 'test_acc']):.4f}"
        label = " ".join(f"{k}={v}" for k, v in r.overrides.items()) or "(base)"
        print(f"{r.run_id}  {state:<9} {acc:<16} {label}")
    print(summarize(states))
    return 1 if damaged else 0


def cmd_collect(args: argparse.Namespace) -> int:
    from abexp.lab.collect import SUMMARY, collect, readable, write_table

    preflight.check_results_dir(args.results)
    for target in (args.output, args.curves):
        if target and Path(target).suffix not in (".csv", ".parquet"):
            raise ConfigError("collect", "-o" if target == args.output else "--curves",
                              f"{target}: expected a .csv or .parquet file")
    damaged: list[str] = []
    table = collect(args.results, damaged=damaged)
    if args.curves:
        from abexp.lab.collect import collect_epochs
        curves = collect_epochs(args.results, table)
        write_table(curves, args.curves)
        print(f"wrote {len(curves)} epoch rows to {args.curves}")
    if args.output:
        write_table(table, args.output)
        print(f"wrote {len(table)} runs to {args.output}")
    elif not args.curves:
        print(readable(table, SUMMARY).to_string(index=False))
    if damaged:
        print(f"abexp: {len(damaged)} damaged run folder(s) skipped (see the warnings above)", file=sys.stderr)
    return 1 if damaged else 0


def cmd_confirm(args: argparse.Namespace) -> int:
    from abexp.figures.confirm import write_confirm_spec

    if not args.results.endswith(".csv"):  # a rows file is read as it is
        preflight.check_results_dir(args.results)
    ids = write_confirm_spec(args.spec, args.results, args.seeds, args.output, args.allow_partial)
    print(f"wrote {args.output}: {len(ids)} runs (abexp plan {args.output} lists them)")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from abexp.figures.make import main as figures_main

    preflight.check_results_dir(args.results, write=True)  # runs.csv, epochs.csv and figures/ go there
    argv = ["--results", args.results] + [a for e in args.experiment for a in ("--experiment", e)] \
        + [a for f in args.spec for a in ("--spec", f)]
    from abexp.figures.paired import baseline_argv

    return figures_main(argv + (["--stability"] if args.stability else []) + baseline_argv(args.baseline or []))


def cmd_sweep(args: argparse.Namespace) -> int:
    from abexp.lab import sweep, sweep_report
    from abexp.lab.sweep_file import load_sweep

    preflight.check_results_dir(args.results, write=not (args.best or args.trials))
    if args.trials:
        return sweep_report.trials(args.sweep, args.results, args.storage, args.set)
    if args.best:
        return sweep_report.best(args.sweep, args.results, args.storage, args.set, args.export)
    spec = load_sweep(args.sweep, args.set)
    for note in spec.notes:
        print(f"note: {note}", file=sys.stderr)
    preflight.check_sweep(args.sweep, spec.base, spec.space)  # the base and every end of the space, before the study exists
    return sweep.run_sweep(args.sweep, args.results, args.workers, args.n_trials, args.storage,
                           args.set, progress=not args.no_progress)


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="experiment spec YAML (experiments/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key in the base of every run (e.g. data.root=...)")
    p.add_argument("--results", default="results", help="results folder (default results/)")


def package_version() -> str:
    """The installed package's version (pyproject.toml), read without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("abexp")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> Parser:
    from abexp.lab.backends import BACKENDS

    parser = Parser(prog="abexp", description="Gradient-delay experiments (Adaptive Braking et al.)")
    parser.add_argument("--version", action="version", version=f"abexp {package_version()}")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE, which registers models, datasets or update rules "
                             "(repeatable; also after the command; or ABEXP_PLUGINS=mod1,mod2; "
                             "docs/extending.md)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train one run from a YAML config")
    p.add_argument("config", help="run config YAML (partial: the rest comes from the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--out", help="run folder (default RESULTS/runs/<run_id>)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when available")
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop (resumably) after this many epochs; for tests and time-boxed jobs")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (torchrun; one GPU each)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("stability", help="largest stable step on a quadratic, per optimizer and delay")
    p.add_argument("--optim", nargs="+", default=["sgdm", "ab"], type=rule_name, metavar="NAME",
                   help="optimizers to compare (default sgdm ab; any registered update rule)")
    p.add_argument("--rho", type=float, default=1.0, help="AB's braking strength (default 1.0)")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum (default 0.9)")
    p.add_argument("--delays", nargs="+", type=non_negative_int, default=[0, 1, 2, 4, 8, 16, 32], metavar="D",
                   help="gradient delays in steps (default 0 1 2 4 8 16 32)")
    p.add_argument("--stages", nargs="+", type=positive_int, metavar="S",
                   help="instead of --delays: S pipeline stages (delays 2(S-1-s)) next to one "
                        "constant delay 2(S-1), e.g. --stages 1 2 4 8 16")
    p.add_argument("--steps", type=positive_int, default=3000, help="simulated steps per trial")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="also write the table to FILE.csv (for analysis/stability.py)")
    p.set_defaults(func=cmd_stability)

    p = sub.add_parser("plan", help="list the runs a spec expands to, with their state")
    add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run every run of a spec (resumable, exactly once)")
    add_spec_args(p)
    p.add_argument("--workers", type=positive_int, help="worker processes (default: one per GPU slot, or 1)")
    p.add_argument("--gpus", help="comma-separated GPU ids (default: all visible)")
    p.add_argument("--runs-per-gpu", type=int, default=1, help="runs sharing one GPU")
    p.add_argument("--gpus-per-run", type=int, default=1,
                   help="GPUs per run (data parallel through torchrun), e.g. 8 for ImageNet")
    p.add_argument("--pack", type=int, default=1,
                   help="train up to K compatible runs together in one process (grouped convolutions)")
    p.add_argument("--backend", default="local", metavar="|".join(BACKENDS),
                   help="where the workers start (abexp.lab.backends); slurm: an sbatch job array of "
                        "workers (see the options below)")
    g = p.add_argument_group("slurm", "checked against sinfo before submitting")
    g.add_argument("--array", type=positive_int, default=4, help="array tasks (workers)")
    g.add_argument("--slurm-folder", default="results/slurm", help="job scripts and logs")
    g.add_argument("--partition", "--slurm-partition", dest="partition", help="default: the cluster's")
    g.add_argument("--account", help="SLURM account to charge")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--time", help="per task, SLURM syntax (90, 4:00:00, 1-00:00:00); USR1 comes "
                                  "2 min before it, the task checkpoints and requeues")
    g.add_argument("--cpus-per-task", type=positive_int,
                   help="also the torch threads of a task (split among a run's ranks); default: "
                        "(data.workers + 1) per GPU of a run for ImageNet, else 2")
    g.add_argument("--mem", help="per task, SLURM syntax (16G, 4000)")
    g.add_argument("--gpus-per-task", type=non_negative_int,
                   help="default: --gpus-per-run where the partition has GPUs, else 0")
    p.add_argument("--done-rows", action="append", default=[], metavar="ROWS.csv",
                   help="a study's committed rows file (results/<study>_runs.csv): its finished runs are "
                        "not run again here (repeatable; abexp.lab.elsewhere)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="replay a spec's finished async runs from their trace.txt")
    add_spec_args(p)
    p.add_argument("--workers", type=positive_int, help="worker processes (default 1)")
    p.add_argument("--write-only", action="store_true",
                   help="write RESULTS/replays/<name>.yaml and stop (abexp run it later, or on SLURM)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("cancel", help="stop a SLURM submission for good (no requeue)")
    p.add_argument("--slurm-folder", default="results/slurm", help="as given to abexp run")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("status", help="state and accuracy of every run of a spec")
    add_spec_args(p)
    p.add_argument("--done-rows", action="append", default=[], metavar="ROWS.csv",
                   help="a study's committed rows file: its finished runs missing here show as 'elsewhere'")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("collect", help="one table row per run in RESULTS/runs")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("-o", "--output", help="FILE.csv or FILE.parquet (default: print)")
    p.add_argument("--curves", help="also write per-epoch metrics of every run to FILE.csv|.parquet")
    p.set_defaults(func=cmd_collect)
    p = sub.add_parser("confirm", help="write a spec that runs more seeds at each optimizer's selected lr")
    p.add_argument("spec", help="the study's spec (its finished runs select the lrs)")
    p.add_argument("--results", default="results",
                   help="results folder (default results/), or a study's rows file (ROWS.csv, analysis/study_rows.py)")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="the seeds to run at the selected lrs")
    p.add_argument("-o", "--output", required=True, help="the spec to write (experiments/NAME_confirm.yaml)")
    p.add_argument("--allow-partial", action="store_true",
                   help="select although runs of SPEC at the selecting seeds have not finished")
    p.set_defaults(func=cmd_confirm)
    p = sub.add_parser("figures", help="every figure from a results folder (no training)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--experiment", action="append", default=[],
                   help="only this experiment or sweep (repeatable); seconds, no stability tables")
    p.add_argument("--spec", action="append", default=[],
                   help="the runs of this spec, whichever spec trained them (repeatable)")
    p.add_argument("--stability", action="store_true",
                   help="(re)compute and draw the quadratic stability tables (minutes of CPU); without "
                        "it, kept tables are drawn and missing ones skipped")
    p.add_argument("--baseline", action="append",
                   help="the optimizer paired.md compares every other with (default sgdm), or a series by its "
                        "label; repeated, one per optimizer: each optimizer's series against its own (ablations)")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("sweep", help="Optuna sweep whose trials are ordinary runs")
    p.add_argument("sweep", help="sweep YAML (sweeps/*.yaml)")
    p.add_argument("--n-trials", type=int, help="total target (default: the file's n_trials)")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes on this machine")
    p.add_argument("--storage", help="Optuna storage: FILE.journal (default results/sweeps/NAME.journal), "
                                     "sqlite:///FILE.db or postgresql://...")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a key (e.g. delay.steps=32); the study name records it")
    p.add_argument("--best", action="store_true", help="print the best trial instead of running")
    p.add_argument("--trials", action="store_true",
                   help="print every trial (number, state, parameters, objective, run id) instead of running")
    p.add_argument("--export", help="with --best: write a spec re-running the best config over seeds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    init_process_env()  # first: cuBLAS reads it once per process (abexp.process_env)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `abexp plan ... | head` exits quietly
    parser = build_parser()
    from abexp.registry import PluginError
    try:
        argv = take_plugins(list(sys.argv[1:] if argv is None else argv))
        args = parser.parse_args(argv)  # --help and usage errors end here, before torch is imported
    except PluginError as err:
        sys.stderr.write(f"abexp: error: {err}\n")
        return EXIT_BAD_INPUT
    from abexp.data.common import DataError
    from abexp.io import WriteError
    from abexp.train.run import RunDirError
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, RunDirError, PluginError) as err:
        sys.stderr.write(f"abexp: error: {err}\n")
        return EXIT_BAD_INPUT
    except WriteError as err:  # a full disk is not bad input: exit 1, still one line
        sys.stderr.write(f"abexp: error: {err.strerror}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
