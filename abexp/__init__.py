"""abexp: a research harness for gradient delay and the optimizers that mitigate it."""

__version__ = "0.1.0"
