"""Spec expansion and validation."""

import json
import textwrap
from pathlib import Path

import pytest

from abexp.cli import main
from abexp.config import ConfigError, load_config, run_id
from abexp.lab.spec import load_spec

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_grid_variants_zip_exclude_counts(tmp_path):
    spec = write(tmp_path / "s.yaml", """
        name: t
        base: {model: {name: resnet8}, data: {name: digits}}
        variants:
          sgdm: {optim.name: sgdm}
          ab: {optim: {name: ab, rho: 0.5}}
        grid:
          seed: [0, 1, 2]
        zip:
          - {delay.steps: [0, 4, 32], optim.lr: [0.1, 0.05, 0.01]}
        exclude:
          - {variant: ab, delay.steps: 0}
          - {seed: [1, 2], delay.steps: 32}
    """)
    plan = load_spec(spec).expand()
    # 2 variants x 3 seeds x 3 zipped = 18; minus ab at D=0 (3); minus seeds 1,2 at D=32 (2 variants x 2)
    assert len(plan) == 18 - 3 - 4
    for run in plan:
        c = run.config
        assert {0: 0.1, 4: 0.05, 32: 0.01}[c.delay.steps] == c.optim.lr  # zipped together
        assert c.experiment == "t" and c.model.name == "resnet8"
        if run.overrides["variant"] == "ab":
            assert c.optim.name == "ab" and c.optim.rho == 0.5 and c.delay.steps != 0
    assert len({r.run_id for r in plan}) == len(plan)


