"""``teskd-compare``: TESKD against the baselines that matter over several seeds, each difference with its
uncertainty, and what each arm costs.

Examples::

    teskd-compare                                   # the digits demo on the CPU, 2 seeds, a few minutes
    teskd-compare --arms teskd,baseline,label-smoothing,cutmix --seeds 2             # four arms, 8 runs
    teskd-compare --preset cifar100-resnet18 --data-dir data/          # 3 seeds x (TESKD, baseline)
    teskd-compare --preset cifar100-resnet18 --seeds 5 --epochs 100 --out runs/c100-short
    teskd-compare --report-only runs/c100-short     # the report again, from the run folders alone
    torchrun --nproc_per_node 8 -m teskd_fast.train.compare --preset imagenet-resnet18 --data-dir /imagenet

Every ``teskd-train`` flag is accepted and applies to every run, except ``--method`` (the arms set it),
``--resume`` and ``--eval-only`` (the comparison manages its runs). ``--seed S`` is the first seed; the runs
use seeds ``S, S + 1, ..., S + N - 1``. An arm is a named change to that shared configuration
(:data:`.options.BUILTIN_ARMS`: ``teskd``, ``baseline``, ``label-smoothing``, ``cutmix``, ``teskd+cutmix``; others
from ``--arms-file`` as ``name: {field: value}``); ``--arms`` chooses them (default ``teskd,baseline``), the first
is the reference. For each seed, every arm's run (the same initial teacher weights and data order when the
arms share the network and the batching) is trained one after the other, each into an ordinary ``teskd-train``
run folder. ``OUT`` (default ``runs/compare-<preset>``) holds:

- ``config.yaml``: the seeds, the shared training configuration and the arms, checked when the command is run
  again (and read by ``--report-only``);
- ``<arm>-seed<S>/`` (``teskd-seed<S>/``, ``baseline-seed<S>/``, ...): the run folders;
- ``compare.md``, ``compare.json``: the shared recipe; what each arm shares with the reference; per seed and arm
  the teacher's top-1 at the last epoch (the primary figure) and by the published code's rule (the best after
  epoch ``round(report_after * epochs)`` of the reference arm: chosen on the test set, shown but not tested),
  the students' and the ensemble's top-1 at the last epoch, the run's time, images/s and device hours; per arm
  the mean and sample standard deviation over seeds; per other arm the paired difference reference minus it
  with its Student's t 95% interval, its p-value and the Holm-adjusted verdict across the comparisons (none from
  fewer than 3 paired seeds or from differences without spread, saying why); the cost (points per extra device
  hour against the cheapest arm, where the extra time is above its noise); the paper's figures in rows of their
  own for the presets that reproduce a published table; the runs left out (unfinished, or metrics that cannot be
  used), each with its reason;
- ``compare.png``: per arm the teacher's test top-1 per epoch (the mean with a +-1 std band), and each seed's
  top-1 with the arm's interval against its run time.

Running the same command again continues where it stopped: a finished run (its summary.json written) is
reused, an interrupted one continues from its last.pt (``teskd-train --resume``, exact on the CPU), and nothing
is trained twice; a new arm trains only its runs. A changed training configuration, or a changed arm, is refused
with a message naming the fields that differ;
flags that do not change what a run computes (``--device``, ``--data-dir``, ``--progress``, ``--plot``, ...)
may change. A different ``--seeds`` adds seeds (or reports over the first N); the others are kept.

Under ``torchrun`` every process runs this command: each run uses all ranks, one run after another, and only
rank 0 writes files. OUT must be on a filesystem every rank sees (as ``teskd-train --resume`` needs).

Exit status: 0 done; 1 missing data, an unreadable run folder, or a report that leaves a run out
(unfinished, or metrics cut short, unreadable or not finite: the report is written over the other runs and names
it); 2 a bad flag, an arm whose runs' command line teskd-train would refuse, or a changed configuration; 3 a
non-finite loss; 128 + signal number when a run was stopped (rerun the command to continue).

The package, by job: :mod:`.options` parses the command line into a :class:`Comparison`; :mod:`.runs` refuses a
changed configuration and trains the runs in turn; :mod:`.report` reads the runs and writes the statistics
(compare.json, compare.md); :mod:`.plot` draws compare.png.
"""

from __future__ import annotations

import os
import sys
import time

from teskd_fast.train.compare.options import CompareError, Comparison, Run, build_compare_parser, parse
from teskd_fast.train.compare.report import read_run, render_markdown, summarise, write_report
from teskd_fast.train.compare.runs import check_command_lines, check_configuration, execute, write_record
from teskd_fast.train.exit_status import DATA, DONE, INTERRUPTED

__all__ = [
    "CompareError",
    "Comparison",
    "Run",
    "build_compare_parser",
    "check_command_lines",
    "check_configuration",
    "execute",
    "main",
    "parse",
    "read_run",
    "render_markdown",
    "summarise",
    "write_record",
    "write_report",
]


def _left_out_status(report: dict) -> int:
    """1 when the report left a run out (unfinished, or metrics that cannot be used), else 0."""
    if report["left_out"]:
        print(f"teskd-compare: the report leaves out {len(report['left_out'])} run(s) (see above and the end of "
              f"compare.md); exit status {DATA}", file=sys.stderr)
        return DATA
    return DONE


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``teskd-compare`` and ``python -m teskd_fast.train.compare``; returns the exit status."""
    cmp = parse(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    t0 = time.perf_counter()
    try:
        if cmp.report_only:
            return _left_out_status(write_report(cmp)) if is_main else DONE
        check_configuration(cmp)
        check_command_lines(cmp)
        if is_main:
            write_record(cmp)
        status = execute(cmp, is_main)
        if status or not is_main:
            return status
        status = _left_out_status(write_report(cmp))
        if status:
            return status
    except CompareError as e:
        if is_main:
            print(f"teskd-compare: {e}", file=sys.stderr)
        return e.status
    except OSError as e:
        # OUT not writable, a file where a folder should be, a disk full.
        print(f"teskd-compare: {e}", file=sys.stderr)
        return DATA
    except KeyboardInterrupt:
        print("\nteskd-compare: interrupted; run the same command again to continue", file=sys.stderr)
        return INTERRUPTED
    print(f"teskd-compare: {len(cmp.runs)} runs in {cmp.out}; this invocation took {time.perf_counter() - t0:.0f} s")
    return DONE
