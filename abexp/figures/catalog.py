"""The figures ``abexp figures`` draws for each experiment, one record each
(abexp.registry.FigureRecord): the module whose ``main(argv)`` draws it from a runs table.
A plugin adds its own with ``abexp.registry.FIGURES.add`` (docs/extending.md)."""

from __future__ import annotations

from abexp.registry import FIGURES, FigureRecord

for _name, _doc in (
        ("accuracy_vs_delay", "final test accuracy vs delay, one line per optimizer"),
        ("accuracy_vs_stages", "final test accuracy vs pipeline stages"),
        ("async_vs_model", "real asynchronous training against the delay models"),
        ("delay_drop", "the accuracy lost from D = 0 to a large delay, per optimizer"),
        ("drop_vs_length", "the accuracy lost to a delay against training length"),
        ("heatmaps", "lr x momentum heatmaps of final test accuracy"),
        ("paired", "paired comparison of every optimizer with a baseline, per delay"),
        ("rho_sensitivity", "AB's braking strength: accuracy vs rho"),
        ("staleness", "staleness histograms of real asynchronous runs"),
        ("tables", "Markdown and LaTeX tables of final test accuracy vs delay"),
        ("tuned_lr", "every optimizer at its own best learning rate, per delay")):
    FIGURES.add(_name, FigureRecord(f"abexp.figures.{_name}", _doc))
