"""Typed, locked run configuration: defaults, YAML loading, dotted overrides, validation.

Every knob of a run lives here with its default (docs/science.md §2: the He et al. ResNet-20 CIFAR-10
recipe). Unknown keys are errors, so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator



class ConfigError(Exception):
    """Bad user input: ``source: dotted.key: message``. The CLI turns it into exit code 2."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


class _Locked(BaseModel):
    # nan and inf are refused everywhere: a .inf learning rate is a typo, not an experiment.
    # Strict types: `nesterov: "yes"` or `epochs: "10"` is refused, never coerced (an integer
    # is still accepted where a float is expected: `lr: 1`).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, strict=True)


class ModelCfg(_Locked):
    name: str = "resnet20"  # a registered model (abexp.registry.MODELS), checked by validate()
    zero_init_residual: bool = False  # zero-init the last BN of each block (torchvision models)
    # gpt (abexp/train/gpt.py): transformer blocks, residual width (a multiple of heads), heads;
    # its context is data.context. Other models ignore them.
    layers: int = Field(4, ge=1)
    width: int = Field(128, ge=1)
    heads: int = Field(4, ge=1)


class DataCfg(_Locked):
    name: str = "cifar10"  # a registered dataset (abexp.registry.DATASETS), checked by validate()
    # cifar10: folder holding cifar-10-batches-py (default data/cifar10); imagenet: train/ val/
    # (default data/imagenet); fashion_mnist, mnist: the four IDX files (.gz or not; default: the
    # Debian package's /usr/share/datasets/fashion-mnist where installed, else data/<name>)
    root: Optional[str] = None
    download: bool = False  # cifar10, fashion_mnist, mnist: fetch the official files when absent
    subset: Optional[int] = Field(None, ge=1)  # train on the first N examples of a fixed shuffle
    test_subset: Optional[int] = Field(None, ge=1)
    augment: bool = True  # random crop + horizontal flip, batched on the device
    crop_pad: Optional[int] = Field(None, ge=0)  # None: the dataset's (4 for 32x32, 2 for 28x28)
    flip: Optional[bool] = None  # None: the dataset's (no flips for MNIST digits)
    split_seed: int = 0  # digits: the fixed train/test split; every dataset: the validation split
    # hold out this fraction of the training set (after data.subset) as a validation set, drawn
    # from data.split_seed alone (never the run seed): every run of a study holds out the same
    # examples and trains on the rest. None or 0: no validation set (the behaviour before it existed)
    val_split: Optional[float] = Field(None, ge=0.0, lt=1.0)
    synthetic_size: int = Field(50000, ge=1)  # synthetic: training examples (test: a fifth)
    context: int = Field(128, ge=1)  # token data (shakespeare): characters per window
    workers: int = Field(8, ge=0)  # imagenet DataLoader workers
    image_size: int = Field(224, ge=8)  # imagenet crop size

    @field_validator("val_split")
    @classmethod
    def _no_split_is_none(cls, v: Optional[float]) -> Optional[float]:
        return None if v == 0 else v  # 0 and None are one config, hence one run id


class TrainCfg(_Locked):
    epochs: int = Field(160, ge=1)
    batch_size: int = Field(128, ge=1)
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    divergence_check_every: int = Field(50, ge=1)  # steps between (synchronising) NaN checks
    micro_batches: int = Field(1, ge=1)  # split each (per-process) batch; gradients averaged
    channels_last: bool = False  # NHWC convolution weights and activations
    compile: bool = False  # torch.compile the training forward/backward (first step compiles)
    # CUDA: deterministic cuDNN/cuBLAS algorithms, so resume and repeated runs are bitwise (the
    # CPU is deterministic anyway); the price is measured by make gpu-check (docs/gpu.md)
    deterministic: bool = True


