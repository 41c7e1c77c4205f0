"""Experiment specs: a declarative YAML expanded into validated runs.

    name: cifar10_resnet20_delay
    description: ...
    base: {...run config...}          # or  base: {extends: other.yaml, <overrides>}
    grid: {delay.steps: [0, 32], seed: [0, 1, 2]}          # crossed
    variants: {sgdm: {optim.name: sgdm}, ab: {optim.name: ab}}   # named, crossed with the grid
    variants: {slow: {delay.kind: async, zip: {delay.workers: [2, 4], delay.slowdown: [[1, 3], [1, 1, 1, 3]]}}}
                                      # a variant's own grid/zip: varied within that variant only
    zip: [{delay.steps: [0, 32], optim.lr: [0.1, 0.05]}]   # keys that vary together
    exclude: [{variant: sc, delay.steps: 0}]               # drop runs matching every pair

Every expanded run is validated before anything runs; duplicates (same run_id) collapse.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abexp.config import (ConfigError, RunConfig, deep_merge, defaults, flatten, get_dotted,
                          parse_override, read_locked_mapping, read_yaml, run_id, set_dotted,
                          validate)
from abexp.lab.preflight import check_name

SPEC_KEYS = {"name", "description", "base", "grid", "variants", "zip", "exclude"}


@dataclass
class PlannedRun:
    run_id: str
    overrides: dict[str, Any]
    config: RunConfig


@dataclass
class Spec:
    path: Path
    name: str
    description: str
    base: dict
    grid: dict[str, list]
    variants: dict[str, list[dict[str, Any]]]  # name -> its rows (one unless it has its own grid/zip)
    zips: list[dict[str, list]]
    exclude: list[dict[str, Any]] = field(default_factory=list)
    set_keys: list[str] = field(default_factory=list)  # keys given with --set (blamed on it)

    def expand(self, warn=lambda msg: print(msg, file=sys.stderr)) -> list[PlannedRun]:
        return expand(self, warn)


def _as_dotted(tree: Any, where: str, source: str) -> dict[str, Any]:
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(source, where, "expected a mapping")
    return flatten(tree)


def _grid_and_zips(grid_raw: Any, zips_raw: Any, where: str, source: str) -> list[dict[str, Any]]:
    """The rows a grid (crossed) and zips (keys varying together) expand to, in a stable order."""
    grid = _as_dotted(grid_raw, f"{where}grid", source)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(source, f"{where}grid.{key}", "expected a non-empty list of values")
    zips_raw = zips_raw or []
    zips_raw = [zips_raw] if isinstance(zips_raw, dict) else zips_raw
    if not isinstance(zips_raw, list):
        raise ConfigError(source, f"{where}zip", "expected a mapping or a list of mappings")
    axes: list[list[dict[str, Any]]] = [[{key: v} for v in values] for key, values in grid.items()]
    for i, group in enumerate(zips_raw):
        if not isinstance(group, dict):
            raise ConfigError(source, f"{where}zip[{i}]", "expected a mapping of key -> list")
        lengths = {len(v) if isinstance(v, list) else -1 for v in group.values()}
        if -1 in lengths or len(lengths) != 1 or 0 in lengths:
            raise ConfigError(source, f"{where}zip[{i}]", "expected non-empty lists of equal length")
        axes.append([{k: group[k][j] for k in group} for j in range(len(next(iter(group.values()))))])
    rows = []
    for combo in itertools.product(*axes):
        row: dict[str, Any] = {}
        for part in combo:
            row.update(part)
        rows.append(row)
    return rows


def _variant_rows(name: str, raw: Any, source: str) -> list[dict[str, Any]]:
    """A variant's fixed keys, crossed with its own ``grid`` and ``zip`` when it has them (a
    slowdown list whose length follows the worker count, a delay cap that follows the mean)."""
    if not isinstance(raw, dict):
        raise ConfigError(source, f"variants.{name}", "expected a mapping (a partial config)")
    raw = dict(raw)
    own_grid, own_zip = raw.pop("grid", None), raw.pop("zip", None)
    fixed = _as_dotted(raw, f"variants.{name}", source)
    rows = _grid_and_zips(own_grid, own_zip, f"variants.{name}.", source)
    for row in rows:
        clash = next((k for k in row if k in fixed), None)
        if clash is not None:
            raise ConfigError(source, f"variants.{name}.{clash}", "is both fixed and varied in this variant")
    return [{**fixed, **row} for row in rows]


def resolve_base(base: Any, spec_dir: Path, source: str, seen: tuple[Path, ...]) -> dict:
    """A nested config tree: defaults <- extended file(s) <- this base's own keys."""
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ConfigError(source, "base", "expected a mapping (a run config, or extends: FILE)")
    base = dict(base)
    tree = defaults()
    parent = base.pop("extends", None)
    if parent is not None:
        path = (spec_dir / str(parent)).resolve()
        if path in seen:
            raise ConfigError(source, "base.extends", f"cycle through {path}")
        doc = read_yaml(path)
        if not isinstance(doc, dict):
            raise ConfigError(str(path), "", "expected a mapping")
        if "base" in doc:  # another spec: use its resolved base
            tree = resolve_base(doc["base"], path.parent, str(path), seen + (path,))
        else:  # a run config
            tree = resolve_base(doc, path.parent, str(path), seen + (path,))
    for key, value in flatten(base).items():
        set_dotted(tree, key, value, source)
    return tree


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    """Read and check a spec; ``overrides`` (KEY=VALUE) apply to the base of every run."""
    path = Path(path)
    source = str(path)
    doc = read_locked_mapping(path, SPEC_KEYS, "name, base, grid, ...")
    name = doc.get("name") or path.stem
    check_name(name, source)  # it names files: RESULTS/replays/<name>.yaml, RESULTS/figures/<name>/
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(source, "name", "expected letters, digits, '-' and '_'")
    grid = _as_dotted(doc.get("grid"), "grid", source)
    _grid_and_zips(doc.get("grid"), None, "", source)  # checks the grid's lists
    variants_raw = doc.get("variants") or {}
    if not isinstance(variants_raw, dict):
        raise ConfigError(source, "variants", "expected a mapping of name -> partial config")
    variants = {str(k): _variant_rows(str(k), v, source) for k, v in variants_raw.items()}
    zips_raw = doc.get("zip") or []
    zips_raw = [zips_raw] if isinstance(zips_raw, dict) else zips_raw
    _grid_and_zips(None, zips_raw, "", source)  # checks the zips' lists
    zips = [dict(group) for group in zips_raw]
    outside = set(grid) | {k for g in zips for k in g}
    for vname, rows in variants.items():
        clash = next((k for row in rows for k in row if k in outside), None)
        if clash is not None:
            raise ConfigError(source, f"variants.{vname}.{clash}", "is also varied by the spec's grid or zip")
    exclude = doc.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
        raise ConfigError(source, "exclude", "expected a list of mappings")
    base = resolve_base(doc.get("base"), path.parent, source, (path.resolve(),))
    varied = outside | {k for rows in variants.values() for row in rows for k in row}
    set_keys = []
    for item in overrides or []:
        key, value = parse_override(item, "--set")
        if key in varied:  # the grid would win and the --set silently do nothing
            raise ConfigError("--set", key, f"is varied by {source}'s grid, variants or zip, so it "
                              "cannot be set for every run; edit the spec, or write one that extends it")
        set_dotted(base, key, value, "--set")
        set_keys.append(key)
    return Spec(path, name, str(doc.get("description", "")), base, grid, variants, zips,
                [flatten(e) for e in exclude], set_keys)


