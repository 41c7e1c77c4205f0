import pytest
import torch

from abexp.train.models import build_model


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet20_has_027m_parameters():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters
    assert 0.265e6 < count(build_model("resnet20")) < 0.275e6


@pytest.mark.parametrize("name,millions", [("resnet32", 0.46), ("resnet44", 0.66),
                                           ("resnet56", 0.85), ("resnet110", 1.7)])
def test_deeper_cifar_resnets_match_the_paper(name, millions):
    assert abs(count(build_model(name)) / 1e6 / millions - 1) < 0.03  # the paper rounds


def test_option_a_shortcut_has_no_parameters_and_shapes_flow():
    model = build_model("resnet8")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7  # stem + 3 blocks x 2, no projection convolutions
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_resnet18_builds_on_cpu_torch():
    model = build_model("resnet18", num_classes=10, zero_init_residual=True)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in model.layer1)
