"""Figures and tables for a paper, from a results folder alone (``abexp figures``): one module
per figure, each also runnable as ``python -m abexp.figures.NAME``. May import abexp.lab (the
collected tables, sweep studies) and abexp.sim (the quadratic stability tables); only the CLI
imports it."""