class OptimCfg(_Locked):
    name: str = "sgdm"  # a registered update rule (abexp.registry.RULES), checked by validate()
    lr: float = Field(0.1, gt=0.0)  # at batch 128; no automatic scaling
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0.0)
    weight_decay_on: Literal["current", "stale"] = "current"  # which weights λ·w uses
    rho: float = Field(1.0, ge=0.0)  # AB braking strength
    ab_cosine: Literal["tensor", "global"] = "tensor"  # AB: cosine per parameter tensor or one
    dc_lambda: float = Field(0.04, ge=0.0)  # DC-ASGD variance-control strength (lambda_0 when adaptive)
    # DC-ASGD-a: lambda_0 / sqrt(MeanSquare(g)), MeanSquare an EMA (0.95) of g^2 per element
    dc_adaptive: bool = False
    lwp_horizon: Optional[float] = Field(None, ge=0.0)  # LWP look-ahead; None = expected delay
    # LWP's prediction w - lr * H * v: H = the horizon D (linear), or (m - m^(D+1)) / (1 - m),
    # the distance momentum alone carries the weights in D steps (momentum; FTPipe's msnag)
    lwp_lookahead: Literal["linear", "momentum"] = "linear"
    # delay_adaptive: lr * M / max(M, tau), M = max(1, tau_c); None = the expected delay
    tau_c: Optional[float] = Field(None, ge=0.0)
    # drop_stale: an update whose gradient is staler than this is discarded; None = 2 E[tau]
    drop_above: Optional[float] = Field(None, ge=0.0)
    gap_gamma: float = Field(0.999, gt=0.0, lt=1.0)  # gap_aware: decay of the EMA of v^2 (FTPipe's)
    gap_eps: float = Field(1e-8, gt=0.0)  # gap_aware: added to RMS(v) (FTPipe's)
    # pipemare_lr: lr * max(1, tau)^-p_k, p_k = max(0, 1 - k / K) over the first K updates
    pipemare_anneal_steps: int = Field(1000, ge=0)
    # pipemare (rescheduling + discrepancy correction): the backward weights of stage s are
    # moved back by (D_s - b_s) * delta, delta an EMA of the per-step weight change with this decay
    pipemare_gamma: float = Field(0.9, ge=0.0, lt=1.0)
    adl_steps: int = Field(4, ge=1)  # adl, ab_adl: gradients accumulated into one update
    betas: list[float] = [0.9, 0.999]  # adam family: the moments' decay rates
    eps: float = Field(1e-8, gt=0.0)  # adam family: added to the root of the second moment
    # muon, ab_muon (abexp/sim/muon.py): which tensors get Muon — hidden: the 2-D weights except
    # embeddings and the output layer (the usual recipe); all_2d: every 2-D weight. The rest: AdamW
    muon_params: Literal["hidden", "all_2d"] = "hidden"
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)  # Muon's momentum (torch.optim.Muon's default)
    muon_nesterov: bool = True
    muon_ns_steps: int = Field(5, ge=0, lt=100)  # Newton–Schulz iterations
    # Muon's lr per matrix A x B: lr * sqrt(max(1, A/B)) (original) or lr * 0.2 sqrt(max(A, B))
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "original"
    muon_lr_scale: float = Field(1.0, gt=0.0)  # Muon's lr = lr * this (AdamW's: lr)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or any(not 0.0 <= b < 1.0 for b in v):
            raise ValueError("betas must be two numbers in [0, 1)")
        return v


class ScheduleCfg(_Locked):
    name: Literal["constant", "multistep", "cosine"] = "multistep"
    milestones: list[float] = [0.5, 0.75]  # fractions of training
    gamma: float = Field(0.1, gt=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)  # linear warmup from 0
    # one factor per epoch multiplying the named schedule's lr (a hand-made schedule: e.g. AB's mean
    # brake per epoch given to SGDM, to ask whether AB is more than an lr schedule); None: all 1
    epoch_factors: Optional[list[float]] = None

    @field_validator("epoch_factors")
    @classmethod
    def _positive(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and (not v or any(not (f > 0.0 and math.isfinite(f)) for f in v)):
            raise ValueError("epoch_factors must be a non-empty list of positive finite numbers")
        return v

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in v) or v != sorted(v):
            raise ValueError("milestones must be increasing fractions in (0, 1)")
        return v


