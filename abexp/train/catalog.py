"""The built-in models, one record each (abexp.registry.ModelRecord): the builder, the inputs
it accepts, how a pipeline cuts it into stages and whether it has batch norm. torch and the
models are imported when a run builds one, not before: this module is read whenever a config
is validated."""

from __future__ import annotations

from dataclasses import dataclass

from abexp.registry import MODELS, ModelRecord

CIFAR_RESNETS = ("resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
IMAGENET_RESNETS = ("resnet18", "resnet50")


@dataclass(frozen=True)
class DataInfo:
    """What a builder may need to know of the data: classes, one example's shape, channels."""

    num_classes: int
    input_shape: tuple[int, ...]
    channels: int


def _resnet(name: str):
    def build(cfg, info: DataInfo):
        from abexp.train.models import build_model
        return build_model(name, info.num_classes, cfg.model.zero_init_residual, info.channels)
    build.__doc__ = f"{name} (abexp.train.models.build_model)"
    return build


# stages=None: the balanced contiguous cut of abexp.sim.pipeline.run_stages (params or flops),
# exact for any model whose parameters() are in forward order, as every ResNet's are
for _name in CIFAR_RESNETS:
    MODELS.add(_name, ModelRecord(_resnet(_name), inputs=("image",)))
for _name in IMAGENET_RESNETS:
    MODELS.add(_name, ModelRecord(_resnet(_name), inputs=("image_folder",)))


def _gpt(cfg, info: DataInfo):
    from abexp.train.gpt import build_for_run
    return build_for_run(cfg, info)


# a character-level GPT on token windows (abexp/train/gpt.py, docs/language_model.md); its
# pipeline stages are whole blocks (embeddings first, final LayerNorm last: gpt.run_stages)
def _gpt_stages(cfg, model, sizes, input_shape):
    from abexp.train.gpt import run_stages
    return run_stages(cfg, model, sizes, input_shape)


MODELS.add("gpt", ModelRecord(_gpt, inputs=("tokens",), stages=_gpt_stages, batch_norm=False,
                              max_stages=lambda cfg: cfg.model.layers + 2))  # embed, blocks, head


def build(cfg, num_classes: int, input_shape: tuple[int, ...], channels: int):
    """The model a run config names, from its record (built-in or a plugin's)."""
    import torch.nn as nn

    record = MODELS.get(cfg.model.name)
    model = record.builder(cfg, DataInfo(num_classes, tuple(input_shape), channels))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.name={cfg.model.name}: its builder returned {type(model).__name__}, "
                        "not a torch.nn.Module")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn != record.batch_norm:  # eval.bn and the figures' wording rely on the record
        raise TypeError(f"model.name={cfg.model.name}: registered with batch_norm={record.batch_norm}, "
                        f"but the model it builds {'has' if has_bn else 'has no'} BN layers")
    return model


def stages(cfg, model, sizes: list[int], input_shape: tuple[int, ...]):
    """(element ranges, stage map) of a pipeline run: the model record's cut, or the default."""
    cut = MODELS.get(cfg.model.name).stages
    if cut is None:
        from abexp.sim.pipeline import run_stages
        cut = run_stages
    return cut(cfg, model, sizes, input_shape)
