"""A sweep file (sweeps/*.yaml), read and checked: its schema, its search space, ``Sweep``.

    name: digits_ab_lr_rho
    base: ../experiments/digits_tiny.yaml     # a spec (its base), a run config, or a mapping
    fixed: {optim.name: ab, delay.steps: 16}
    space:
      optim.lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
      optim.rho: {type: float, low: 0.0, high: 2.0}
      optim.momentum: {type: categorical, choices: [0.8, 0.9]}
    objective: {metric: test_acc, reduce: best, direction: maximize}   # metric default: val_acc
                                                                       # when data.val_split is set
    sampler: {name: tpe, seed: 0}              # tpe | random | grid
    pruner: {name: median}                     # none | median | hyperband (per-epoch metric)
    n_trials: 20
    max_consecutive_failures: 3                # stop after this many failed trials in a row
    storage: null                              # default results/sweeps/<name>.journal

The keys and their types are strict pydantic models, as a run config's are (abexp.config):
an unknown key, a wrong type or a value outside its choices is one ``ConfigError`` line naming
the file and the dotted key (``space.optim.lr.lgo: unknown key (did you mean log?)``), exit 2.
What the models cannot say (a range's ends, Optuna's own rules, a space end that is not a
valid run config, a validation metric without a validation set) is checked after them, also
before any study exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from abexp.config import (ConfigError, config_error, flatten, parse_override, read_yaml, set_dotted,
                          validate)
from abexp.lab.preflight import check_name
from abexp.lab.spec import resolve_base

METRICS = ("val_acc", "val_loss", "test_acc", "test_loss", "train_acc", "train_loss")
MAX_FAILURES = 3  # default max_consecutive_failures: trials in a row whose run raised


def _positive(value: int) -> int:
    if value < 1:
        raise ValueError("expected a positive integer")
    return value


PositiveInt = Annotated[int, AfterValidator(_positive)]


class _Strict(BaseModel):
    # as abexp.config's run-config sections: unknown keys refused, types never coerced
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Objective(_Strict):
    metric: Optional[Literal[METRICS]] = None  # type: ignore[valid-type] -- None: val_acc with a validation set, else test_acc
    reduce: Literal["best", "final"] = "best"
    direction: Optional[Literal["maximize", "minimize"]] = None  # None: maximize an accuracy, minimize a loss
    diverged_value: Optional[float] = None  # a diverged trial's value; None: 0 (maximize) or 1e9 (minimize)


class Sampler(_Strict):
    name: Literal["tpe", "random", "grid"] = "tpe"
    seed: Optional[int] = None  # mixed with fresh entropy per process (abexp.lab.sweep.process_seed)


class Pruner(_Strict):
    name: Literal["none", "median", "hyperband"] = "none"


class SweepFile(_Strict):
    """The top level of a sweep file."""
    name: Any = None         # a plain name (check_name); default: the file's stem
    description: Any = None
    base: Any = None         # a spec or run config file, or a mapping (abexp.lab.spec.resolve_base)
    fixed: Optional[dict[str, Any]] = None
    space: Optional[dict[Any, Any]] = None
    objective: Objective = Field(default_factory=Objective)  # null in the file: these defaults
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(default_factory=Pruner)
    n_trials: PositiveInt = 20
    max_consecutive_failures: PositiveInt = MAX_FAILURES
    storage: Optional[str] = None


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: Optional[float] = None


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: Optional[int] = None


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Any]


SECTIONS = ("objective", "sampler", "pruner")  # mappings of their own (null: their defaults)
PARAMS: dict[str, type[_Strict]] = {"float": FloatParam, "int": IntParam, "categorical": CategoricalParam}


@dataclass
class Sweep:
    path: Path
    name: str
    base: dict
    space: dict[str, dict[str, Any]]
    metric: str
    reduce: str
    direction: str
    diverged_value: float
    sampler: dict
    pruner: str
    n_trials: int
    storage: str | None
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user may not expect
    max_failures: int = MAX_FAILURES  # max_consecutive_failures


def _schema_error(err: ValidationError, source: str, root: type[BaseModel], prefix: str = "") -> ConfigError:
    """The first error as one line; a mapping expected is said as such, a custom check's words as
    they are (pydantic's ``Value error, `` dropped)."""
    first = err.errors()[0]
    if first["type"] == "missing":
        return ConfigError(source, prefix + ".".join(str(p) for p in first["loc"]), "required")
    if first["type"] in ("model_type", "dict_type"):
        return ConfigError(source, prefix + ".".join(str(p) for p in first["loc"]),
                           f"expected a mapping (got {first['input']!r})")
    error = config_error(err, source, root, prefix)
    return ConfigError(error.source, error.key, error.message.removeprefix("Value error, "))


def check_param(source: str, key: str, spec: Any, base: dict) -> None:
    """One parameter of the space, checked by its schema and by Optuna's own rules before any
    study exists (a bad one used to crash the first worker inside ``suggest`` and leave a trial
    RUNNING), and each of its ends as a run config."""
    where = f"space.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in PARAMS:
        raise ConfigError(source, f"{where}.type", "expected float, int or categorical")
    model = PARAMS[spec["type"]]
    try:
        model.model_validate(spec)
    except ValidationError as err:
        raise _schema_error(err, source, model, f"{where}.") from None
    if spec["type"] == "categorical":
        values = spec["choices"]
        if not values:
            raise ConfigError(source, f"{where}.choices", "expected a non-empty list")
        for value in values:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise ConfigError(source, f"{where}.choices", f"choices must be numbers, strings, booleans or "
                                                              f"null (got {value!r})")
        if len({repr(v) for v in values}) < len(values):
            raise ConfigError(source, f"{where}.choices", "a choice is listed twice")
    else:
        low, high = spec["low"], spec["high"]
        if low >= high:
            raise ConfigError(source, f"{where}.high", f"must exceed low ({low})")
        if spec.get("log") and low <= 0:
            raise ConfigError(source, f"{where}.low", "must be > 0 on a log scale")
        step = spec.get("step")
        if step is not None:
            if step <= 0:
                raise ConfigError(source, f"{where}.step", f"expected a positive "
                                  f"{'integer' if spec['type'] == 'int' else 'number'} (got {step!r})")
            if spec.get("log") and (spec["type"] == "float" or step != 1):
                raise ConfigError(source, f"{where}.step", "Optuna allows no step on a log scale (drop step or log)")
            if step > (high - low) * (1 + 1e-9):  # float ranges round: 0.3 - 0.1 < 0.2
                raise ConfigError(source, f"{where}.step", f"larger than high - low ({high - low})")
        _optuna_distribution(source, where, spec)
        values = [low, high]
    for value in values:  # every end of the space must give a valid run config
        tree = yaml.safe_load(yaml.safe_dump(base))
        set_dotted(tree, key, value, source)
        try:
            validate(tree, source)
        except ConfigError as err:
            raise ConfigError(source, where, f"{err.key}: {err.message}") from None


def _optuna_distribution(source: str, where: str, spec: dict) -> None:
    """Whatever the checks above missed, Optuna's distribution refuses here, as one line."""
    import warnings

    from optuna.distributions import FloatDistribution, IntDistribution

    kind = IntDistribution if spec["type"] == "int" else FloatDistribution
    step = spec.get("step", 1 if spec["type"] == "int" else None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kind(spec["low"], spec["high"], log=bool(spec.get("log", False)), step=step)
    except ValueError as err:
        raise ConfigError(source, where, f"refused by Optuna: {err}") from None


def finite_values(s: dict) -> list | None:
    """Every value a parameter can take, or None when there are infinitely many (or a log scale)."""
    if s["type"] == "categorical":
        return list(s["choices"])
    if s.get("log") or (s["type"] == "float" and s.get("step") is None):
        return None
    step = s.get("step", 1)
    n = int((s["high"] - s["low"]) / step + 1e-9) + 1  # Optuna's grid: low + k*step <= high
    return [s["low"] + i * step for i in range(n)]


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file; ``overrides`` (KEY=VALUE) fix keys and name the study."""
    path = Path(path)
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "expected a mapping with name, base, space, ...")
    unknown = next((k for k in raw if not isinstance(k, str)), None)  # YAML reads `on:` as True
    if unknown is not None:
        raise ConfigError(source, str(unknown), f"unknown key (expected one of {', '.join(SweepFile.model_fields)})")
    try:  # a section written as null (`sampler:`) takes its defaults
        doc = SweepFile.model_validate({k: v for k, v in raw.items() if v is not None or k not in SECTIONS})
    except ValidationError as err:
        raise _schema_error(err, source, SweepFile) from None
    base_ref = {"extends": doc.base} if isinstance(doc.base, str) else doc.base
    base = resolve_base(base_ref, path.parent, source, (path.resolve(),))
    notes = []
    parent_ref = doc.base if isinstance(doc.base, str) else doc.base.get("extends") \
        if isinstance(doc.base, dict) else None
    if isinstance(parent_ref, str):  # a spec as base: only its base is used (docs/sweeps.md)
        parent = read_yaml(path.parent / parent_ref)
        varied = lambda v: isinstance(v, dict) and bool(set(flatten(v)) - {"seed"})  # noqa: E731
        dropped = [k for k in ("grid", "variants", "zip") if isinstance(parent, dict) and
                   (varied(parent.get(k)) if k == "grid" else bool(parent.get(k)))]
        if dropped:
            notes.append(f"{source}: base {parent_ref} is a spec: its base is used, its {' and '.join(dropped)} "
                         f"{'are' if len(dropped) > 1 else 'is'} not (keys they set stay at the base's values unless fixed here or swept)")
    for key, value in flatten(doc.fixed or {}).items():
        set_dotted(base, key, value, source)
    raw_name = doc.name or path.stem
    name = check_name(str(raw_name) if type(raw_name) is int else raw_name, source)  # a file name
    for item in overrides or []:
        key, value = parse_override(item, f"{source} (--set)")
        set_dotted(base, key, value, f"{source} (--set)")
        name += f"__{key}={value}"
    base_cfg = validate(base, source)
    from abexp.data.common import has_validation
    from abexp.registry import DATASETS
    has_val = has_validation(base_cfg)
    judged_by = "loss" if DATASETS.get(base_cfg.data.name).lower_is_better else "acc"
    space = doc.space
    if not space:
        raise ConfigError(source, "space", "expected a mapping of dotted key -> parameter")
    for key, spec in space.items():
        check_param(source, key, spec, base)
    objective = doc.objective
    # selecting on the test set and reporting it is optimistic: a validation set, when the base
    # holds one out, is what a sweep optimises unless the file says otherwise
    metric = objective.metric or (f"val_{judged_by}" if has_val else f"test_{judged_by}")
    if metric.startswith("val_") and not has_val:
        raise ConfigError(source, "objective.metric", f"{metric} needs a validation set: set data.val_split "
                                                      "in the base or under fixed")
    direction = objective.direction or ("maximize" if metric.endswith("acc") else "minimize")
    diverged = objective.diverged_value
    if diverged is None:
        diverged = 0.0 if direction == "maximize" else 1e9
    sampler = raw.get("sampler") or {"name": "tpe"}  # as written: process_seed reads its seed
    if doc.sampler.name == "grid" and any(finite_values(s) is None for s in space.values()):
        raise ConfigError(source, "sampler.name", "grid needs categorical or stepped parameters (not on a log scale)")
    pruner = doc.pruner.name
    return Sweep(path, name, base, space, metric, objective.reduce, direction, float(diverged),
                 dict(sampler), pruner, doc.n_trials, doc.storage, notes, doc.max_consecutive_failures)


def objective_text(sweep: Sweep) -> str:
    """What the sweep optimises, in words: ``val_acc (best, maximize) on the validation set``."""
    where = "the validation set" if sweep.metric.startswith("val_") else \
        "the test set" if sweep.metric.startswith("test_") else "the training batches"
    return f"{sweep.metric} ({sweep.reduce}, {sweep.direction}) on {where}"