class DelayCfg(_Locked):
    kind: Literal["constant", "uniform", "geometric", "pipeline", "trace", "async"] = "constant"
    # constant: D; uniform/geometric: the cap D_max; pipeline: caps the profile (0 = no cap);
    # trace: the buffer (0 = the largest delay in the trace or histogram)
    steps: int = Field(0, ge=0)
    mean: Optional[float] = Field(None, ge=0.0)  # geometric: mean delay before the cap
    seed: Optional[int] = None  # delay draws; None = the run seed
    stages: Optional[int] = Field(None, ge=1)  # pipeline: S stages, delays 2(S-1-s)
    stage_delays: Optional[list[int]] = None  # pipeline: explicit per-stage delays (length S)
    stage_balance: Literal["params", "flops"] = "params"  # pipeline: what the stage cut balances
    # pipeline: per-stage delays 2(S-1-s), or "flat": every stage at the first stage's 2(S-1),
    # i.e. a constant delay on the same stage layout (the comparison for a pipeline study)
    stage_profile: Literal["pipeline", "flat"] = "pipeline"
    # pipeline: true = weight stashing (a stage's backward pass sees its forward pass's weights);
    # false = Pipelined Backpropagation without stashing: the backward pass sees the stage's
    # weights of step t - b_s (b_s = 0, the current weights, unless stage_backward_delays)
    stashing: bool = True
    stage_backward_delays: Optional[list[int]] = None  # pipeline, stashing false: b_s per stage
    trace: Optional[str] = None  # trace: file of one delay per line, replayed and cycled
    histogram: Optional[dict[int, float]] = None  # trace: {delay: weight}, drawn per step, seeded
    # async: a real parameter server with N worker processes (abexp.train.async_ps); the
    # staleness is what they produce, recorded in the run folder's trace.txt
    workers: Optional[int] = Field(None, ge=1)
    order: Literal["arrival", "fifo"] = "arrival"  # fifo: gradient j is update j (= constant N-1)
    slowdown: Optional[list[float]] = None  # async: per worker, time per gradient x this (>= 1)
    pause_prob: float = Field(0.0, ge=0.0, le=1.0)  # async: chance a gradient is followed by a pause
    pause_s: float = Field(0.0, ge=0.0)  # async: mean pause (exponential), seconds
    worker_timeout_s: float = Field(600.0, gt=0.0)  # async: no gradient for this long = a hung worker

    @field_validator("stage_delays", "stage_backward_delays")
    @classmethod
    def _non_negative(cls, v: Optional[list[int]]) -> Optional[list[int]]:
        if v is not None and (not v or any(d < 0 for d in v)):
            raise ValueError("must be a non-empty list of non-negative integers")
        return v

    @field_validator("histogram")
    @classmethod
    def _weights(cls, v: Optional[dict[int, float]]) -> Optional[dict[int, float]]:
        if v is not None and (not v or any(k < 0 for k in v) or any(not w >= 0 for w in v.values())
                              or sum(v.values()) <= 0):
            raise ValueError("must map non-negative delays to non-negative weights, not all zero")
        return v


class EvalCfg(_Locked):
    bn: Literal["running", "recalibrate"] = "running"
    recal_batches: int = Field(10, ge=1)  # training batches used to recompute BN statistics
    batch_size: int = Field(1000, ge=1)


class WandbCfg(_Locked):
    mode: Literal["auto", "online", "offline", "disabled"] = "disabled"
    project: str = "abexp"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = []


class TrackingCfg(_Locked):
    wandb: WandbCfg = WandbCfg()


class RunConfig(_Locked):
    seed: int = 0
    experiment: str = ""  # the spec's name; set by the runner
    variant: str = ""  # the spec variant this run came from (a label for figures)
    model: ModelCfg = ModelCfg()
    data: DataCfg = DataCfg()
    train: TrainCfg = TrainCfg()
    optim: OptimCfg = OptimCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    delay: DelayCfg = DelayCfg()
    eval: EvalCfg = EvalCfg()
    tracking: TrackingCfg = TrackingCfg()


# Keys that do not change what is computed (labels, logging, where the data lives):
# excluded from the run id, so the same run on another machine has the same id.
NON_IDENTITY_KEYS = ("tracking", "experiment", "variant", "data.root", "data.download",
                     "data.workers", "eval.batch_size", "delay.worker_timeout_s")

