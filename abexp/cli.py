"""The ``abexp`` command line. Bad input exits with code 2 and one line naming file and key."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from abexp.config import ConfigError

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


def cmd_train(args: argparse.Namespace) -> int:
    from abexp.config import load_config, run_id
    from abexp.train import train_run

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path(args.results) / "runs" / run_id(cfg)
    result = train_run(cfg, out, device=args.device, stop_after_epochs=args.stop_after)
    if result is None:
        print(f"stopped after epoch {args.stop_after}; run again to resume: {out}")
        return 0
    print(json.dumps({k: result[k] for k in ("run_id", "status", "test_acc", "best_test_acc",
                                              "epochs_completed", "steps", "wall_s")}))
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from abexp.stability import stability_table

    rows = stability_table(args.optim, args.delays, args.momentum, args.rho, args.steps)
    if args.json:
        print(json.dumps([{k: r[k] for k in ("optim", "rho", "momentum", "delay", "x_max")}
                          for r in rows], indent=1))
        return 0
    print(f"largest stable x = eta*lambda_max on a quadratic (m={args.momentum}, rho={args.rho}, "
          f"{args.steps} steps, 50 eigenvalues on [0.01, 1])")
    print(f"{'optim':>8} {'delay':>5} {'x_max':>10} {'sgdm analytic':>14} {'ratio':>7}")
    for r in rows:
        print(f"{r['optim']:>8} {r['delay']:>5} {r['x_max']:>10.5f} {r['sgdm_analytic']:>14.5f} "
              f"{r['x_max'] / r['sgdm_analytic']:>7.2f}")
    return 0


def build_parser() -> Parser:
    from abexp.config import OPTIM_NAMES

    parser = Parser(prog="abexp", description="Gradient-delay experiments (Adaptive Braking et al.)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train one run from a YAML config")
    p.add_argument("config", help="run config YAML (partial: the rest comes from the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a dotted key, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--out", help="run folder (default RESULTS/runs/<run_id>)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop (resumably) after this many epochs; for tests and time-boxed jobs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("stability", help="largest stable step on a quadratic, per optimizer and delay")
    p.add_argument("--optim", nargs="+", default=["sgdm", "ab"], choices=OPTIM_NAMES)
    p.add_argument("--rho", type=float, default=1.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--delays", nargs="+", type=int, default=[0, 1, 2, 4, 8, 16, 32])
    p.add_argument("--steps", type=int, default=3000, help="simulated steps per trial")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stability)

    return parser


def main(argv: list[str] | None = None) -> int:
    from abexp.data import DataError
    from abexp.train import RunDirError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DataError, RunDirError) as err:
        sys.stderr.write(f"abexp: error: {err}\n")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
