"""The character-level GPT against independent references: a hand count of its parameters, a
naive masked-softmax attention, causality by perturbing a later token, ln(vocab) at init, and a
few AdamW steps on a repeated text."""

import math

import pytest
import torch
import torch.nn.functional as F

from abexp.train.gpt import GPT, GPTConfig, blocks, loss_nats, muon_split

TINY = GPTConfig(vocab=11, context=8, layers=2, heads=2, width=16)


def make(cfg: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)


def test_parameter_count_matches_a_hand_count():
    # embeddings 11*16 + 8*16 = 304; per block: ln1 32, qkv 16*48+48 = 816, attn proj 16*16+16
    # = 272, ln2 32, fc 16*64+64 = 1088, mlp proj 64*16+16 = 1040 -> 3280; two blocks 6560;
    # final LayerNorm 32; the tied head adds nothing.
    model = make()
    assert sum(p.numel() for p in model.parameters()) == 304 + 2 * 3280 + 32 == TINY.n_params()
    study = GPTConfig(vocab=85, context=128, layers=4, heads=4, width=128)
    assert sum(p.numel() for p in GPT(study).parameters()) == study.n_params() == 820_608
    small = GPTConfig(vocab=65, context=64, layers=2, heads=2, width=48)
    assert 0.04e6 < sum(p.numel() for p in GPT(small).parameters()) == small.n_params() < 0.07e6


def test_head_is_tied_to_the_token_embedding():
    model = make()
    assert model.head.weight is model.tok.weight
    x = torch.randint(0, TINY.vocab, (2, TINY.context))
    h = model.ln_f(_residual(model, x))  # the head's input, recomputed
    logits = h @ model.tok.weight.T
    assert torch.allclose(logits, model(x), atol=1e-6)


def _residual(model: GPT, x: torch.Tensor) -> torch.Tensor:
    r = model.tok(x) + model.pos(torch.arange(x.shape[1]))
    for b in model.blocks:
        r = b(r)
    return r


def test_attention_equals_a_naive_masked_softmax():
    model = make()
    attn = model.blocks[1].attn
    x = torch.randn(3, TINY.context, TINY.width)
    b, t, d = x.shape
    w, bias = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ w.T + bias).split(d, dim=2)
    hd = d // TINY.heads
    q, k, v = (z.view(b, t, TINY.heads, hd).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    y = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
    expected = y.transpose(1, 2).reshape(b, t, d) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(attn(x), expected, atol=1e-5)


@pytest.mark.parametrize("j", [1, 4, 7])
def test_a_later_token_does_not_change_earlier_logits(j):
    model = make()
    x = torch.randint(0, TINY.vocab, (2, TINY.context))
    x2 = x.clone()
    x2[:, j] = (x[:, j] + 1) % TINY.vocab
    a, b = model(x), model(x2)
    assert torch.allclose(a[:, :j], b[:, :j], atol=1e-6)
    assert not torch.allclose(a[:, j:], b[:, j:], atol=1e-4)  # the change is seen from j on


def test_loss_at_init_is_near_ln_vocab():
    cfg = GPTConfig(vocab=85, context=32, layers=2, heads=4, width=64)
    model = make(cfg)
    x = torch.randint(0, cfg.vocab, (16, cfg.context))
    y = torch.randint(0, cfg.vocab, (16, cfg.context))  # independent of x: nothing to copy
    assert loss_nats(model(x), y).item() == pytest.approx(math.log(cfg.vocab), abs=0.1)


def test_loss_is_cross_entropy_in_nats():
    logits = torch.randn(2, 3, 5)
    y = torch.randint(0, 5, (2, 3))
    ref = -logits.log_softmax(-1).gather(-1, y[..., None]).mean()
    assert torch.allclose(loss_nats(logits, y), ref)


def test_a_few_adamw_steps_learn_a_repeated_text():
    cfg = GPTConfig(vocab=6, context=16, layers=2, heads=2, width=32)
    model = make(cfg)
    text = torch.tensor([0, 1, 2, 3, 4, 5, 4, 3, 2, 1] * 10)
    x = torch.stack([text[i:i + 16] for i in range(0, 60, 5)])
    y = torch.stack([text[i + 1:i + 17] for i in range(0, 60, 5)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss_nats(model(x), y).item()
    for _ in range(40):
        opt.zero_grad()
        loss = loss_nats(model(x), y)
        loss.backward()
        opt.step()
    assert loss_nats(model(x), y).item() < 0.3 * first


def test_blocks_list_every_parameter_once_in_forward_order():
    model = make()
    groups = blocks(model)
    assert [g for g, _ in groups] == ["embed", "block0", "block1", "head"]
    listed = [p for _, ps in groups for _, p in ps]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    assert {id(p) for p in listed} == {id(p) for p in model.parameters()}
    named = dict(model.named_parameters())
    for _, ps in groups:
        for name, p in ps:
            assert named[name] is p
    assert {n for n, _ in groups[1][1]} == {n for n in named if n.startswith("blocks.0.")}


def test_muon_split_takes_the_hidden_matrices_only():
    model = make()
    hidden, other = muon_split(model)
    # per block: qkv, attention output, MLP in and out
    assert [n for n, _ in hidden] == [f"blocks.{i}.{m}.weight" for i in range(2)
                                      for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert all(p.ndim == 2 for _, p in hidden)
    names = {n for n, _ in other}
    assert {"tok.weight", "pos.weight", "ln_f.weight", "ln_f.bias"} <= names
    assert all(p.ndim == 1 for n, p in other if n not in ("tok.weight", "pos.weight"))
    assert len(hidden) + len(other) == len(list(model.parameters()))


def test_config_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="multiple of heads"):
        GPTConfig(vocab=5, width=30, heads=4)
    with pytest.raises(ValueError, match="exceeds the context"):
        make()(torch.zeros(1, TINY.context + 1, dtype=torch.long))