# Keys added to the schema after run ids were first issued, each with the value that reproduces
# the behaviour from before it existed. At that value a key is left out of the run id, so a new
# option does not re-identify (and so re-run) every stored run. Register every key added from
# now on here; the keys that existed on 2026-11-24 are all part of the id.
ADDED_KEYS: dict[str, Any] = {"data.crop_pad": None, "data.flip": None, "data.val_split": None,
                              "optim.lwp_lookahead": "linear", "optim.dc_adaptive": False,
                              "optim.betas": [0.9, 0.999], "optim.eps": 1e-8,
                              "delay.stages": None, "delay.stage_delays": None,
                              "delay.stage_balance": "params", "delay.stage_profile": "pipeline",
                              "delay.stashing": True, "delay.stage_backward_delays": None,
                              "delay.trace": None,
                              "delay.histogram": None,
                              "delay.workers": None, "delay.order": "arrival", "delay.slowdown": None,
                              "delay.pause_prob": 0.0, "delay.pause_s": 0.0,
                              "optim.tau_c": None, "optim.gap_gamma": 0.999, "optim.gap_eps": 1e-8,
                              "optim.pipemare_anneal_steps": 1000, "optim.adl_steps": 4,
                              "optim.pipemare_gamma": 0.9, "optim.drop_above": None,
                              "optim.muon_params": "hidden", "optim.muon_momentum": 0.95,
                              "optim.muon_nesterov": True, "optim.muon_ns_steps": 5,
                              "optim.muon_adjust_lr": "original", "optim.muon_lr_scale": 1.0,
                              "model.layers": 4, "model.width": 128, "model.heads": 4,
                              "data.context": 128,  # read by token models and data alone
                              # every stored run trained on the CPU, where this changes nothing
                              "train.deterministic": True, "schedule.epoch_factors": None}


def defaults() -> dict[str, Any]:
    return RunConfig().model_dump()


def set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    """Set ``a.b.c = value`` in a nested dict; unknown intermediate keys are errors later."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(source, ".".join(parts[: i + 1]), "is not a section")
        node = child
    node[parts[-1]] = value


def get_dotted(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        node = node[part]
    return node


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float, as YAML 1.2 does (PyYAML's YAML 1.1 rules
    want a dot, ``1.0e-4``, and would hand the strict config a string)."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class _UniqueKeyLoader(_ConfigLoader):
    """Refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """Safe-load a YAML file; any failure is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), "", f"cannot read: {err.strerror or err}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except DuplicateKey as err:
        raise ConfigError(str(path), str(err.key), f"given twice (line {err.line}); "
                                                    "YAML would silently keep the last") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(str(path), "", f"invalid YAML: {where}{problem}") from None


def read_locked_mapping(path: Path, allowed: set[str], what: str) -> dict:
    """A YAML file holding a mapping whose top-level keys must all be in ``allowed``."""
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise ConfigError(str(path), "", f"expected a mapping with {what}")
    unknown = sorted((str(k) for k in set(doc) - allowed), key=str)  # YAML reads `on:` as True
    if unknown:
        import difflib
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"expected one of {sorted(allowed)}"
        raise ConfigError(str(path), unknown[0], f"unknown key ({hint})")
    return doc


def parse_override(item: str, source: str = "--set") -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (so 0.1 is a float, [1, 2] a list)."""
    if "=" not in item:
        raise ConfigError(source, item, "expected KEY=VALUE")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.load(raw, Loader=_ConfigLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError:
        raise ConfigError(source, key.strip(), f"cannot parse value {raw!r}") from None


def unknown_key_message(loc: tuple, root: type[BaseModel] | None = None) -> str:
    """``unknown key (did you mean optim.nesterov?)``: the closest keys of the same section of
    ``root`` (a run config unless said; a sweep file's schema in abexp.lab.sweep_file)."""
    import difflib

    model: type[BaseModel] = root or RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return "unknown key"
        model = field.annotation
    prefix = "".join(f"{p}." for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=2, cutoff=0.6)
    hint = " or ".join(prefix + c for c in close)
    return f"unknown key (did you mean {hint}?)" if close else \
        f"unknown key (expected one of {', '.join(prefix + k for k in model.model_fields)})"


def config_error(err: ValidationError, source: str, root: type[BaseModel] | None = None,
                 prefix: str = "") -> ConfigError:
    """A strict model's first validation error as one line naming the file and the dotted key
    (``prefix`` + the error's location in ``root``, a run config unless said)."""
    first = err.errors()[0]
    loc = first["loc"]
    key = prefix + ".".join(str(p) for p in loc)
    msg = unknown_key_message(loc, root) if first["type"] == "extra_forbidden" else first["msg"]
    if "input" in first and first["type"] != "extra_forbidden":
        msg += f" (got {first['input']!r})"
    return ConfigError(source, key, msg)


def validate(raw: dict, source: str, check_names: bool = True) -> RunConfig:
    """Validate a full nested dict; raise ConfigError naming the first offending dotted key.
    ``check_names=False`` accepts names no registry holds (a stored run of a plugin that is
    not loaded: its table row and run id need no plugin), checking the rest as far as it can."""
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "expected a mapping of config sections")
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise config_error(err, source) from None
    _check_combinations(cfg, source, check_names)
    return cfg


