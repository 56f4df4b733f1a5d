"""The exit statuses of ``teskd-train`` and ``teskd-compare``: the one table both commands return from.

The commands' ``except`` chains return these names, never a number; their docstrings and the docs' tables
(docs/training.md, docs/comparing.md) are checked against :data:`TRAIN` and :data:`COMPARE` (tests/test_train_cli.py):
each entry there starts with its ``meaning`` here, and lists the same statuses.
"""

from __future__ import annotations

import signal
from typing import NamedTuple


class ExitStatus(NamedTuple):
    code: int
    meaning: str  # the start of its entry in a docstring or a docs table, which goes on with the details


# teskd-train: name -> (status, meaning).
TRAIN: dict[str, ExitStatus] = {
    "done": ExitStatus(0, "done"),
    "data": ExitStatus(1, "missing or unusable data, or an unusable checkpoint"),
    "config": ExitStatus(2, "a bad flag or configuration"),
    "nonfinite": ExitStatus(3, "a non-finite loss"),
    "outside": ExitStatus(4, "the run could not go on for a reason outside it"),
}
# teskd-compare: its runs' statuses pass through (a run's 2, 3 or signal status is the command's).
COMPARE: dict[str, ExitStatus] = {
    "done": ExitStatus(0, "done"),
    "data": ExitStatus(1, "missing data, an unreadable run folder, or a report that leaves a run out"),
    "config": ExitStatus(2, "a bad flag"),
    "nonfinite": ExitStatus(3, "a non-finite loss"),
}
# Stopped by a signal (SIGTERM, Ctrl-C): 128 + its number, as a shell reports a process a signal killed.
SIGNAL_BASE = 128

DONE = TRAIN["done"].code
DATA = TRAIN["data"].code
CONFIG = TRAIN["config"].code
NONFINITE = TRAIN["nonfinite"].code
OUTSIDE = TRAIN["outside"].code
assert all(COMPARE[name].code == TRAIN[name].code for name in COMPARE), "the two commands share their statuses"


def stopped_by(signum: int) -> int:
    """The status of a command stopped by signal ``signum``: ``128 + signum`` (143 for SIGTERM, 130 for SIGINT)."""
    return SIGNAL_BASE + int(signum)


INTERRUPTED = stopped_by(signal.SIGINT)  # a Ctrl-C
