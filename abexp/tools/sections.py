"""Measurement sections that fail alone: one section's exception or overrun costs only its own
figure, never the others' (``make bench``, ``make gpu-check``).

Each section runs under a wall-clock limit (SIGALRM, main thread only: elsewhere it runs
unlimited); an exception or an overrun is recorded as that section's one-line error, and the
caller's ``save`` runs after every section, so a report on disk always holds what finished.
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from typing import Any, Callable


class SectionTimeout(Exception):
    """A section ran past its limit."""


def error_line(err: BaseException) -> str:
    """As a traceback's last line says it: ``ValueError: ...`` (its first line only)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def run_section(fn: Callable[[], Any], limit_s: float | None) -> tuple[Any, str | None, str | None]:
    """(result, error line, full traceback): the result is None when the section failed."""
    timed = limit_s is not None and threading.current_thread() is threading.main_thread()
    if timed:
        def overrun(signum, frame):
            raise SectionTimeout(f"stopped after its limit of {limit_s:g} s")
        previous = signal.signal(signal.SIGALRM, overrun)
        signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        try:
            result = fn()
        finally:  # an alarm due right now is raised here, still inside the outer try
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return result, None, None
    except Exception as err:  # noqa: BLE001 - recorded as the section's failure
        return None, error_line(err), traceback.format_exc()
    finally:
        if timed:
            signal.signal(signal.SIGALRM, previous)


def run_sections(sections: list[tuple[str, Callable[[], Any], float | None]], report: dict,
                 save: Callable[[dict], None], log: Callable[[str], None] = lambda m: None) -> dict:
    """Run ``(name, fn, limit_s)`` in order into ``report[name]``; a failure goes to
    ``report["failed"][name]`` (one line), every section's seconds to ``report["seconds"]``;
    ``save(report)`` after each. Returns ``report``."""
    report.setdefault("failed", {})
    report.setdefault("seconds", {})
    for name, fn, limit_s in sections:
        start = time.perf_counter()
        result, line, trace = run_section(fn, limit_s)
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        if line is None:
            report[name] = result
        else:
            report["failed"][name] = line
            log(trace or line)
        log(f"{name}: {report['seconds'][name]} s, {'FAILED: ' + line if line else 'done'}")
        save(report)
    return report
