"""An abexp plugin: what a researcher who brings their own model, data and update rule writes.

    model: {name: bc_mlp}        a 2-layer MLP (no batch norm)
    data:  {name: breast_cancer} scikit-learn's 569 tumours, 30 features, 2 classes, a fixed
                                 20% test split (data.val_split holds out a validation set)
    optim: {name: gap_damped}    SGDM whose delayed gradient is damped by the weights' drift

Installed, the entry point ``abexp.plugins`` makes abexp load it; from a source tree,
``--plugin abexp_breast_cancer`` or ``ABEXP_PLUGINS=abexp_breast_cancer``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import abexp

__version__ = "0.1.0"

FEATURES, CLASSES, TEST_FRACTION = 30, 2, 0.2


@abexp.register_dataset("breast_cancer", classes=CLASSES, input_kind="tabular", train_examples=455)
def breast_cancer(cfg) -> abexp.TensorData:
    """Standardised features (float32, the training split's mean and sd) and int64 labels; the
    test split is fixed by data.split_seed, as abexp's digits split is."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = torch.from_numpy(bunch.data).float()
    y = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.data.split_seed))
    n_test = int(round(len(y) * TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    return abexp.TensorData(x[train], y[train], x[test], y[test])


@abexp.register_model("bc_mlp", inputs=("tabular",))
def mlp(cfg) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


@abexp.register_rule("gap_damped", base="sgdm", label="gap-damped SGDM", color="#8c6d31")
def gap_damped(g: torch.Tensor, w: torch.Tensor, w_fwd: torch.Tensor, taus, lr: float, state: dict) -> None:
    """g /= 1 + |w - w_fwd| / |w|: a stale gradient counts less the further the weights moved
    since it was computed; at delay 0 (w_fwd = w) g is untouched, so the rule is SGDM. Keeps
    the mean damping it applied (state, saved in checkpoints)."""
    scale = 1.0 / (1.0 + (w - w_fwd).norm() / w.norm().clamp_min(1e-12))
    g.mul_(scale)
    count = state.get("steps", torch.zeros((), dtype=torch.float64, device=g.device)) + 1
    mean = state.get("mean_scale", torch.zeros((), dtype=torch.float64, device=g.device))
    state["steps"], state["mean_scale"] = count, mean + (scale.double() - mean) / count
