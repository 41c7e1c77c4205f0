"""``abexp.DelayedOptimizer``: the delay engine in torch.optim's shape, for a researcher's own loop.

A thin adapter over ``abexp.sim.engine`` (``FlatParams`` + ``DelayedSGD``), so a user's loop
trains with exactly the update rules and delay models ``abexp run`` uses::

    opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

The engine's step is split at the gradient: ``begin`` (store this step's forward weights, pick
the stale ones) runs at the end of the previous ``step()`` (and at construction), and copies
the stale weights into the model, so the user's forward and backward pass see them; ``step()``
then applies the gradient (``finish``) and begins the next step. So after ``step()`` the model
holds the weights the *next* gradient is taken at; ``current_weights()`` swaps the latest in.

The lr is each step's ``param_groups[*]['lr']`` when ``step()`` is called (schedulers set it);
the other hyperparameters live in the groups too, one value for all groups (the engine updates
one flat vector); only ``delay`` may differ per group, each group then being a pipeline stage.
Rules ``muon`` and ``ab_muon`` update every 2-D parameter with Muon and the rest with AdamW, as
torch.optim.Muon's own recipe; a group with ``"muon": False`` (embeddings, the output layer)
goes to AdamW. That split is read at construction.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator

import torch

from abexp.config import ConfigError, OptimCfg, validate
from abexp.registry import RULES
from abexp.sim.engine import DelayedSGD, FlatParams
from abexp.sim.optim import mitigations
from abexp.train.backward_weights import backward_weights

_SOURCE = "abexp.DelayedOptimizer"
_ALWAYS = ("weight_decay", "weight_decay_on")
# read once when the engine is built (buffers, look-aheads, thresholds): fixed afterwards
_FIXED = frozenset({"lwp_horizon", "lwp_lookahead", "tau_c", "drop_above", "ab_cosine", "dc_adaptive"})


def rule_options(name: str) -> tuple[str, ...]:
    """The keyword options (besides lr and delay) that rule ``name`` reads."""
    rules = mitigations(name)
    keys = ["betas", "eps"] if rules.adam or rules.muon else ["momentum", "nesterov"]
    keys += _ALWAYS
    keys += [k for k in RULES.get(name).keys if k not in keys]  # the rule's record
    return tuple(keys)


class _ParamList:
    """Parameters with the ``parameters()`` FlatParams asks a model for, in group order."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self._params = params

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(self._params)


def _delay_mapping(delay: Any, groups: list[dict]) -> dict:
    """The ``delay:`` mapping: an int D is a constant delay; per-group ``delay`` keys are the
    stage delays of a pipeline whose stages are the groups."""
    per_group = [g["delay"] for g in groups if "delay" in g]
    if isinstance(delay, bool) or not isinstance(delay, (int, Mapping)) and delay is not None:
        raise ValueError(f"{_SOURCE}: delay must be a number of steps or a delay mapping, got {delay!r}")
    if isinstance(delay, int):
        if delay < 0:
            raise ValueError(f"{_SOURCE}: delay must be >= 0, got {delay}")
        mapping = {"kind": "constant", "steps": delay} if not per_group else {}
        if per_group and delay:
            raise ValueError(f"{_SOURCE}: give delay={delay} or per-group 'delay' keys, not both")
    else:
        mapping = dict(delay or {})
    if per_group:
        if len(per_group) != len(groups):
            raise ValueError(f"{_SOURCE}: {len(per_group)} of {len(groups)} param groups give a 'delay': "
                             "all or none (each group is a pipeline stage)")
        if mapping.get("kind", "pipeline") != "pipeline" or "stage_delays" in mapping:
            raise ValueError(f"{_SOURCE}: per-group 'delay' keys are pipeline stage delays: the delay "
                             "mapping may only add pipeline keys (kind: pipeline, stashing, ...)")
        if any(isinstance(d, bool) or not isinstance(d, int) for d in per_group):
            raise ValueError(f"{_SOURCE}: a param group's 'delay' must be an int, got {per_group}")
        mapping.update(kind="pipeline", stage_delays=per_group)
    if mapping.get("kind") == "async":
        raise ValueError(f"{_SOURCE}: delay kind async needs abexp's parameter server and worker "
                         "processes (abexp run); in your own loop use constant, uniform, geometric, "
                         "trace or pipeline")
    return mapping


