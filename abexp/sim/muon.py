"""Muon on the delay engine's flat weight vector: rules ``muon`` and ``ab_muon``.

Muon (Jordan et al. 2024; ``torch.optim.Muon``) updates a 2-D weight with the orthogonalised
momentum of its gradient; embeddings, norms, biases and the output layer get AdamW, the usual
recipe. The engine keeps all weights in one flat vector, so each Muon matrix is a
(rows, cols) view of its segment, and the AdamW part runs on the other segments gathered into
one contiguous vector (few tensors, so one gather and one scatter per step, not one kernel per
tensor). Per step, for a Muon matrix W with gradient G and momentum buffer B::

    B  <- lerp(B, G, 1 - mu)                 = mu B + (1 - mu) G        (torch's form, not B = mu B + G)
    U  <- lerp(G, B, mu) if nesterov else B
    O  <- NS_k(U): bfloat16; transposed if tall; U / max(||U||_F, 1e-7); k times
          X <- a X + (b X X^T + c (X X^T)^2) X,  (a, b, c) = (3.4445, -4.7750, 2.0315)
    W  <- W (1 - lr_M wd);  W <- W - lr_M adjust(rows, cols) O,  lr_M = lr * muon_lr_scale
          adjust: sqrt(max(1, rows/cols)) (original) or 0.2 sqrt(max(rows, cols)) (match_rms_adamw)

operation for operation as torch 2.13's ``torch.optim._muon`` (so bitwise equal to it at D = 0),
and the rest exactly as ``torch.optim.AdamW``. The momentum buffer of a matrix and AdamW's first
moment of the other tensors both live in the engine's flat velocity ``v``, so Adaptive Braking
(``ab_muon``) needs nothing of its own: ``DelayedOptimizer.step`` scales the gradient by
1 - rho cos(G, B) per tensor *before* this module sees it, i.e. before it enters the momentum
and so before the orthogonalisation. (Braking after the momentum would do nothing: NS divides
by the norm, so a scaled U gives the same O. The brake acts only through how much of G the
momentum takes in.)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from abexp.config import OptimCfg

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as torch.optim.Muon
NS_EPS = 1e-7  # floor of the Frobenius norm U is divided by (torch.optim.Muon's eps)

Matrix = Optional[tuple[int, int]]  # a segment's (rows, cols) when Muon updates it, else None


def orthogonalise(update: torch.Tensor, steps: int, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """Newton–Schulz approximation of U V^T for U S V^T = ``update``, in bfloat16 (a new tensor)."""
    a, b, c = coefficients
    x = update.to(torch.bfloat16, copy=True)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, mode: str, rows: int, cols: int) -> float:
    """Muon's per-matrix rate: equal RMS update across shapes ('original'), or AdamW's RMS."""
    if mode == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


def muon_matrices(model: nn.Module, split: str) -> list[Matrix]:
    """Per trained parameter (FlatParams' order), its shape if Muon updates it under ``split``.

    hidden: the 2-D weights except those of embeddings (nn.Embedding) and of the output layer
    (the model's last nn.Linear; a head tied to an embedding is that embedding) — the usual
    recipe; for the char-GPT exactly ``abexp.train.gpt.muon_split``'s hidden matrices.
    all_2d: every 2-D parameter (torch.optim.Muon's docstring example)."""
    params = [p for p in model.parameters() if p.requires_grad]
    excluded: set[int] = set()
    if split == "hidden":
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:
            excluded.add(id(linears[-1].weight))
        excluded.update(id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding))
    elif split != "all_2d":
        raise ValueError(f"unknown optim.muon_params {split!r} (hidden or all_2d)")
    return [(p.shape[0], p.shape[1]) if p.ndim == 2 and id(p) not in excluded else None for p in params]


class MuonUpdate:
    """The muon rule's own state: where its matrices are, and AdamW's second moment and step
    count for the other segments (the first moments are the engine's velocity ``v``)."""

    def __init__(self, cfg: OptimCfg, segment_sizes: list[int], matrices: list[Matrix], device,
                 dtype=torch.float32):
        if len(matrices) != len(segment_sizes):
            raise ValueError(f"{len(matrices)} matrix entries for {len(segment_sizes)} parameter tensors")
        self.cfg = cfg
        self.matrices: list[tuple[int, int, int]] = []  # (offset, rows, cols)
        other: list[torch.Tensor] = []
        offset = 0
        for size, shape in zip(segment_sizes, matrices):
            if shape is None:
                other.append(torch.arange(offset, offset + size, device=device))
            elif shape[0] * shape[1] != size:
                raise ValueError(f"matrix {shape} does not fill its segment of {size} elements")
            else:
                self.matrices.append((offset, shape[0], shape[1]))
            offset += size
        if not self.matrices:
            raise ValueError(f"rule {cfg.name}: no parameter gets Muon (no hidden 2-D weight; "
                             "see optim.muon_params)")
        self.other = torch.cat(other) if other else None  # element indices AdamW updates
        self.second = torch.zeros(len(self.other) if other else 0, device=device, dtype=dtype)
        self.updates = 0  # AdamW's bias-correction step count

    def step(self, w: torch.Tensor, g: torch.Tensor, v: torch.Tensor, lr: float) -> None:
        """One update of ``w`` in place from gradient ``g`` (braked already for ab_muon); ``v``
        holds the Muon momentum buffers and AdamW's first moments."""
        cfg = self.cfg
        if self.other is not None:
            self._adamw(w, g, v, lr)
        mu, muon_lr = cfg.muon_momentum, lr * cfg.muon_lr_scale
        for start, rows, cols in self.matrices:
            end = start + rows * cols
            grad, buf, param = (x[start:end].view(rows, cols) for x in (g, v, w))
            buf.lerp_(grad, 1.0 - mu)
            update = grad.lerp(buf, mu) if cfg.muon_nesterov else buf
            update = orthogonalise(update, cfg.muon_ns_steps)
            param.mul_(1.0 - muon_lr * cfg.weight_decay)
            param.add_(update, alpha=-adjusted_lr(muon_lr, cfg.muon_adjust_lr, rows, cols))

    def _adamw(self, w: torch.Tensor, g: torch.Tensor, v: torch.Tensor, lr: float) -> None:
        """torch.optim.AdamW's update, operation for operation, on the gathered other segments."""
        cfg, idx = self.cfg, self.other
        beta1, beta2 = cfg.betas
        param, grad, first = w[idx], g[idx], v[idx]
        param.mul_(1.0 - lr * cfg.weight_decay)
        self.updates += 1
        first.lerp_(grad, 1.0 - beta1)
        self.second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias1, bias2 = 1.0 - beta1 ** self.updates, 1.0 - beta2 ** self.updates
        denom = (self.second.sqrt() / math.sqrt(bias2)).add_(cfg.eps)
        param.addcdiv_(first, denom, value=-lr / bias1)
        w.index_copy_(0, idx, param)
        v.index_copy_(0, idx, first)

    def state_dict(self) -> dict:
        return {"second": self.second, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.second.copy_(state["second"])
        self.updates = int(state["updates"])
