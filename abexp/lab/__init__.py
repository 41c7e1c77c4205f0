"""Many runs: specs expanded into grids, workers that claim each run exactly once (locally, on
SLURM, across hosts on a shared filesystem), Optuna sweeps and the results table. Imports
``abexp.train`` and below; never ``abexp.tools``."""