class DelayedOptimizer(torch.optim.Optimizer):
    """torch.optim-style optimizer that trains under a simulated gradient delay with any of
    abexp's update rules (docs/api.md). ``delay``: an int D (constant) or a ``delay:`` mapping
    (configuration.md); ``options``: the rule's keys of the ``optim:`` section (momentum,
    weight_decay, nesterov, rho, betas, ...), defaults as there."""

    def __init__(self, params: Iterable, name: str = "sgdm", *, lr: float, delay: int | dict | None = 0,
                 **options: Any):
        if name not in RULES:
            raise ValueError(f"{_SOURCE}: {RULES.unknown(name)}")
        lr = float(lr)
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"{_SOURCE}: lr must be a finite number >= 0, got {lr}")
        keys = rule_options(name)
        if mitigations(name).muon and "muon_params" in options:
            raise ValueError(f"{_SOURCE}: muon_params needs the model (abexp run); here Muon updates the "
                             "2-D parameters of every param group without 'muon': False")
        stray = [k for k in options if k not in keys]
        if stray:
            raise ValueError(f"{_SOURCE}: option {stray[0]!r} is not read by rule {name!r} (its options: "
                             f"lr, delay, {', '.join(keys)})")
        if "betas" in options:  # torch spells them as a tuple
            options["betas"] = [float(b) for b in options["betas"]]
        self._building = True
        super().__init__(params, {"lr": lr, **options})
        self._building = False
        groups = self.param_groups
        try:
            cfg = validate({"optim": {"name": name, **options},
                            "delay": _delay_mapping(delay, groups)}, _SOURCE)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        self.rule, self.delay_cfg = cfg.optim, cfg.delay
        self._keys = keys
        for key in keys:  # the rule's defaults, visible (and schedulable) in every group
            self.defaults.setdefault(key, getattr(self.rule, key))
            for g in groups:
                g.setdefault(key, getattr(self.rule, key))
        self._applied = self._group_options()
        params = [p for g in groups for p in g["params"]]
        if any(not p.requires_grad for p in params):
            raise ValueError(f"{_SOURCE}: every parameter must require grad (pass only the trained ones)")
        if len({(p.device, p.dtype) for p in params}) > 1:
            raise ValueError(f"{_SOURCE}: all parameters must share one device and dtype (one flat vector)")
        self._flat = FlatParams(_ParamList(params))
        self._grad_views = [p.grad for p in params]
        self._scratch = torch.empty_like(self._flat.grad)  # the gradient the rule consumes
        self._ptrs = [p.data_ptr() for p in params]
        ranges = self._stage_ranges(groups)
        self.engine = DelayedSGD(self._flat.data, self._flat.sizes, self.rule, self.delay_cfg, 0, ranges,
                                 self._muon_matrices(name, groups))
        self._backward_seen = False
        self._begin(lr)

    # ------------------------------------------------------------------ construction
    def _stage_ranges(self, groups: list[dict]) -> list[tuple[int, int]] | None:
        """A pipeline's stages: the param groups' element ranges, or with one group the engine's
        cut by parameter count (what ``abexp run`` does with stage_balance: params)."""
        if self.delay_cfg.kind != "pipeline":
            return None
        from abexp.sim.pipeline import stage_delays
        stages = len(stage_delays(self.delay_cfg))
        if len(groups) == 1 and stages > 1:
            if self.delay_cfg.stage_balance != "params":
                raise ValueError(f"{_SOURCE}: delay.stage_balance {self.delay_cfg.stage_balance!r} needs "
                                 "the model; give the stages as param groups instead")
            return None
        if len(groups) != stages:
            raise ValueError(f"{_SOURCE}: {stages} pipeline stages but {len(groups)} param groups "
                             "(give one group per stage, or one group to cut by parameter count)")
        ranges, start = [], 0
        for g in groups:
            n = sum(p.numel() for p in g["params"])
            ranges.append((start, start + n))
            start += n
        return ranges

    @staticmethod
    def _muon_matrices(name: str, groups: list[dict]) -> list[tuple[int, int] | None] | None:
        """The muon rules: each parameter's shape where Muon updates it (2-D, its group without
        'muon': False), None where AdamW does."""
        flags = [g.get("muon", True) for g in groups]
        if any(not isinstance(f, bool) for f in flags):
            raise ValueError(f"{_SOURCE}: a param group's 'muon' must be True or False, got {flags}")
        if not mitigations(name).muon:
            if any("muon" in g for g in groups):
                muon_rules = [n for n, r in RULES.items() if "muon" in r.flags]
                raise ValueError(f"{_SOURCE}: a param group's 'muon' is read only by rules "
                                 f"{', '.join(muon_rules)}, not {name!r}")
            return None
        matrices = [tuple(p.shape) if p.ndim == 2 and f else None
                    for g, f in zip(groups, flags) for p in g["params"]]
        if all(m is None for m in matrices):
            raise ValueError(f"{_SOURCE}: rule {name!r} found no 2-D parameter for Muon (groups with "
                             "'muon': False go to AdamW)")
        return matrices

    def add_param_group(self, param_group: dict) -> None:
        """Only while constructing: the parameters are one flat buffer, fixed afterwards."""
        if not getattr(self, "_building", False):
            raise RuntimeError(f"{_SOURCE}: parameters are fixed at construction (one flat buffer); "
                               "build a new optimizer to add some")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ the step
    def _group_options(self) -> dict[str, Any]:
        """The hyperparameters in the groups: one value each (only 'delay' may differ)."""
        first = self.param_groups[0]
        values = {k: first[k] for k in ("lr",) + self._keys}
        for g in self.param_groups[1:]:
            for k, v in values.items():
                if g[k] != v:
                    raise ValueError(f"{_SOURCE}: param groups differ in {k!r} ({v!r} vs {g[k]!r}); "
                                     "the delay engine applies one value to all parameters (only "
                                     "'delay' may differ per group)")
        return values

    def _sync_options(self) -> float:
        """This step's lr, after copying hyperparameters a scheduler (or the user) changed into
        the rule the engine reads."""
        values = self._group_options()
        for k, v in values.items():
            if k == "lr" or v == self._applied[k]:
                continue
            if k in _FIXED:
                raise ValueError(f"{_SOURCE}: {k!r} is fixed at construction (the engine sized its "
                                 "state by it)")
            try:
                setattr(self.rule, k, [float(b) for b in v] if k == "betas" else v)
            except Exception as err:  # pydantic's ValidationError: one line naming the key
                raise ValueError(f"{_SOURCE}: param group {k!r} = {v!r}: {err.errors()[0]['msg']}"
                                 if hasattr(err, "errors") else f"{_SOURCE}: {k!r}: {err}") from None
        self._applied = values
        return float(values["lr"])

    def _collect_grads(self) -> None:
        """Make sure the flat gradient holds every parameter's .grad: a grad set to None (e.g.
        ``model.zero_grad()``) or replaced is copied back into the flat buffer (None: zero)."""
        for p, view, ptr in zip(self._flat.params, self._grad_views, self._ptrs):
            if p.data_ptr() != ptr:
                raise RuntimeError(f"{_SOURCE}: a parameter's storage was replaced after construction "
                                   "(model.to(), or an assignment to .data); build the optimizer after it")
            if p.grad is view:
                continue
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
            p.grad = view

    def _begin(self, lr: float) -> None:
        """Begin the next step: store its forward weights, put its stale weights in the model."""
        self._taus, self._w_fwd = self.engine.begin(lr)
        self._begin_lr = lr
        self._flat.data.copy_(self._w_fwd)
        self._backward_seen = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the gradient in the parameters' .grad (taken at the stale weights the model
        holds), then put the next step's stale weights into the model."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.engine.w_bwd is not None and not self._backward_seen:
            raise RuntimeError(f"{_SOURCE}: delay.stashing is false: run the forward and backward pass "
                               "inside `with opt.backward_weights():` (docs/api.md)")
        lr = self._sync_options()
        self._collect_grads()
        engine = self.engine
        if engine.optimizer.rules.lwp and lr != self._begin_lr:
            # weight prediction looks ahead by this step's lr, known only now (a scheduler sets it
            # after the previous step()): store this step's forward weights with it
            engine.optimizer.store_forward_weights(engine.w, lr, out=engine.history.slot(engine.t))
        self._scratch.copy_(self._flat.grad)  # the rule consumes its gradient; .grad stays intact
        engine.finish(self._scratch, self._w_fwd, self._taus, lr)
        self._begin(lr)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place (they are views into one flat buffer, never freed)."""
        for p, view in zip(self._flat.params, self._grad_views):
            p.grad = view
        self._flat.grad.zero_()

    # ------------------------------------------------------------------ weights
    @contextlib.contextmanager
    def current_weights(self) -> Iterator[None]:
        """Within the block the model holds the current (latest) weights, to evaluate or save;
        after it, the stale weights of the next step again. Changes made inside are discarded."""
        self._flat.data.copy_(self.engine.w)
        try:
            yield
        finally:
            self._flat.data.copy_(self._w_fwd)

    @contextlib.contextmanager
    def backward_weights(self) -> Iterator[None]:
        """Needed around forward + backward with ``delay.stashing: false``: the backward pass sees
        each stage's backward weights (abexp.train.backward_weights); elsewhere a no-op."""
        if self.engine.w_bwd is None:
            yield
            return
        with backward_weights(self._flat.data, self.engine.w_bwd):
            yield
        self._backward_seen = True

    @property
    def staleness(self) -> list[int]:
        """The staleness of the gradient the model's current weights will give, per stage."""
        return list(self._taus)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's groups plus the engine: step count, current weights, weight history, the
        rule's state and the delay model (its draws are a function of seed and step), copied."""
        state = super().state_dict()
        engine = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.engine.state_dict().items()}
        engine["optimizer"] = {k: (v.clone() if torch.is_tensor(v) else v)
                               for k, v in engine["optimizer"].items()}
        state["abexp"] = {"engine": engine, "begin_lr": self._begin_lr, "rule": self._identity(),
                          "delay": self.delay_cfg.model_dump()}
        return state

    def _identity(self) -> dict[str, Any]:
        return {"name": self.rule.name, **{k: getattr(self.rule, k) for k in sorted(_FIXED)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume bitwise: the next step is the one the saved optimizer would have taken."""
        extra = state_dict.get("abexp")
        if extra is None:
            raise ValueError(f"{_SOURCE}: not a DelayedOptimizer state dict (no 'abexp' entry)")
        # a key absent from an older state dict had its default then (lwp_lookahead, dc_adaptive)
        saved_rule = {**{k: getattr(OptimCfg(), k) for k in _FIXED}, **extra["rule"]}
        if saved_rule != self._identity() or extra["delay"] != self.delay_cfg.model_dump():
            raise ValueError(f"{_SOURCE}: the state is of rule {extra['rule']} with delay {extra['delay']}, "
                             f"this optimizer is {self._identity()} with {self.delay_cfg.model_dump()}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "abexp"})
        self.engine.load_state_dict(extra["engine"])
        # the groups came back with the saved hyperparameters: copy them into the rule
        self._applied = {k: None if k == "lr" else getattr(self.rule, k) for k in self._applied}
        self._sync_options()
        self._begin(float(extra["begin_lr"]))  # the saved step's begin, again: same forward weights
