"""A character-level GPT, read top to bottom like nanoGPT: token and position embeddings,
pre-LayerNorm blocks (causal self-attention, then a 4x MLP, each a residual branch), a final
LayerNorm and an output head tied to the token embedding. Dropout is 0 by default, so a step
is a deterministic function of weights and batch, as abexp's delay experiments need.

Besides the model: ``blocks`` lists its parameters grouped for cutting into pipeline stages,
and ``muon_split`` separates the hidden 2-D matrices (for Muon) from embeddings, norms and
biases (for AdamW). See docs/language_model.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    """vocab: characters; context: longest sequence (position embeddings); width: residual
    stream (a multiple of heads)."""

    vocab: int
    context: int = 128
    layers: int = 4
    heads: int = 4
    width: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.vocab, self.context, self.layers, self.heads, self.width) < 1:
            raise ValueError(f"{self}: every size must be positive")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")

    def n_params(self) -> int:
        """Parameters by formula: embeddings V·d + T·d; per block two LayerNorms (4d), qkv
        (3d² + 3d), attention output (d² + d), MLP (4d² + 4d, 4d² + d); final LayerNorm 2d; the
        head adds nothing (tied)."""
        d = self.width
        return self.vocab * d + self.context * d + self.layers * (12 * d * d + 13 * d) + 2 * d


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, d] -> q, k, v, each [B, heads, T, d / heads]."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        return tuple(z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.split_heads(x)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.proj = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: one tensor, listed once by parameters()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases, LayerNorm (1, 0); the projections into
        the residual stream scaled by 1/sqrt(2·layers) so its variance does not grow with depth.
        Uses the global torch generator, like every abexp model (seeded by the run)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 character ids -> [B, T, vocab] logits of the next character."""
        t = idx.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence of {t} exceeds the context {self.cfg.context}")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def loss_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in nats per character (divide by ln 2 for bits per character)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def blocks(model: GPT) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """The parameters in forward order, grouped so that a pipeline can cut between groups:
    ("embed", token and position embeddings), ("block0", ...), ..., ("head", final LayerNorm).
    The head's weight is the token embedding (tied) and is listed once, in "embed": a stage cut
    puts it in the first stage, and the last stage reads that same tensor."""
    groups = [("embed", [("tok.weight", model.tok.weight), ("pos.weight", model.pos.weight)])]
    for i, block in enumerate(model.blocks):
        groups.append((f"block{i}", [(f"blocks.{i}.{n}", p) for n, p in block.named_parameters()]))
    groups.append(("head", [(f"ln_f.{n}", p) for n, p in model.ln_f.named_parameters()]))
    return groups


def muon_split(model: GPT) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(hidden, other): the 2-D weight matrices inside the blocks (attention and MLP
    projections: Muon's domain) and everything else — token/position embeddings (and so the
    tied head), LayerNorm gains and biases, all biases — for AdamW, the usual Muon recipe."""
    hidden, other = [], []
    for name, p in model.named_parameters():
        (hidden if name.startswith("blocks.") and p.ndim == 2 else other).append((name, p))
    return hidden, other


class GPTLM(GPT):
    """The GPT as abexp's runs call a model: logits [B, vocab, T], class dimension second, so
    the run's ``F.cross_entropy(logits, y)`` with y [B, T] is the mean loss per character and
    ``logits.argmax(1) == y`` counts correctly predicted characters, as for any classifier."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(idx).transpose(1, 2)


def build_for_run(cfg, info) -> GPTLM:
    """The model of a run config (abexp.train.catalog): vocab = the dataset's classes, context
    = one window's length, layers/width/heads from model.*."""
    return GPTLM(GPTConfig(vocab=info.num_classes, context=info.input_shape[-1], layers=cfg.model.layers,
                           heads=cfg.model.heads, width=cfg.model.width))


def group_costs(model: GPT, balance: str) -> list[float]:
    """Cost of each ``blocks`` group for a balanced pipeline cut: its parameters ("params"), or
    its forward multiply-accumulates per character ("flops"), charged where they are computed:
    a block 12d² (qkv, attention output, MLP) + T·d (causal attention scores and mix: on
    average T/2 keys, twice); the embeddings d (the add: a lookup costs no MACs); the head
    V·d (the tied output projection runs in the last stage, though its weight is the first's)
    + d (final LayerNorm)."""
    groups = blocks(model)
    if balance == "params":
        return [float(sum(p.numel() for _, p in params)) for _, params in groups]
    c, d = model.cfg, model.cfg.width
    return [float(d)] + [float(12 * d * d + c.context * d)] * c.layers + [float(c.vocab * d + d)]


def run_stages(cfg, model: GPT, sizes: list[int], input_shape: tuple[int, ...]):
    """(element ranges, stage map) of a pipeline run of the GPT (its ModelRecord's ``stages``):
    stages are contiguous runs of ``blocks`` groups, never a cut inside a block; the embeddings
    (and with them the tied head weight) are in the first, stalest stage, the final LayerNorm
    in the last; the groups are balanced by delay.stage_balance (params or flops) with the same
    min-max partition as a ResNet's tensors (abexp.sim.pipeline.balanced_cuts)."""
    from abexp.sim.pipeline import _element_ranges, balanced_cuts, stage_delays

    if cfg.delay.kind != "pipeline":
        return None, None
    groups = blocks(model)
    order = [p for _, params in groups for _, p in params]
    if [id(p) for p in order] != [id(p) for p in model.parameters()] or len(order) != len(sizes):
        raise ValueError("gpt: parameters() are not in the order of its blocks")  # the flat vector's
    delays = stage_delays(cfg.delay)
    if len(delays) > len(groups):
        raise ValueError(f"delay.stages: {len(delays)} stages, but a {model.cfg.layers}-layer GPT has "
                         f"{len(groups)} groups to cut (embeddings, {model.cfg.layers} blocks, head)")
    costs = group_costs(model, cfg.delay.stage_balance)
    cuts = [0] + balanced_cuts(costs, len(delays)) + [len(groups)]
    first = [0]  # tensor index where each group begins
    for _, params in groups:
        first.append(first[-1] + len(params))
    bounds = [first[g] for g in cuts]
    total = sum(costs) or 1.0
    stage_map = [{"stage": s, "groups": [name for name, _ in groups[a:b]], "tensors": [first[a], first[b]],
                  "params": sum(sizes[first[a]:first[b]]), "cost_share": round(sum(costs[a:b]) / total, 4),
                  "delay": d}
                 for s, ((a, b), d) in enumerate(zip(zip(cuts[:-1], cuts[1:]), delays))]
    return _element_ranges(sizes, bounds), stage_map
