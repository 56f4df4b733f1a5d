"""The comparison's runs: the refusal of a changed configuration, each run's state, training them in turn."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from teskd_fast.train.checkpoint import atomic_write_text
from teskd_fast.train.compare.options import (
    NOT_COMPARED,
    CompareError,
    Comparison,
    Run,
    arm_flags,
    arm_label,
    config_record,
)
from teskd_fast.train.config import ConfigError, TrainConfig, build_parser, config_differences, load_yaml, resolve
from teskd_fast.train.exit_status import CONFIG, DATA, DONE
from teskd_fast.train.report import finished
from teskd_fast.train.runfolder import complete_config, read_config_yaml


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        return read_config_yaml(path)
    except RuntimeError as e:
        raise CompareError(str(e), DATA) from None


def check_configuration(cmp: Comparison) -> None:
    """Refuse (:class:`CompareError`, status 2) a comparison folder or run folder made with another configuration,
    or an arm whose change differs from the one recorded under its name. A new arm is not a change."""
    record = cmp.out / "config.yaml"
    refusals, record_diffs, same = [], [], []
    if record.is_file():
        data = _read_yaml(record)
        record_diffs = config_differences(complete_config(data.get("train", {})), config_record(cmp)["train"],
                                          NOT_COMPARED)
        if record_diffs:
            refusals.append(f"{record}: {'; '.join(record_diffs)}")
        for arm, change in (data.get("arms") or {}).items():
            if arm in cmp.arms and config_differences(change, cmp.arms[arm]):
                refusals.append(f"{record}: arm {arm!r}: {'; '.join(config_differences(change, cmp.arms[arm]))}")
    for run in cmp.runs:
        run_config = run.folder / "config.yaml"
        if run_config.is_file():
            diffs = config_differences(complete_config(_read_yaml(run_config)), run.cfg.to_dict(), NOT_COMPARED)
            if diffs and diffs == record_diffs:
                same.append(run.name)
            elif diffs:
                refusals.append(f"{run_config}: {'; '.join(diffs)}")
    if same:
        refusals.insert(1, f"the same in its run folders {', '.join(same)}")
    if refusals:
        raise CompareError(
            f"{cmp.out} holds a comparison made with another configuration; the fields that differ (stored -> "
            "now):\n  " + "\n  ".join(refusals)
            + "\nRerun with the flags it was started with to continue it, or choose another --out.", CONFIG)


def write_record(cmp: Comparison) -> None:
    """OUT/config.yaml: the seeds, the shared configuration and the arms of this invocation (``--report-only``
    rebuilds its report; an arm left out keeps its run folders, each with its config.yaml)."""
    import yaml

    atomic_write_text(cmp.out / "config.yaml", yaml.safe_dump(config_record(cmp), sort_keys=False))


def run_state(run: Run) -> str:
    """``"done"`` (summary.json for all its epochs and every file it lists), ``"resume"`` (a last.pt to continue
    from, or to finish from: a run killed during its final export is completed without training) or ``"new"``."""
    if finished(run.folder, run.cfg.epochs):
        return "done"
    return "resume" if (run.folder / "last.pt").is_file() else "new"


def train_argv(cmp: Comparison, run: Run, state: str) -> list[str]:
    """The ``teskd-train`` command line of one run: the shared flags, then the run's arm, seed and folder."""
    # --out last: it overrides the comparison's own --out among the shared flags (a resume accepts its own folder).
    where = (["--resume", str(run.folder)] if state == "resume" else []) + ["--out", str(run.folder)]
    return [*cmp.train_argv, *arm_flags(cmp.arms[run.arm]), "--seed", str(run.seed), *where]


def _parse_train_argv(argv: list[str]) -> TrainConfig:
    """``teskd-train``'s parsing of a new run's command line (its flags, its --config file, :func:`resolve`'s
    checks), a refusal raised as :class:`ConfigError` instead of exiting."""
    parser = build_parser()

    def refuse(message: str):
        raise ConfigError(message)

    parser.error = refuse
    given = vars(parser.parse_args(argv))
    overrides = load_yaml(given.pop("config")) if "config" in given else {}
    overrides.update(given)
    return resolve(overrides)


def check_command_lines(cmp: Comparison) -> None:
    """Refuse (:class:`CompareError`, status 2) before anything trains a run whose ``teskd-train`` command line
    would be refused, or would compute another configuration than the one the comparison built for it (a value
    that does not survive being written as a flag), and a new run whose ``--init`` file is not a file."""
    for run in cmp.runs:
        where = f"arm {run.arm!r} ({_change(cmp.arms[run.arm])}), run {run.folder}"
        argv = train_argv(cmp, run, "new")
        try:
            cfg = _parse_train_argv(argv)
        except ConfigError as e:
            raise CompareError(f"{where}: its teskd-train command line is refused: {e}\n  the command line: "
                               f"{' '.join(argv)}", CONFIG) from None
        diffs = config_differences(run.cfg.to_dict(), cfg.to_dict())
        if diffs:
            raise CompareError(f"{where}: its teskd-train command line gives another configuration than the "
                               f"comparison's (comparison -> command line): {'; '.join(diffs)}", CONFIG)
        if cfg.init and run_state(run) == "new" and not Path(cfg.init).is_file():
            what = "a folder" if Path(cfg.init).is_dir() else "no such file"
            raise CompareError(f"{where}: --init {cfg.init}: {what} (a state_dict or checkpoint file)", CONFIG)


def _change(change: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v!r}" for k, v in change.items())


def execute(cmp: Comparison, is_main: bool) -> int:
    """Train the runs that are not finished, one after another; returns 0 or the first failing run's status."""
    from teskd_fast.train import distributed
    from teskd_fast.train.cli import main as train_main

    with distributed.keep_process_group():
        return _execute(cmp, is_main, train_main)


def _execute(cmp: Comparison, is_main: bool, train_main) -> int:
    for i, run in enumerate(cmp.runs, 1):
        state = run_state(run)
        if is_main:
            what = {"done": "finished, reused", "resume": "resuming from its last.pt", "new": "training"}[state]
            print(f"teskd-compare: [{i}/{len(cmp.runs)}] {arm_label(run.arm)} seed {run.seed}: {what} "
                  f"({run.folder})", flush=True)
        if state == "done":
            continue
        try:
            status = train_main(train_argv(cmp, run, state))
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else CONFIG
        if status:
            if is_main:
                print(f"teskd-compare: the run in {run.folder} stopped with status {status}; the finished runs are "
                      "kept: run the same command again to continue", file=sys.stderr)
            return status
    return DONE