def _check_combinations(cfg: RunConfig, source: str, check_names: bool = True) -> None:
    from abexp.registry import (DATASETS, INPUT_KINDS, MODELS, RULES, DatasetRecord, ModelRecord, PluginError,
                                RuleRecord)

    try:  # the names a config gives must be registered: built-in, or a loaded plugin's
        found = [(r, r.find(name)) for r, name in ((RULES, cfg.optim.name), (MODELS, cfg.model.name),
                                                    (DATASETS, cfg.data.name))]
    except PluginError as err:
        raise ConfigError(source, "", str(err)) from None
    for registry, record in found:
        if record is None and check_names:
            raise ConfigError(source, registry.key, registry.unknown(get_dotted(cfg.model_dump(), registry.key)))
    # an unregistered name, not checked: a record that constrains nothing
    rule = found[0][1] or RuleRecord()
    model = found[1][1] or ModelRecord(builder=None, inputs=INPUT_KINDS)
    data = found[2][1] or DatasetRecord(loader=None)
    if cfg.optim.nesterov and "sc" in rule.flags:
        raise ConfigError(source, "optim.nesterov", "spike compensation defines its own update")
    if cfg.delay.kind == "geometric" and cfg.delay.mean is None:
        raise ConfigError(source, "delay.mean", "required when delay.kind is geometric")
    _check_delay(cfg.delay, source)
    if cfg.delay.kind == "async" and cfg.eval.bn != "recalibrate" and model.batch_norm:
        raise ConfigError(source, "eval.bn", "delay.kind async needs eval.bn: recalibrate (the parameter "
                          "server runs no forward pass, so it has no running BN statistics)")
    if "adam" in rule.flags and cfg.optim.nesterov:
        raise ConfigError(source, "optim.nesterov", f"not defined for {cfg.optim.name}")
    if "muon" in rule.flags and cfg.optim.nesterov:
        raise ConfigError(source, "optim.nesterov", f"not read by {cfg.optim.name} (Muon's is optim.muon_nesterov)")
    if "lwp" in rule.flags and ("adam" in rule.flags or "muon" in rule.flags) and cfg.optim.lwp_lookahead != "linear":
        raise ConfigError(source, "optim.lwp_lookahead", f"{cfg.optim.name} predicts along the last applied "
                          "update, H = the horizon steps (linear only)")
    if "discrepancy" in rule.flags and (cfg.delay.kind != "pipeline" or cfg.delay.stashing):
        raise ConfigError(source, "optim.name", "pipemare's discrepancy correction acts on an unstashed "
                          "pipeline's backward weights: it needs delay.kind: pipeline and delay.stashing: "
                          "false (pipemare_lr is its rescheduling alone)")
    if not cfg.delay.stashing and (cfg.train.precision == "bf16" or cfg.train.compile):
        # the backward weights are swapped in where autograd saves the parameters themselves;
        # autocast saves low-precision copies and a compiled graph its own, which it would miss
        raise ConfigError(source, "train.precision" if cfg.train.precision == "bf16" else "train.compile",
                          "delay.stashing: false needs train.precision fp32 or tf32 and train.compile: false")
    if cfg.train.batch_size % cfg.train.micro_batches:
        raise ConfigError(source, "train.micro_batches", "must divide train.batch_size")
    factors = cfg.schedule.epoch_factors
    if factors is not None and len(factors) != cfg.train.epochs:
        raise ConfigError(source, "schedule.epoch_factors", f"needs one factor per epoch: {len(factors)} given, "
                          f"train.epochs is {cfg.train.epochs}")
    if data.input_kind not in model.inputs:
        raise ConfigError(source, "model.name",
                          f"{cfg.model.name} does not fit data.name={cfg.data.name} ({cfg.model.name} takes "
                          f"{' or '.join(model.inputs)} input, {cfg.data.name} yields {data.input_kind})")
    if cfg.eval.bn == "recalibrate" and not model.batch_norm:
        raise ConfigError(source, "eval.bn", f"recalibrate recomputes BN statistics; {cfg.model.name} "
                          "has no batch norm (use eval.bn: running)")


