"""The public API a plugin module uses to register its entries (``abexp.register_model``,
``abexp.register_dataset``, ``abexp.register_rule``). A config can only name what is
registered: it never runs code. How plugins are found and loaded: abexp.registry."""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import replace
from typing import Any, Callable, Optional

from abexp.registry import DATASETS, INPUT_KINDS, MODELS, RULES, TASKS, DatasetRecord, ModelRecord, RuleRecord

IN_MEMORY = ("image", "tabular", "tokens")
# colours for a plugin's rules that name none: distinct from the built-in ones, fixed per name
PALETTE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354", "#756bb1")


def _takes_two(fn: Callable) -> bool:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def register_model(name: str, *, inputs: tuple[str, ...] = IN_MEMORY, batch_norm: bool = False,
                   stages: Optional[Callable] = None) -> Callable:
    """Decorate ``fn(config) -> torch.nn.Module`` (or ``fn(config, data)``, ``data`` having
    num_classes, input_shape and channels) as model ``name``. ``inputs``: the data kinds it
    takes; ``batch_norm``: True if it has BN layers (checked when it is built); ``stages``:
    ``fn(cfg, model, sizes, input_shape) -> (ranges, stage_map)`` to cut it into pipeline
    stages (default: the balanced cut of contiguous parameter tensors)."""
    bad = [k for k in inputs if k not in INPUT_KINDS]
    if bad:
        raise ValueError(f"model {name!r}: unknown input kind {bad[0]!r} (kinds: {', '.join(INPUT_KINDS)})")

    def decorate(fn: Callable) -> Callable:
        builder = fn if _takes_two(fn) else (lambda cfg, info: fn(cfg))
        MODELS.add(name, ModelRecord(builder, tuple(inputs), stages, batch_norm))
        return fn
    return decorate


def register_dataset(name: str, *, classes: int, input_kind: str = "tabular",
                     train_examples: Optional[int] = None, preflight: Optional[Callable] = None,
                     default_root: Optional[str] = None, task: str = "classification") -> Callable:
    """Decorate ``fn(config) -> abexp.TensorData(x_train, y_train, x_test, y_test)`` as dataset
    ``name`` with ``classes`` classes. ``train_examples``: the train split's size, for planning
    without loading it (None: counted by loading it); ``preflight(config)``: raise
    abexp.data.common.DataError when its files are missing, before any worker starts."""
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"dataset {name!r}: unknown input kind {input_kind!r} (kinds: {', '.join(INPUT_KINDS)})")
    if task not in TASKS:
        raise ValueError(f"dataset {name!r}: unknown task {task!r} (tasks: {', '.join(TASKS)})")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"dataset {name!r}: classes must be an int >= 2, got {classes!r}")

    def decorate(fn: Callable) -> Callable:
        DATASETS.add(name, DatasetRecord(fn, classes, train_examples, preflight, task, default_root, input_kind))
        return fn
    return decorate


def register_rule(name: str, base: str = "sgdm", *, label: Optional[str] = None, color: Optional[str] = None,
                  keys: Optional[dict[str, Any]] = None, doc: str = "") -> Callable:
    """Register update rule ``name``: ``base``'s (a registered rule's) mitigations, label
    ``label`` and colour ``color`` in the figures. Used as a decorator, it also takes
    ``fn(g, w, w_fwd, taus, lr, state) -> None``, run on the delayed gradient ``g`` (in place)
    after base's gradient corrections and before its momentum/Adam step; ``state`` is a dict of
    tensors it may keep, saved in checkpoints. At delay 0 (w_fwd == w) it should leave g alone,
    so the rule reduces to ``base`` (tests/test_registry.py checks every registered rule)."""
    parent = RULES.get(base)
    if parent.grad_transform is not None:
        raise ValueError(f"rule {name!r}: base {base!r} has its own gradient function; base it on a built-in rule")
    picked = color or PALETTE[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(PALETTE)]
    record = RuleRecord(parent.flags, {**parent.keys, **(keys or {})}, label or name, picked,
                        doc or f"plugin rule on {base}")
    RULES.add(name, record)

    def decorate(fn: Callable) -> Callable:
        RULES.add(name, replace(record, grad_transform=fn), replace=True)
        return fn
    return decorate
