"""One record per extension point: update rules, models, datasets, figures.

Every list abexp used to write by hand (the config's allowed names, the optimizer flag table,
the dataset if-chains, a figure's colours and chance line) is read from these registries. A
registry fills itself on first use: first its built-in entries (a provider module per wing,
named here as a string so this top-level module imports no wing), then the plugins
(abexp.plugins: entry points, ``--plugin``, ``ABEXP_PLUGINS``). Nothing is imported before a
command needs a name, so ``abexp --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

R = TypeVar("R")
ENV = "ABEXP_PLUGINS"  # comma-separated plugin modules; every process abexp starts inherits it
ENTRY_POINT_GROUP = "abexp.plugins"

HOW_TO_LOAD = ("load a plugin with --plugin MODULE, ABEXP_PLUGINS=MODULE[,MODULE] or an installed "
               "package's 'abexp.plugins' entry point (docs/extending.md)")


class UnknownName(LookupError):
    """A config names an entry no registry holds (abexp.config turns it into a ConfigError)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


class PluginError(Exception):
    """A plugin module that cannot be imported (or registers a bad entry): one line naming it."""


class Registry(Generic[R]):
    """Named records of one kind; ``get`` refuses an unknown name with the registered ones."""

    def __init__(self, kind: str, key: str, builtins: str):
        self.kind, self.key, self.builtins = kind, key, builtins
        self._records: dict[str, R] = {}
        self._filled = False

    def _fill(self) -> None:
        if not self._filled:
            load_plugins()

    def add(self, name: str, record: R, replace: bool = False) -> R:
        """Register ``record`` under ``name``; a second entry of one name is an error (two
        plugins claiming one name would silently change what a stored config means)."""
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ValueError(f"{self.kind} name must be a non-empty word, got {name!r}")
        if name in self._records and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._records[name] = record
        return record

    def remove(self, name: str) -> None:
        """Drop an entry (tests that register a throwaway one)."""
        self._records.pop(name, None)

    def names(self) -> list[str]:
        self._fill()
        return list(self._records)

    def items(self) -> Iterator[tuple[str, R]]:
        self._fill()
        return iter(list(self._records.items()))

    def __contains__(self, name: object) -> bool:
        self._fill()
        return name in self._records

    def find(self, name: str) -> Optional[R]:
        """The record, or None (figures drawing a table whose plugin is not loaded)."""
        self._fill()
        return self._records.get(name)

    def get(self, name: str) -> R:
        """The record; an unknown name raises UnknownName listing the registered ones."""
        self._fill()
        if name not in self._records:
            raise UnknownName(self.key, self.unknown(name))
        return self._records[name]

    def unknown(self, name: Any) -> str:
        return (f"unknown {self.kind} {name!r} (registered: {', '.join(self._records)}; "
                f"{HOW_TO_LOAD})")


# ---------------------------------------------------------------- the records

@dataclass(frozen=True)
class RuleRecord:
    """An update rule: the Mitigations flags (abexp.sim.optim) it switches on, the optim.* keys
    it reads beyond lr/momentum/weight decay (with their defaults), how figures draw it, and
    where its equations are documented. ``grad_transform`` (plugins): a function
    ``(g, w, w_fwd, taus, lr, state) -> None`` that rewrites the delayed gradient g in place
    before the momentum step; ``state`` is a dict of tensors saved in the checkpoint."""

    flags: frozenset[str] = frozenset()
    keys: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    color: str = "#7f7f7f"
    doc: str = "abexp/sim/optim.py"
    grad_transform: Optional[Callable[..., None]] = None


INPUT_KINDS = ("image", "image_folder", "tabular", "tokens")


@dataclass(frozen=True)
class ModelRecord:
    """A model: ``builder(cfg, info)`` -> torch.nn.Module (``info``: num_classes, input_shape,
    channels of the data), the input kinds it accepts, and ``stages(cfg, model, sizes,
    input_shape)`` -> (element ranges, stage map) cutting it into pipeline stages (None: the
    balanced contiguous cut of abexp.sim.pipeline.run_stages). ``batch_norm``: whether it has
    BN layers (eval.bn and the figures' wording)."""

    builder: Callable[..., Any]
    inputs: tuple[str, ...] = ("image",)
    stages: Optional[Callable[..., Any]] = None
    batch_norm: bool = True
    # ``max_stages(cfg)``: how many stages ``stages`` can cut, known from the config alone, so a
    # plan refuses more before any worker starts (None: the run finds out)
    max_stages: Optional[Callable[..., int]] = None