def _check_delay(d: DelayCfg, source: str) -> None:
    """The per-stage and trace keys: each belongs to one kind and must be complete; a trace
    file is read and checked line by line here, before any run starts."""
    pipeline_keys = d.stages is not None or d.stage_delays is not None
    if pipeline_keys and d.kind != "pipeline":
        raise ConfigError(source, "delay.stages" if d.stages is not None else "delay.stage_delays",
                          "only for delay.kind: pipeline")
    if (d.trace is not None or d.histogram is not None) and d.kind != "trace":
        raise ConfigError(source, "delay.trace" if d.trace is not None else "delay.histogram",
                          "only for delay.kind: trace")
    if d.kind == "pipeline":
        if d.stages is None and d.stage_delays is None:
            raise ConfigError(source, "delay.stages", "required when delay.kind is pipeline "
                              "(or give delay.stage_delays)")
        if d.stages is not None and d.stage_delays is not None and len(d.stage_delays) != d.stages:
            raise ConfigError(source, "delay.stage_delays",
                              f"has {len(d.stage_delays)} entries for {d.stages} stages")
        if d.stage_backward_delays is not None:
            stages = d.stages if d.stages is not None else len(d.stage_delays)
            if d.stashing:
                raise ConfigError(source, "delay.stage_backward_delays",
                                  "needs delay.stashing: false (with stashing, backward delays equal forward ones)")
            if len(d.stage_backward_delays) != stages:
                raise ConfigError(source, "delay.stage_backward_delays",
                                  f"needs {stages} delays, one per stage (got {d.stage_backward_delays})")
            # each at most its stage's forward delay: abexp.lab.preflight.check_pipelines (the delays are sim's)
    elif not d.stashing or d.stage_backward_delays is not None:
        raise ConfigError(source, "delay.stashing" if not d.stashing else "delay.stage_backward_delays",
                          "only for delay.kind: pipeline")
    async_keys = {"delay.workers": d.workers is not None, "delay.order": d.order != "arrival",
                  "delay.slowdown": d.slowdown is not None, "delay.pause_prob": d.pause_prob > 0,
                  "delay.pause_s": d.pause_s > 0}
    if d.kind != "async" and any(async_keys.values()):
        raise ConfigError(source, next(k for k, on in async_keys.items() if on), "only for delay.kind: async")
    if d.kind == "async":
        if d.workers is None:
            raise ConfigError(source, "delay.workers", "required when delay.kind is async (N >= 1 worker processes)")
        if d.steps:
            raise ConfigError(source, "delay.steps", "not used by delay.kind async: the staleness is what "
                              "the workers produce (set delay.workers)")
        if d.slowdown is not None and (len(d.slowdown) != d.workers or any(not f >= 1.0 for f in d.slowdown)):
            raise ConfigError(source, "delay.slowdown", f"needs {d.workers} factors >= 1, one per worker "
                              f"(got {d.slowdown})")
    if d.kind == "trace":
        if (d.trace is None) == (d.histogram is None):
            raise ConfigError(source, "delay.trace", "delay.kind trace needs exactly one of "
                              "delay.trace (a file) and delay.histogram")
        if d.trace is not None:
            read_trace(d.trace, d.steps)
        elif d.steps and max(d.histogram) > d.steps:
            raise ConfigError(source, "delay.histogram", f"delay {max(d.histogram)} exceeds "
                              f"delay.steps = {d.steps}, the weight buffer's size")


