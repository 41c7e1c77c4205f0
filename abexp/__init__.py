"""abexp: a research harness for gradient delay and the optimizers that mitigate it."""

from typing import Any

__version__ = "0.1.0"

# the public Python API, imported on first use so that `import abexp` (and the CLI) stays light
_LAZY = ("DelayedOptimizer", "TensorData", "register_model", "register_dataset", "register_rule",
         "register_backend")


def __getattr__(name: str) -> Any:
    if name == "DelayedOptimizer":
        from abexp.train.torch_optim import DelayedOptimizer
        return DelayedOptimizer
    if name == "TensorData":
        from abexp.data.common import TensorData
        return TensorData
    if name == "register_backend":
        from abexp.lab.backends import register_backend
        return register_backend
    if name in ("register_model", "register_dataset", "register_rule"):
        from abexp import plugins
        return getattr(plugins, name)
    raise AttributeError(f"module 'abexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