def test_extends_another_spec_or_config(tmp_path):
    write(tmp_path / "base.yaml", "optim: {lr: 0.3, momentum: 0.5}\ntrain: {epochs: 7}\n")
    write(tmp_path / "parent.yaml", "name: p\nbase: {extends: base.yaml, optim: {lr: 0.2}}\n")
    spec = write(tmp_path / "child.yaml", """
        name: c
        base: {extends: parent.yaml, train: {epochs: 3}}
        grid: {seed: [0]}
    """)
    (run,) = load_spec(spec).expand()
    assert (run.config.optim.lr, run.config.optim.momentum, run.config.train.epochs) == (0.2, 0.5, 3)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "name: a\nbase: {extends: b.yaml}\n")
    write(tmp_path / "b.yaml", "name: b\nbase: {extends: a.yaml}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_spec(tmp_path / "a.yaml")


def test_duplicates_collapse_with_a_warning(tmp_path):
    spec = write(tmp_path / "s.yaml", """
        name: d
        variants: {one: {optim.lr: 0.1}, two: {optim.lr: 0.1}}
    """)
    warnings = []
    plan = load_spec(spec).expand(warn=warnings.append)
    assert len(plan) == 1 and len(warnings) == 1 and "duplicates" in warnings[0]


def test_run_id_is_stable_under_key_order_and_logging_options(tmp_path):
    a = write(tmp_path / "a.yaml", "optim: {lr: 0.2, momentum: 0.8}\ndelay: {steps: 3}\n")
    b = write(tmp_path / "b.yaml", "delay: {steps: 3}\noptim: {momentum: 0.8, lr: 0.2}\n"
                                   "tracking: {wandb: {mode: offline, tags: [x]}}\n")
    assert run_id(load_config(a)) == run_id(load_config(b))
    assert run_id(load_config(a)) != run_id(load_config(a, ["optim.lr=0.21"]))
    assert run_id(load_config(a)) == run_id(load_config(a, ["data.root=/elsewhere"]))


def test_an_added_key_at_its_old_behaviour_keeps_stored_run_ids(monkeypatch):
    """Registering a key in ADDED_KEYS: configs stored before it existed keep their id."""
    from abexp import config

    cfg = load_config(None, ["optim.lr=0.3"])
    stored = cfg.model_dump()
    del stored["train"]["compile"]  # as if saved by a version without train.compile
    assert run_id(stored) != run_id(cfg)  # without the registry, the new key re-identifies runs
    monkeypatch.setitem(config.ADDED_KEYS, "train.compile", False)
    assert run_id(stored) == run_id(cfg)
    assert run_id(load_config(None, ["optim.lr=0.3", "train.compile=true"])) != run_id(cfg)


def test_invalid_run_stops_the_plan_naming_file_run_and_key(tmp_path, capsys):
    spec = write(tmp_path / "s.yaml", """
        name: bad
        grid: {optim.lr: [0.1, -1.0]}
    """)
    assert main(["plan", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(spec) in err and "optim.lr" in err and "optim.lr=-1.0" in err


@pytest.mark.parametrize("text,key", [
    ("name: x\ngrids: {seed: [0]}\n", "grids"),
    ("name: x\ngrid: {seed: 3}\n", "grid.seed"),
    ("name: x\nzip: [{seed: [0, 1], optim.lr: [0.1]}]\n", "zip[0]"),
    ("name: x\nbase: {optim: {lrr: 1}}\n", "optim.lrr"),
    ("name: x\nvariants: {a: {optim.name: lamb}}\n", "optim.name"),
])
def test_bad_spec_exits_2(tmp_path, capsys, text, key):
    spec = write(tmp_path / "s.yaml", text)
    assert main(["run", str(spec), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(spec) in err and key in err and not (tmp_path / "r").exists()


def test_plan_json_lists_runs(tmp_path, capsys):
    spec = write(tmp_path / "s.yaml", "name: j\ngrid: {seed: [0, 1]}\n")
    assert main(["plan", str(spec), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["overrides"] for r in rows] == [{"seed": 0}, {"seed": 1}]
    assert rows[0]["run_id"] == run_id(rows[0]["config"])


def test_shipped_specs_expand_and_validate():
    assert len(load_spec(EXPERIMENTS / "cifar10_resnet20_delay.yaml").expand()) == 8 * 3 * 4
    demo = load_spec(EXPERIMENTS / "digits_demo.yaml").expand()
    assert len(demo) == 4 * 3 * 2
    assert {r.config.data.name for r in demo} == {"digits"}
    imagenet = load_spec(EXPERIMENTS / "imagenet_resnet50_delay.yaml").expand()
    short = load_spec(EXPERIMENTS / "imagenet_resnet50_delay_16ep.yaml").expand()
    assert len(imagenet) == len(short) == 4
    assert {r.config.train.epochs for r in short} == {16} and short[0].config.model.name == "resnet50"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_expands_to_distinct_valid_runs(path):
    plan = load_spec(path).expand()
    assert plan and len({r.run_id for r in plan}) == len(plan)


def test_the_paper_length_evidence_runs_are_cells_of_the_stage_1_grid_at_34_epochs():
    """Each (rule, delay, lr) the 34-epoch spec trains was run by stage 1 (its lr was selected
    from that grid), on the same validation split, with 3 seeds each."""
    stage1 = {(r.config.optim.name, r.config.delay.steps, r.config.optim.lr)
              for r in load_spec(EXPERIMENTS / "fashion_mnist_evidence.yaml").expand()}
    long = load_spec(EXPERIMENTS / "fashion_mnist_evidence_34ep.yaml").expand()
    cells = {}
    for run in long:
        c = run.config
        assert c.train.epochs == 34 and c.data.val_split == 0.1 and (c.optim.name, c.delay.steps, c.optim.lr) in stage1
        cells.setdefault((c.optim.name, c.delay.steps), set()).add(c.seed)
    assert cells == {(o, d): {0, 1, 2} for o in ("sgdm", "ab") for d in (0, 32)}


def validation_selected_lrs(rules, delays) -> dict[tuple[str, int], float]:
    """{(optimizer, delay): lr} as the tuned-lr table (paired.selected, on validation) picks it
    from the committed rows of fashion_mnist_evidence's selection seeds; each cell complete."""
    from abexp.figures import common, paired

    rows = common.finished(common.load(str(EXPERIMENTS.parent / "results" / "fashion_mnist_evidence_runs.csv")))
    cells = {run.run_id for run in load_spec(EXPERIMENTS / "fashion_mnist_evidence.yaml").expand()
             if run.config.optim.name in rules and run.config.delay.steps in delays and run.config.seed in (0, 1)}
    missing = cells - set(rows["run_id"])
    assert not missing, f"{len(missing)} stage-1 runs of these cells have no committed row: the selection may move"
    rows = rows[rows["run_id"].isin(cells)].copy()  # not later stages or ablations
    choice = paired.selected(rows)
    assert choice.on_val and all(n == 2 for n in choice.tuned["seeds"])  # both selection seeds at the picked lr
    return {(choice.series[r["series"]], int(r["delay"])): float(r["lr"]) for r in choice.tuned.to_dict("records")}


def test_the_paper_length_lrs_are_what_validation_selects_from_the_committed_stage_1_rows():
    """The 34-epoch spec's lrs were typed in by hand: they must be the lrs the tuned-lr table
    picks from stage 1's committed rows."""
    picked = validation_selected_lrs(["sgdm", "ab"], [0, 32])
    typed = {(r.config.optim.name, r.config.delay.steps, r.config.optim.lr)
             for r in load_spec(EXPERIMENTS / "fashion_mnist_evidence_34ep.yaml").expand()}
    assert typed == {(name, delay, lr) for (name, delay), lr in picked.items()}


def test_the_ablations_run_at_the_validation_selected_lr_with_eight_seeds_per_arm():
    picked = validation_selected_lrs(["ab", "lwp", "ab_lwp"], [8, 32])
    arms: dict[tuple, set[int]] = {}
    for run in load_spec(EXPERIMENTS / "fashion_mnist_evidence_ablations.yaml").expand():
        c = run.config
        assert c.optim.lr == picked[(c.optim.name, c.delay.steps)] and c.data.val_split == 0.1 and c.train.epochs == 3
        arms.setdefault((c.optim.name, c.delay.steps, c.optim.rho, c.optim.ab_cosine, c.optim.lwp_lookahead),
                        set()).add(c.seed)
    ab = [("ab", d, 1.0, "tensor", "linear") for d in (8, 32)]
    ab += [("ab", d, 2.0, "tensor", "linear") for d in (8, 32)] + [("ab", d, 1.0, "global", "linear") for d in (8, 32)]
    lwp = [(o, d, 1.0, "tensor", look) for o in ("lwp", "ab_lwp") for d in (8, 32) for look in ("linear", "momentum")]
    assert arms == {arm: set(range(8)) for arm in ab + lwp}


def test_the_brake_schedule_control_is_sgdm_at_abs_lr_times_abs_mean_brake_from_the_committed_rows():
    """The control's epoch factors were typed in: they must be AB's per-epoch mean brake at that
    delay and its validation-selected lr, over the selection seeds, recomputed from the committed
    per-epoch rows (a naive mean of brake_mean per epoch); AB runs beside it, 8 seeds each."""
    import pandas as pd

    picked = validation_selected_lrs(["ab"], [8, 32])
    results = EXPERIMENTS.parent / "results"
    runs = pd.read_csv(results / "fashion_mnist_evidence_runs.csv")
    epochs = pd.read_csv(results / "fashion_mnist_evidence_epochs.csv").merge(runs, on="run_id")
    arms: dict[tuple, set[int]] = {}
    for run in load_spec(EXPERIMENTS / "fashion_mnist_evidence_brake_schedule.yaml").expand():
        c = run.config
        assert c.optim.lr == picked[("ab", c.delay.steps)] and c.data.val_split == 0.1 and c.train.epochs == 3
        if c.optim.name == "sgdm":
            ab = epochs[(epochs["optim.name"] == "ab") & (epochs["delay.steps"] == c.delay.steps)
                        & (epochs["optim.lr"] == c.optim.lr) & epochs["seed"].isin([0, 1])
                        & (epochs["optim.rho"].fillna(1.0) == 1.0) & (epochs["optim.ab_cosine"].fillna("tensor") == "tensor")]
            assert sorted(set(ab["seed"])) == [0, 1] and len(ab) == 6
            means = [round(sum(g) / len(g), 3) for _, g in sorted(ab.groupby("epoch")["brake_mean"])]
            assert c.schedule.epoch_factors == means and c.schedule.name == "cosine" and c.optim.momentum == 0.9
        else:
            assert c.optim.name == "ab" and c.schedule.epoch_factors is None and c.optim.rho == 1.0
        arms.setdefault((c.optim.name, c.delay.steps), set()).add(c.seed)
    assert arms == {(o, d): set(range(8)) for o in ("ab", "sgdm") for d in (8, 32)}


def test_the_dcasgd_ablation_tunes_each_lambda_arm_on_the_evidence_recipe_and_split():
    """Constant λ against DC-ASGD-a at D = 32, each arm over the same lrs with the two selection
    seeds, on fashion_mnist_evidence's recipe and validation split (abexp confirm adds the rest)."""
    evidence = {(c.data.val_split, c.data.split_seed, c.train.epochs, c.train.batch_size, c.model.name)
                for c in (r.config for r in load_spec(EXPERIMENTS / "fashion_mnist_evidence.yaml").expand())}
    arms: dict[tuple, set] = {}
    for run in load_spec(EXPERIMENTS / "fashion_mnist_evidence_dcasgd.yaml").expand():
        c = run.config
        assert (c.data.val_split, c.data.split_seed, c.train.epochs, c.train.batch_size, c.model.name) in evidence
        assert c.optim.name == "dcasgd" and c.delay.steps == 32
        arms.setdefault((c.optim.dc_adaptive, c.optim.dc_lambda), set()).add((c.optim.lr, c.seed))
    grid = {(lr, s) for lr in (0.0015625, 0.003125, 0.00625, 0.0125, 0.025) for s in (0, 1)}
    assert arms == {(False, 0.04): grid, (True, 2.0): grid}


def test_a_variant_with_its_own_grid_and_zip_varies_them_within_that_variant_only(tmp_path):
    spec = write(tmp_path / "s.yaml", """
        name: t
        base: {model: {name: resnet8}, data: {name: digits}, eval: {bn: recalibrate}}
        grid: {seed: [0, 1]}
        variants:
          free: {delay.kind: async, grid: {delay.workers: [1, 2, 4]}}
          slow:
            delay.kind: async
            zip: {delay.workers: [2, 4], delay.slowdown: [[1, 3], [1, 1, 1, 3]]}
          constant: {grid: {delay.steps: [0, 3]}, zip: {optim.lr: [0.1, 0.2], optim.momentum: [0.9, 0.5]}}
    """)
    plan = load_spec(spec).expand()
    # a naive enumeration of what the spec says, in the same order
    want = []
    for name, rows in [("free", [{"delay.kind": "async", "delay.workers": n} for n in (1, 2, 4)]),
                       ("slow", [{"delay.kind": "async", "delay.workers": 2, "delay.slowdown": [1, 3]},
                                 {"delay.kind": "async", "delay.workers": 4, "delay.slowdown": [1, 1, 1, 3]}]),
                       ("constant", [{"delay.steps": d, "optim.lr": lr, "optim.momentum": m}
                                     for d in (0, 3) for lr, m in ((0.1, 0.9), (0.2, 0.5))])]:
        for row in rows:
            for seed in (0, 1):
                want.append({"variant": name, **row, "seed": seed})
    assert [r.overrides for r in plan] == want
    for run in plan:
        c = run.config
        if run.overrides["variant"] == "slow":
            assert len(c.delay.slowdown) == c.delay.workers and c.delay.slowdown[-1] == 3
        if run.overrides["variant"] == "constant":
            assert c.delay.kind == "constant" and c.delay.workers is None


@pytest.mark.parametrize("variant, key", [
    ("{optim.lr: 0.1, grid: {optim.lr: [0.1, 0.2]}}", "variants.v.optim.lr"),  # fixed and varied
    ("{grid: {seed: [3]}}", "variants.v.seed"),                                 # also the spec's grid
    ("{zip: {optim.lr: [0.1, 0.2], optim.momentum: [0.9]}}", "variants.v.zip[0]"),  # unequal lists
    ("{grid: {optim.lr: []}}", "variants.v.grid.optim.lr"),
])
def test_a_variants_own_grid_or_zip_that_contradicts_itself_names_the_key(tmp_path, capsys, variant, key):
    spec = write(tmp_path / "s.yaml", f"""
        name: t
        base: {{model: {{name: resnet8}}, data: {{name: digits}}}}
        grid: {{seed: [0, 1]}}
        variants:
          v: {variant}
    """)
    with pytest.raises(ConfigError) as err:
        load_spec(spec)
    assert err.value.key == key
    assert main(["plan", str(spec)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and str(spec) in lines[0]