def read_trace(path: str, cap: int = 0) -> list[int]:
    """A delay trace: one non-negative integer per line (blank lines and # comments skipped),
    none above ``cap`` when cap > 0. Any problem is a ConfigError naming the file and line."""
    return read_trace_columns(path, cap)[0]


def read_trace_columns(path: str, cap: int = 0) -> tuple[list[int], list[int] | None]:
    """The delays of a trace and, when every line has a second integer, the batch each update
    used (an async run's trace.txt: ``tau batch  # worker, seconds``), else None."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ConfigError(path, "delay.trace", f"cannot read: {err.strerror or err}") from None
    delays, batches = [], []
    for i, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not re.fullmatch(r"[0-9]+(\s+[0-9]+)?", text):
            raise ConfigError(path, f"line {i}", "expected a non-negative integer delay (and optionally "
                              f"the batch index it used), got {text!r}")
        fields = text.split()
        if cap and int(fields[0]) > cap:
            raise ConfigError(path, f"line {i}", f"delay {fields[0]} exceeds delay.steps = {cap}, "
                              "the weight buffer's size")
        if delays and (len(fields) == 2) != bool(batches):
            raise ConfigError(path, f"line {i}", "every line gives a batch index, or none does")
        delays.append(int(fields[0]))
        if len(fields) == 2:
            batches.append(int(fields[1]))
    if not delays:
        raise ConfigError(path, "delay.trace", "holds no delays")
    return delays, batches or None


def check_processes(cfg: RunConfig, processes: int, source: str) -> None:
    """Each of ``processes`` data-parallel ranks takes batch_size / processes examples, in
    micro-batches: checked before any process starts, so the error names the file."""
    if cfg.train.batch_size % (processes * cfg.train.micro_batches):
        raise ConfigError(source, "train.batch_size", f"{cfg.train.batch_size} is not divisible by "
                          f"{processes} processes x {cfg.train.micro_batches} micro-batches")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, check_names: bool = True) -> RunConfig:
    """Defaults <- YAML file <- ``--set`` overrides, then validation."""
    tree = base if base is not None else defaults()
    source = str(path) if path else "<defaults>"
    if path is not None:
        doc = read_yaml(path)
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(source, "", "expected a mapping at the top level")
        tree = deep_merge(tree, doc)
    for item in overrides or []:
        key, value = parse_override(item, f"{source} (--set)")
        set_dotted(tree, key, value, f"{source} (--set)")
    return validate(tree, source if not overrides else f"{source} (with --set)", check_names)


def _pop_dotted(tree: dict, key: str) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.get(part, {})
    tree.pop(leaf, None)


def canonical(cfg: RunConfig | dict) -> dict:
    """The config a run is identified by: no labels, logging or data location, and no added
    key at its pre-existing behaviour (``ADDED_KEYS``)."""
    data = cfg.model_dump() if isinstance(cfg, RunConfig) else copy.deepcopy(cfg)
    for key in NON_IDENTITY_KEYS:
        _pop_dotted(data, key)
    for key, neutral in ADDED_KEYS.items():
        try:
            at_neutral = get_dotted(data, key) == neutral
        except (KeyError, TypeError):
            at_neutral = True  # a stored config from before the key existed
        if at_neutral:
            _pop_dotted(data, key)
    return data


def run_id(cfg: RunConfig | dict) -> str:
    """Short hash of the canonical config: key order and logging options do not change it."""
    blob = json.dumps(canonical(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
