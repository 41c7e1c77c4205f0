"""The checks a bad input must fail before anything is written: pipeline cuts, datasets on disk,
the results folder, run folders, and names that become paths. ``abexp train``, ``run`` and
``sweep`` call the same functions, so each bad input is one line naming the file and the key,
exit 2, and no study, trial or run folder exists afterwards (a check inside a worker used to
fail once per trial: a sweep over 40 pipeline stages wrote thousands of failed run folders).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import yaml

from abexp.config import ConfigError, set_dotted, validate

if TYPE_CHECKING:
    from abexp.config import RunConfig

# space keys under these prefixes can change what check_pipelines and check_data see
PREFLIGHT_PREFIXES = ("delay.", "model.", "data.")


def check_name(name: Any, source: str, key: str = "name") -> str:
    """A spec's or sweep's name becomes a file or folder name (journal, workers folder, figures,
    replays): a plain name only, so ``../../x`` cannot put files outside the results folder."""
    if not isinstance(name, str) or not name:
        raise ConfigError(source, key, f"expected a plain name (got {name!r})")
    bad = next((c for c in ("/", "\\", "\0") if c in name), None)
    if bad is not None or ".." in name or name.startswith("."):
        why = f"contains {bad!r}" if bad is not None else "contains '..'" if ".." in name else "starts with '.'"
        raise ConfigError(source, key, f"{name!r} {why}: a name becomes a file name, so it must be a plain "
                                       "name (no path separator, no '..', no leading dot)")
    if len(name.encode()) > 200:
        raise ConfigError(source, key, f"{len(name.encode())} bytes: too long for a file name (at most 200)")
    return name


def path_component(name: str) -> str:
    """One file-name component for any study or experiment name, never a path: a sweep name
    carries its --set values (``__data.root=/x``), and an experiment name comes from run configs."""
    safe = name.replace("/", "%2F").replace("\\", "%5C").replace("\0", "%00")
    return "%2E" + safe[1:] if safe.startswith(".") else safe or "unnamed"


def check_pipelines(configs: Iterable[RunConfig], source: str) -> None:
    """More pipeline stages than the model has parameter tensors cannot be cut, and a backward
    pass cannot run at older weights than its forward pass: one line naming the key, before any
    worker starts (it used to be a traceback inside the worker)."""
    from abexp.sim.pipeline import backward_delays, stage_delays
    from abexp.registry import MODELS
    from abexp.train.models import parameter_tensors

    for cfg in configs:
        if cfg.delay.kind != "pipeline":
            continue
        forward, backward = stage_delays(cfg.delay), backward_delays(cfg.delay)
        if backward is not None and any(b > f for b, f in zip(backward, forward)):
            raise ConfigError(source, "delay.stage_backward_delays",
                              f"each must be at most its stage's forward delay {forward} (a backward pass "
                              f"runs after its forward pass); got {backward}")
        stages = cfg.delay.stages if cfg.delay.stage_delays is None else len(cfg.delay.stage_delays)
        tensors = parameter_tensors(cfg.model.name)
        record = MODELS.find(cfg.model.name)
        if tensors is None and record is not None and record.max_stages is not None:
            tensors = record.max_stages(cfg)  # a model cut by its own units (the GPT: its blocks)
        if tensors is not None and stages > tensors:
            key = "delay.stages" if cfg.delay.stage_delays is None else "delay.stage_delays"
            raise ConfigError(source, key, f"{stages} stages, but {cfg.model.name} has {tensors} parameter "
                                           f"tensors (or groups) to cut into stages (at most {tensors} stages)")


def check_data(configs: Iterable[RunConfig], source: str, seen: set | None = None) -> None:
    """Every distinct dataset of a plan, checked present and well-formed before any worker
    starts: a missing folder is one error line naming the config file, not one failed run per
    grid cell. ``seen`` carries the datasets already checked across calls."""
    from abexp.data.common import DataError
    from abexp.data.load import preflight

    seen = set() if seen is None else seen
    for cfg in configs:
        key = (cfg.data.name, cfg.data.root, cfg.data.download)
        if key not in seen:
            seen.add(key)
            try:
                preflight(cfg)
            except DataError as err:
                raise DataError(f"{source}: {err}") from None


def check_muon(configs: Iterable[RunConfig], source: str) -> None:
    """Rules muon and ab_muon need a matrix for Muon: a model without one under
    optim.muon_params (a ResNet under hidden) is one line naming the key, not a traceback."""
    import torch

    from abexp.sim.muon import muon_matrices
    from abexp.sim.optim import mitigations
    from abexp.train.catalog import CIFAR_RESNETS, IMAGENET_RESNETS
    from abexp.train.models import build_model

    for cfg in configs:
        # a built-in ResNet is built here without its data; any other model finds out when built
        if not mitigations(cfg.optim.name).muon or cfg.model.name not in CIFAR_RESNETS + IMAGENET_RESNETS:
            continue
        with torch.device("meta"):
            matrices = muon_matrices(build_model(cfg.model.name), cfg.optim.muon_params)
        if all(m is None for m in matrices):
            raise ConfigError(source, "optim.muon_params", f"{cfg.optim.muon_params}: {cfg.model.name} has no "
                              f"such 2-D weight for {cfg.optim.name}'s Muon (its hidden layers are "
                              "convolutions; all_2d puts Muon on the output layer)")


def check_runs(configs: list[RunConfig], source: str) -> None:
    """What a run config alone cannot say is wrong: its pipeline cut, its Muon matrices and its
    dataset."""
    check_pipelines(configs, source)
    check_muon(configs, source)
    check_data(configs, source)


def check_results_dir(path: str, write: bool = False, flag: str = "--results") -> None:
    """--results must be a folder (or not exist yet), and writable where we will write."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(flag, "", f"{path} is a file, not a folder")
    if write:
        existing = Path(path).absolute()
        while not existing.exists():
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(flag, "", f"{path}: cannot write in {existing} (permission denied)")


