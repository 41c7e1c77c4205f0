"""Per-stage delays of pipelined training: which parameters form each stage, and each stage's delay.

In pipelined backpropagation with S stages and one sample in flight per stage, stage s (0 = the
input side) applies at step t a gradient computed with its weights of step t - 2(S-1-s): the
input side is the stalest, the output side fresh. By default abexp models a pipeline *with*
weight stashing: a stage's forward and backward pass see the same (stale) weights. With
``delay.stashing: false`` (Pipelined Backpropagation as Kosson et al., 2021 run it) a stage's
backward pass uses its weights of step t - b_s instead, b_s = 0 (the current weights) unless
``delay.stage_backward_delays`` says otherwise (abexp.train.backward_weights does the swap).

Stages are contiguous runs of parameter tensors in forward order (the order of
``model.parameters()``, which is the forward order for every model abexp builds). The cut is
the contiguous partition into S non-empty stages whose largest stage cost is smallest (exact,
by dynamic programming), the cost of a tensor being its parameter count (``params``) or the
multiply-accumulates of the layer it belongs to in one forward pass (``flops``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def profile_delays(stages: int, cap: int = 0, profile: str = "pipeline") -> list[int]:
    """2(S-1-s) for s = 0..S-1 (``flat``: 2(S-1) for every stage), capped at ``cap`` when cap > 0."""
    delays = [2 * (stages - 1 - (0 if profile == "flat" else s)) for s in range(stages)]
    return [min(d, cap) for d in delays] if cap > 0 else delays


def stage_delays(delay_cfg) -> list[int]:
    """The per-stage delays a pipeline DelayCfg names (explicit list, or the profile)."""
    if delay_cfg.stage_delays is not None:
        return list(delay_cfg.stage_delays)
    return profile_delays(delay_cfg.stages, delay_cfg.steps, delay_cfg.stage_profile)


def backward_delays(delay_cfg) -> list[int] | None:
    """b_s per stage for an unstashed pipeline (0 everywhere unless given); None with stashing."""
    if delay_cfg.kind != "pipeline" or delay_cfg.stashing:
        return None
    if delay_cfg.stage_backward_delays is not None:
        return list(delay_cfg.stage_backward_delays)
    return [0] * len(stage_delays(delay_cfg))


def balanced_cuts(costs: list[float], stages: int) -> list[int]:
    """Indices where stages 1..S-1 begin: the contiguous partition of ``costs`` into ``stages``
    non-empty parts minimising the largest part's sum (ties: the earliest cut)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} parameter tensors into {stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest max-part over partitions of the first i tensors into k parts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], arg[k][i] = value, j
    cuts, i = [], n
    for k in range(stages, 0, -1):
        i = arg[k][i]
        cuts.append(i)
    return sorted(cuts)[1:]  # drop the leading 0


def tensor_flops(model: nn.Module, input_shape: tuple[int, ...]) -> list[float]:
    """Multiply-accumulates per parameter tensor in one forward pass of one example: a layer's
    cost (convolution, linear, or the elementwise batch norm) is charged to its weight, and its
    bias (if any) costs its output size."""
    cost: dict[int, float] = {}

    def hook(module: nn.Module, inputs, output) -> None:
        out = output.numel()
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # in_channels / groups * kh * kw
            cost[id(module.weight)] = float(out * k)
        elif isinstance(module, nn.Linear):
            cost[id(module.weight)] = float(out * module.in_features)
        elif module.weight is not None:
            cost[id(module.weight)] = float(out)
        if getattr(module, "bias", None) is not None:
            cost[id(module.bias)] = float(out)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [cost.get(id(p), 0.0) for p in model.parameters() if p.requires_grad]


def _element_ranges(sizes: list[int], bounds: list[int]) -> list[tuple[int, int]]:
    """Tensor-index bounds [0, c1, ..., n] -> element ranges of the flat parameter vector."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    return [(offsets[a], offsets[b]) for a, b in zip(bounds[:-1], bounds[1:])]


def stage_ranges(sizes: list[int], costs: list[float], stages: int) -> list[tuple[int, int]]:
    """Element ranges [start, end) of the flat parameter vector, one per stage."""
    return _element_ranges(sizes, [0] + balanced_cuts(costs, stages) + [len(sizes)])


def run_stages(cfg, model: nn.Module, sizes: list[int], input_shape: tuple[int, ...]
               ) -> tuple[list[tuple[int, int]] | None, list[dict] | None]:
    """(element ranges, stage map for result.json: each stage's tensors, parameter count, cost
    share and delay) of a run's model; (None, None) unless the run's delay is per stage."""
    if cfg.delay.kind != "pipeline":
        return None, None
    delays = stage_delays(cfg.delay)
    costs = [float(n) for n in sizes] if cfg.delay.stage_balance == "params" else tensor_flops(model, input_shape)
    bounds = [0] + balanced_cuts(costs, len(delays)) + [len(sizes)]
    total = sum(costs) or 1.0
    stage_map = [{"stage": s, "tensors": [a, b], "params": sum(sizes[a:b]),
                  "cost_share": round(sum(costs[a:b]) / total, 4), "delay": d}
                 for s, ((a, b), d) in enumerate(zip(zip(bounds[:-1], bounds[1:]), delays))]
    return _element_ranges(sizes, bounds), stage_map
