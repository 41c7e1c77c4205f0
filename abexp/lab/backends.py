"""Launch backends: where the workers of ``abexp run`` start (this machine, a SLURM array, ...).

A backend is one object with a ``name`` and two steps. ``check(launch)`` runs after the shared
preflight (abexp.lab.preflight) and before anything is printed, written or submitted: bad input
raises ``ConfigError`` naming the flag (one line, exit 2). ``launch(launch)`` then starts the
workers and returns the command's exit code. Every backend's workers run the same worker loop
(``python -m abexp.lab.runner``), so runs are claimed exactly once whichever started them.

Backends are looked up by name in ``BACKENDS``; ``register_backend`` (``abexp.register_backend``
in a plugin) adds one. An entry names its factory as ``"module:attribute"``, imported on first
use, so ``abexp --help`` stays fast; a name not built in loads the plugins (abexp.registry) and
looks again, so a plugin's backend is found by ``abexp run --backend NAME`` like a built-in one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from abexp.config import ConfigError

if TYPE_CHECKING:
    from abexp.lab.spec import PlannedRun


@dataclass
class Launch:
    """What ``abexp run`` asks a backend to run: a spec's checked plan and the launch flags."""
    spec_path: str
    results: str
    plan: list[PlannedRun]
    overrides: list[str] = field(default_factory=list)  # --set KEY=VALUE, passed on to every worker
    workers: int | None = None       # local: worker processes (default: one per GPU slot, or 1)
    gpus: list[str] | None = None    # local: --gpus, as torch numbers the visible GPUs
    runs_per_gpu: int = 1
    gpus_per_run: int = 1            # processes (GPUs) per run: torchrun inside a worker
    pack: int = 1                    # compatible runs trained together in one process
    progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # the backend's own flags (slurm: array, partition, ...)


class LaunchBackend(Protocol):
    """One way of starting workers."""
    name: str

    def check(self, launch: Launch) -> None:
        """Refuse what this backend cannot run (ConfigError naming the flag); write nothing."""

    def launch(self, launch: Launch) -> int:
        """Start the workers (or submit them); the command's exit code."""


# name -> "module:attribute" of a zero-argument factory (a backend class), imported on first
# use: ``abexp --help`` stays fast, and the backends' modules may import this one
BACKENDS: dict[str, str | Callable[[], LaunchBackend]] = {
    "local": "abexp.lab.local:LocalBackend",
    "slurm": "abexp.lab.slurm:SlurmBackend",
}


def register_backend(name: str, factory: str | Callable[[], LaunchBackend]) -> None:
    """Make ``abexp run --backend NAME`` start workers through ``factory()``'s backend
    (a callable, or ``"module:attribute"`` naming one)."""
    if name in BACKENDS:
        raise ValueError(f"launch backend {name!r} is already registered")
    BACKENDS[name] = factory


def get_backend(name: str) -> LaunchBackend:
    """The backend registered as ``name``; an unknown one is one line naming the flag."""
    if name not in BACKENDS:
        from abexp.registry import load_plugins
        load_plugins()  # a plugin's backend registers itself on import
    if name not in BACKENDS:
        from abexp.registry import HOW_TO_LOAD
        raise ConfigError("--backend", "", f"{name!r}: no such launch backend (registered: {', '.join(BACKENDS)}; "
                          f"{HOW_TO_LOAD})")
    factory = BACKENDS[name]
    if isinstance(factory, str):
        import importlib

        module, attribute = factory.split(":")
        factory = getattr(importlib.import_module(module), attribute)
    return factory()
