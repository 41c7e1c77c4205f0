"""Run length in the plan: steps per run and the largest delay's share, checked by hand."""

import textwrap

from abexp.cli import main
from abexp.config import load_config
from abexp.lab import length


def test_steps_and_largest_delay_by_hand(tmp_path):
    cfg = lambda *s: load_config(None, list(s))  # noqa: E731
    # Fashion-MNIST, 60,000 / 32 = 1,875 steps per epoch, 34 epochs
    fm = cfg("data.name=fashion_mnist", "train.batch_size=32", "train.epochs=34", "delay.steps=32")
    assert length.steps_per_run(fm) == 63_750 and length.largest_delay(fm) == 32
    # data.val_split 0.1 holds out 6,000: 54,000 / 32 = 1,687 steps per epoch (issue 39's recipe)
    assert length.steps_per_run(cfg("data.name=fashion_mnist", "train.batch_size=32", "train.epochs=3",
                                    "data.val_split=0.1")) == 1_687 * 3
    # digits: 1,797 images, 359 held out, 1,438 / 16 = 89 full batches (the last 14 dropped)
    assert length.steps_per_run(cfg("data.name=digits", "model.name=resnet8", "train.batch_size=16",
                                    "train.epochs=8")) == 89 * 8
    # a subset caps the epoch; a pipeline's largest delay is its first stage's 2(S-1)
    pipe = cfg("data.name=digits", "data.subset=384", "train.batch_size=32", "train.epochs=6",
               "delay.kind=pipeline", "delay.stages=4")
    assert length.steps_per_run(pipe) == 72 and length.largest_delay(pipe) == 6
    assert length.largest_delay(cfg("delay.kind=pipeline", "delay.stage_delays=[3, 9, 1]")) == 9
    # an async run's staleness is only known once it runs: the plan shows its mean, N - 1
    assert length.largest_delay(cfg("delay.kind=async", "delay.workers=8", "eval.bn=recalibrate")) == 7


def test_a_run_trains_the_planned_number_of_steps(tmp_path):
    from abexp.train.run import Run

    c = load_config(None, ["data.name=digits", "model.name=resnet8", "data.subset=100", "data.test_subset=32",
                           "train.batch_size=32", "train.epochs=2"])
    run = Run(c, tmp_path / "run", device="cpu")
    assert run.total_steps == length.steps_per_run(c) == 6
    held = c.model_copy(update={"data": c.data.model_copy(update={"val_split": 0.37})})
    # 100 examples, round(37.0) held out: 63 // 32 = 1 step per epoch
    assert Run(held, tmp_path / "held", device="cpu").total_steps == length.steps_per_run(held) == 2


def test_plan_shows_steps_and_warns_of_a_large_delay(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent("""\
        name: s
        base:
          model: {name: resnet8}
          data: {name: digits, subset: 384, test_subset: 64}
          train: {epochs: 6, batch_size: 32}
        grid:
          delay.steps: [0, 2, 4]
        """))
    assert main(["plan", str(spec), "--results", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    assert "steps 72  delay 4 (5.56%)" in out and "steps 72  delay 2 (2.78%)" in out
    assert "72 steps per run; largest delay 4 steps = 5.56%" in out
    assert err.startswith("warning: 1 run(s) have a delay over 5%")