def _excluded(overrides: dict, tree: dict, rules: list[dict]) -> bool:
    for rule in rules:
        hit = True
        for key, want in rule.items():
            if key == "variant":
                have = overrides.get("variant")
            else:
                try:
                    have = get_dotted(tree, key)
                except (KeyError, TypeError):
                    hit = False
                    break
            if not (have in want if isinstance(want, list) else have == want):
                hit = False
                break
        if hit:
            return True
    return False


def expand(spec: Spec, warn=lambda msg: print(msg, file=sys.stderr)) -> list[PlannedRun]:
    """All runs of a spec, validated, in a stable order; duplicates collapse with a warning."""
    source = str(spec.path)
    axes: list[list[dict[str, Any]]] = []
    if spec.variants:
        axes.append([{"variant": name, **row} for name, rows in spec.variants.items() for row in rows])
    for key, values in spec.grid.items():
        axes.append([{key: v} for v in values])
    for group in spec.zips:
        n = len(next(iter(group.values())))
        axes.append([{k: group[k][i] for k in group} for i in range(n)])
    runs: list[PlannedRun] = []
    seen: dict[str, str] = {}
    for combo in itertools.product(*axes):
        overrides: dict[str, Any] = {}
        for part in combo:
            overrides.update(part)
        tree = deep_merge(spec.base, {})
        for key, value in overrides.items():
            if key != "variant":
                set_dotted(tree, key, value, source)
        tree["experiment"] = spec.name
        tree["variant"] = str(overrides.get("variant", ""))
        label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "base"
        if _excluded(overrides, tree, spec.exclude):
            continue
        try:
            cfg = validate(tree, source)
        except ConfigError as err:
            if err.key in spec.set_keys:
                raise ConfigError("--set", err.key, err.message) from None
            raise ConfigError(source, err.key, f"{err.message} (run: {label})") from None
        if cfg.tracking.wandb.group is None:
            cfg.tracking.wandb.group = spec.name
        rid = run_id(cfg)
        if rid in seen:
            warn(f"warning: {source}: run ({label}) duplicates ({seen[rid]}); kept once")
            continue
        seen[rid] = label
        runs.append(PlannedRun(rid, overrides, cfg))
    return runs