# task -> the metric its runs are judged by: classification by accuracy (test_acc, val_acc;
# higher is better), a language model by loss in nats per character (test_loss, val_loss;
# lower is better)
TASKS = {"classification": "accuracy", "language_model": "loss"}
LOWER_IS_BETTER = {"loss"}


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset: ``loader(cfg)`` -> ImageData or TensorData on the CPU, ``preflight(cfg)``
    (raise DataError before any worker starts; None: nothing to check), training examples of
    its full train split (an int, ``fn(cfg)``, or None: counted by loading it), its classes
    and task, its default root, and the kind of input it yields (INPUT_KINDS)."""

    loader: Callable[..., Any]
    classes: Optional[int] = 10
    train_examples: Any = None
    preflight: Optional[Callable[..., None]] = None
    task: str = "classification"
    default_root: Optional[str] = None
    input_kind: str = "image"
    validation: bool = False  # its loader returns its own validation split (val_x, val_y)

    @property
    def metric(self) -> str:
        return TASKS[self.task]

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    @property
    def chance(self) -> Optional[float]:
        """The accuracy of guessing: 1/classes for classification, else None (no chance line)."""
        return 1.0 / self.classes if self.task == "classification" and self.classes else None


@dataclass(frozen=True)
class FigureRecord:
    """A figure drawn by ``abexp figures`` for each experiment: ``module`` has
    ``main(argv)`` taking --table/--out/--experiment (abexp.figures.common.parser)."""

    module: str
    doc: str = ""


RULES: Registry[RuleRecord] = Registry("update rule", "optim.name", "abexp.sim.rules")
MODELS: Registry[ModelRecord] = Registry("model", "model.name", "abexp.train.catalog")
DATASETS: Registry[DatasetRecord] = Registry("dataset", "data.name", "abexp.data.catalog")
FIGURES: Registry[FigureRecord] = Registry("figure", "figure", "abexp.figures.catalog")


# ---------------------------------------------------------------- plugins

_loaded: dict[str, str] = {}  # plugin module -> where it was named (entry point, env, --plugin)


def requested_plugins() -> list[str]:
    """The plugin modules ABEXP_PLUGINS names (``--plugin`` adds to it), in order."""
    return [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]


def _entry_point_modules() -> list[str]:
    from importlib.metadata import entry_points

    return [ep.value.split(":", 1)[0].strip() for ep in entry_points(group=ENTRY_POINT_GROUP)]


def add_plugins(modules: list[str]) -> None:
    """Name more plugin modules for this process and every process it starts (``--plugin``);
    a registry already filled loads them now."""
    names = requested_plugins()
    os.environ[ENV] = ",".join(names + [m for m in modules if m not in names])
    if any(r._filled for r in (RULES, MODELS, DATASETS, FIGURES)):
        load_plugins()


def load_plugins() -> list[str]:
    """Import every plugin (entry points of installed packages, then ABEXP_PLUGINS) once; each
    registers its entries on import. Afterwards ABEXP_PLUGINS lists them all, so a child
    process (runner and sweep workers, SLURM jobs, torchrun ranks, async workers) loads the
    same set. A module that fails to import is a PluginError naming it."""
    for registry in (RULES, MODELS, DATASETS, FIGURES):  # built-ins first: a plugin may look them up
        if not registry._filled:
            registry._filled = True
            importlib.import_module(registry.builtins)
    wanted = [(m, "entry point") for m in _entry_point_modules()] + [(m, ENV) for m in requested_plugins()]
    for module, where in wanted:
        if module in _loaded:
            continue
        _loaded[module] = where
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 -- any failure of a user's module is one line
            del _loaded[module]
            raise PluginError(f"plugin {module!r} (from {where}) failed to import: "
                              f"{type(err).__name__}: {err}") from None
    if _loaded:
        os.environ[ENV] = ",".join(dict.fromkeys(requested_plugins() + list(_loaded)))
    return list(_loaded)


def plugin_versions() -> dict[str, Optional[str]]:
    """Each loaded plugin module and its version: its distribution's (installed packages),
    else the module's ``__version__``, else None."""
    import sys
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    dists = packages_distributions()
    out: dict[str, Optional[str]] = {}
    for module in _loaded:
        top = module.split(".")[0]
        found = None
        for dist in dists.get(top, []):
            try:
                found = version(dist)
                break
            except PackageNotFoundError:
                continue
        if found is None:
            found = getattr(sys.modules.get(module), "__version__", None)
        out[module] = None if found is None else str(found)
    return out
