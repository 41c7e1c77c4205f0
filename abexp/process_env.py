"""What every abexp process puts in its environment before torch does any work.

cuBLAS takes its workspace configuration from ``CUBLAS_WORKSPACE_CONFIG`` once per process, at
the process's first cuBLAS call: a variable set later (when a deterministic run starts after a
non-deterministic one in the same worker) is too late, and that run's matrix products either
raise under ``torch.use_deterministic_algorithms(True)`` or are not the deterministic ones. So
each entry point (``abexp`` itself, runner and sweep workers, gpu-check, bench, the test suite)
calls :func:`init_process_env` first, whatever its runs will ask for. It imports nothing heavy.
"""

from __future__ import annotations

import os

# torch's documented deterministic setting (docs: "Reproducibility", CUDA >= 10.2): eight 4 MiB
# cuBLAS workspaces per stream; ":16:8" is the other accepted value
CUBLAS_DETERMINISTIC = ":4096:8"


def init_process_env() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for the whole process (a value already set is kept)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
