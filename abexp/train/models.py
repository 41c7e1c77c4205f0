"""CIFAR ResNets of He et al. 2016 (§4.2): 3 stages of 16/32/64 channels, option-A shortcuts.

Depth 6n+2: ResNet-20 has n=3 blocks per stage and 0.27M parameters. ImageNet ResNets come
from torchvision (imported through abexp.tv_compat).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR_DEPTHS = {"resnet8": 8, "resnet20": 20, "resnet32": 32, "resnet44": 44,
                "resnet56": 56, "resnet110": 110}
TORCHVISION_RESNETS = ("resnet18", "resnet50")  # ImageNet ResNets (torchvision's builders)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C]. On CUDA a mean, whose backward is deterministic
    (adaptive_avg_pool2d's is not, and refuses train.deterministic); elsewhere
    adaptive_avg_pool2d, bit for bit the numbers every stored CPU run was trained with."""
    if x.is_cuda:
        return x.mean((2, 3))
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


class GlobalAvgPool(nn.Module):
    """torchvision ResNets' ``avgpool`` (keeps [N, C, 1, 1]) through ``global_avg_pool``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(x)[:, :, None, None]


class ShortcutA(nn.Module):
    """Option A: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = ShortcutA(c_out - c_in) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Any image size works (global average pooling): 28x28 inputs run at 28, 14, 7."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.layers(out)
        return self.fc(global_avg_pool(out))


def build_model(name: str, num_classes: int = 10, zero_init_residual: bool = False,
                in_channels: int = 3) -> nn.Module:
    if name in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[name], num_classes, in_channels)
    if in_channels != 3:
        raise ValueError(f"{name} takes 3-channel images, not {in_channels}")
    from abexp.tv_compat import import_torchvision
    tv = import_torchvision()
    builders = {n: getattr(tv.models, n) for n in TORCHVISION_RESNETS}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}")
    model = builders[name](num_classes=num_classes, zero_init_residual=zero_init_residual)
    model.avgpool = GlobalAvgPool()  # no parameters: state dicts and stored weights are unchanged
    return model


# ---------------------------------------------------------------- packing: K runs, one model

class PackedShortcutA(nn.Module):
    """Option A for K runs whose channels are stacked: pad each run's channels separately."""

    def __init__(self, runs: int, extra_channels: int):
        super().__init__()
        self.runs, self.pad = runs, extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, kc, h, w = x.shape
        x = x[:, :, ::2, ::2].reshape(b, self.runs, kc // self.runs, (h + 1) // 2, (w + 1) // 2)
        x = F.pad(x, (0, 0, 0, 0, self.pad, self.pad))
        return x.reshape(b, -1, x.shape[-2], x.shape[-1])


class PackedBasicBlock(nn.Module):
    def __init__(self, runs: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        k = runs
        self.conv1 = nn.Conv2d(k * c_in, k * c_out, 3, stride, 1, bias=False, groups=k)
        self.bn1 = nn.BatchNorm2d(k * c_out)
        self.conv2 = nn.Conv2d(k * c_out, k * c_out, 3, 1, 1, bias=False, groups=k)
        self.bn2 = nn.BatchNorm2d(k * c_out)
        self.shortcut = (PackedShortcutA(k, c_out - c_in) if stride != 1 or c_in != c_out
                         else nn.Identity())

    forward = BasicBlock.forward


class PackedCifarResNet(nn.Module):
    """K independent CIFAR ResNets as one network of grouped convolutions.

    Every parameter and buffer has the name of its CifarResNet counterpart and K times its
    first dimension: chunk k along dim 0 is run k's tensor. Groups keep the runs independent
    (convolutions, per-channel BN, a block-diagonal classifier), so one forward/backward of the
    packed network computes K runs' gradients with K times fewer kernel launches.
    Input [B, K*C, H, W] (run k's images in channels Ck..Ck+C-1), output [B, K, classes].
    """

    def __init__(self, depth: int, runs: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n, k = (depth - 2) // 6, runs
        self.runs, self.num_classes = runs, num_classes
        self.conv = nn.Conv2d(in_channels * k, 16 * k, 3, 1, 1, bias=False, groups=k)
        self.bn = nn.BatchNorm2d(16 * k)
        layers, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                layers.append(PackedBasicBlock(k, c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes * k)  # weight [K*classes, 64]: run k's rows are chunk k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.layers(out)
        pooled = global_avg_pool(out).view(x.shape[0], self.runs, 64)
        weight = self.fc.weight.view(self.runs, self.num_classes, 64)
        return torch.einsum("bkc,koc->bko", pooled, weight) + self.fc.bias.view(self.runs, self.num_classes)

    @torch.no_grad()
    def load_runs(self, models: list[nn.Module]) -> "PackedCifarResNet":
        """Copy K separately initialised models into their chunks."""
        states = [m.state_dict() for m in models]
        for name, tensor in self.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.copy_(states[0][name])
            else:
                tensor.copy_(torch.cat([s[name] for s in states], dim=0))
        return self

    def run_state(self, k: int, buffers_only: bool = False) -> dict[str, torch.Tensor]:
        """Run k's state dict (or just its BN buffers), loadable into a CifarResNet."""
        out = {}
        tensors = dict(self.named_buffers()) if buffers_only else self.state_dict()
        for name, tensor in tensors.items():
            out[name] = tensor.clone() if name.endswith("num_batches_tracked") else \
                tensor.chunk(self.runs, dim=0)[k].clone()
        return out


def parameter_tensors(name: str) -> int | None:
    """How many parameter tensors model ``name`` has (a pipeline has at most that many stages);
    built on the meta device, so no memory or initialisation is spent. None for a plugin's model
    (its builder needs the data's shape; the run itself then checks the cut)."""
    if name not in CIFAR_DEPTHS and name not in TORCHVISION_RESNETS:
        return None
    with torch.device("meta"):
        return sum(1 for _ in build_model(name).parameters())
