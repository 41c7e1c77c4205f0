"""Pipeline stages of the char-GPT (issue 40 item 5): cut by whole blocks, embeddings (and the
tied head weight) in the first stage, the final LayerNorm in the last, balanced by parameters
or FLOPs. The reference is a brute-force search over every cut between groups."""

import itertools

import pytest
import torch

from abexp.config import load_config
from abexp.train import catalog
from abexp.train.gpt import GPTLM, GPTConfig, blocks, group_costs


def model(layers=6, width=32, context=64, vocab=85):
    torch.manual_seed(0)
    return GPTLM(GPTConfig(vocab=vocab, context=context, layers=layers, heads=4, width=width))


def brute_force(costs, stages):
    """The group cuts minimising the largest stage cost; among ties the lexicographically
    smallest (the earliest cuts), as balanced_cuts breaks ties."""
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = [0, *cuts, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        if best is None or worst < best[0]:
            best = (worst, list(cuts))
    return best[1]


@pytest.mark.parametrize("balance", ["params", "flops"])
@pytest.mark.parametrize("stages", [1, 2, 4, 8])
def test_stages_are_whole_blocks_balanced_like_a_brute_force_search(stages, balance):
    m = model()
    cfg = load_config(None, ["model.name=gpt", "data.name=shakespeare", "delay.kind=pipeline",
                             f"delay.stages={stages}", f"delay.stage_balance={balance}"])
    sizes = [p.numel() for p in m.parameters()]
    ranges, stage_map = catalog.stages(cfg, m, sizes, (64,))
    groups = blocks(m)
    assert len(ranges) == stages == len(stage_map)
    # element offsets where each group begins: every stage boundary is one of them
    offsets, at = [0], 0
    for _, params in groups:
        at += sum(p.numel() for _, p in params)
        offsets.append(at)
    assert ranges[0][0] == 0 and ranges[-1][1] == sum(sizes)
    assert all(a in offsets and b in offsets for a, b in ranges)
    assert all(r1[1] == r2[0] for r1, r2 in zip(ranges, ranges[1:]))
    assert stage_map[0]["groups"][0] == "embed" and stage_map[-1]["groups"][-1] == "head"
    # the tied head weight is the token embedding: in the first stage's element range
    first = torch.cat([p.detach().reshape(-1) for p in m.parameters()])[ranges[0][0]:ranges[0][1]]
    assert torch.equal(first[:m.tok.weight.numel()], m.head.weight.detach().reshape(-1))
    costs = [sum(p.numel() for _, p in params) for _, params in groups] if balance == "params" else \
        [32.0] + [12 * 32 * 32 + 64 * 32.0] * 6 + [85 * 32 + 32.0]  # hand-written MACs per character
    assert group_costs(m, balance) == pytest.approx(costs)
    want = brute_force(costs, stages)
    got = [[name for name, _ in groups].index(s["groups"][0]) for s in stage_map][1:]
    assert got == want
    assert [s["delay"] for s in stage_map] == [2 * (stages - 1 - s) for s in range(stages)]


def test_more_stages_than_groups_is_refused():
    m = model(layers=2)
    cfg = load_config(None, ["model.name=gpt", "data.name=shakespeare", "delay.kind=pipeline", "delay.stages=5"])
    with pytest.raises(ValueError, match="4 groups"):
        catalog.stages(cfg, m, [p.numel() for p in m.parameters()], (64,))


def test_a_run_asking_more_stages_than_groups_is_one_line_exit_2_before_training(tmp_path, capsys):
    from abexp.cli import main
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {name: gpt, layers: 2}\ndata: {name: shakespeare}\n"
                        "delay: {kind: pipeline, stages: 5}\n")
    assert main(["train", str(cfg_file), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "delay.stages" in err[0] and "gpt has 4" in err[0]
    assert not (tmp_path / "run").exists()