def check_run_folders(plan: list, runs: Path) -> None:
    """A run folder in ``runs`` (RESULTS/runs) must hold the run it is named after: a folder
    copied or edited by hand would otherwise fail its run inside a worker, once per retry."""
    from abexp.config import load_config, run_id
    from abexp.train.folder import RunFolder

    for run in plan:
        folder = RunFolder(runs / run.run_id)
        if folder.config.exists():
            other = run_id(load_config(folder.config))
            if other != run.run_id:
                raise ConfigError(str(folder.config), "", f"holds run {other}, not {run.run_id} "
                                  "(copied or edited by hand?); move the folder away")
        if folder.finished():
            try:
                other = folder.read_result().get("run_id")
            except (OSError, ValueError, AttributeError):
                continue  # damaged: collect and status report it
            if other != run.run_id:
                raise ConfigError(str(folder.result), "run_id", f"is {other}, not {run.run_id}; "
                                  "move the folder away")


def check_plan(plan: list, results: str | Path, processes: int, source: str) -> None:
    """What ``abexp run`` checks of a whole plan before any backend starts a worker: each run
    fits ``processes`` (--gpus-per-run), its folder holds it, its pipeline cut and data."""
    from abexp.config import check_processes
    from abexp.train.folder import runs_dir

    for run in plan:
        check_processes(run.config, processes, source)
    check_run_folders(plan, runs_dir(results))
    check_runs([run.config for run in plan], source)


def space_ends(spec: dict) -> list:
    """The values of one space parameter that the checks must see: every choice, or the two
    ends a sampler can reach (an int range's top is the last step; the stage check grows with
    the stage count, so the ends bound it)."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    low, high = spec["low"], spec["high"]
    if spec["type"] == "int" and not spec.get("log"):
        step = int(spec.get("step", 1))
        high = low + (high - low) // step * step
    return [low, high]


def check_sweep(source: str, base: dict, space: dict[str, dict]) -> None:
    """A sweep's base (a config tree) with every value its space can give a key these checks
    read (delay, model, data), crossed, checked before the study exists: a stage count or data
    folder that fails in one corner of the space is refused up front, naming ``space.KEY``."""
    from abexp.data.common import DataError

    seen: set = set()
    swept = {k: space_ends(s) for k, s in space.items() if k.startswith(PREFLIGHT_PREFIXES)}
    for values in itertools.product(*swept.values()):
        combo = dict(zip(swept, values))
        where = ", ".join(f"{k} = {v}" for k, v in combo.items())
        tree = yaml.safe_load(yaml.safe_dump(base))
        for key, value in combo.items():
            set_dotted(tree, key, value, source)
        try:
            cfg = validate(tree, source)
            check_pipelines([cfg], source)
            check_data([cfg], source, seen)
        except ConfigError as err:
            if not combo:
                raise
            key = f"space.{err.key}" if err.key in combo else err.key
            raise ConfigError(source, key, f"with {where}: {err.message}") from None
        except DataError as err:
            data_keys = [k for k in combo if k.startswith("data.")]
            if not data_keys:
                raise
            message = str(err).removeprefix(f"{source}: ")
            raise ConfigError(source, f"space.{data_keys[0]}", f"with {where}: {message}") from None
