"""``teskd-compare``'s command line: its parser (``teskd-train``'s plus ``--seeds``, ``--arms``, ``--arms-file``,
``--report-only``), the arms, the parsed :class:`Comparison`."""

from __future__ import annotations

import argparse
import re
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from teskd_fast.train.config import (
    CHANGEABLE_AT_RESUME,
    ConfigError,
    TrainConfig,
    build_parser,
    load_yaml,
    resolve,
)

# The built-in arms: each a named change to the resolved configuration (the flags every run gets). CutMix's
# CIFAR recipe (Yun et al. 2019): alpha 1.0, each batch mixed with probability 0.5.
CUTMIX = {"cutmix_alpha": 1.0, "cutmix_prob": 0.5}
BUILTIN_ARMS: dict[str, dict[str, Any]] = {
    "teskd": {"method": "teskd"},
    "baseline": {"method": "baseline"},
    "label-smoothing": {"method": "baseline", "label_smoothing": 0.1},
    "cutmix": {"method": "baseline", **CUTMIX},
    "teskd+cutmix": {"method": "teskd", **CUTMIX},
    # A cheaper TESKD: students 128 wide, the two deepest levels (ResNet-18 at 32 px: 0.048x the backbone's
    # multiply-accumulates against the published students' 2.2x; docs/networks.md).
    "teskd-lite": {"method": "teskd", "student_width": 128, "student_levels": "3,2"},
}
DEFAULT_ARMS = ("teskd", "baseline")
# An arm's name is its run folders' prefix (<arm>-seed<S>).
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
# Seeds per comparison when --seeds is not given: the paper's presets 3, the CPU demo 2 (its 4-minute budget).
DEFAULT_SEEDS = {"digits-demo": 2}
DEFAULT_SEEDS_OTHER = 3
# Fields that a rerun may change: those ``teskd-train --resume`` accepts (they choose where and how a run executes,
# or how it is reported, not what it computes) except the number of epochs, which the report is about, plus the
# fields the comparison itself sets per run.
NOT_COMPARED = (CHANGEABLE_AT_RESUME - {"epochs"}) | {"method", "out", "resume", "eval_only"}
# Fields an arm may not set: where its runs go and which seeds they use belong to the comparison, a preset would
# replace the whole recipe, and a field that does not change what a run computes is a flag of every run.
NOT_ARM_FIELDS = (NOT_COMPARED - {"method"}) | {"seed", "preset"}


def arm_label(arm: str) -> str:
    """The arm's name in the report: ``TESKD`` for ``teskd``, else the name itself."""
    return "TESKD" if arm == "teskd" else arm


class CompareError(RuntimeError):
    """A run folder that cannot be used; ``status`` is the exit status (:mod:`teskd_fast.train.exit_status`: DATA
    unreadable, CONFIG a changed configuration)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Run:
    """One training run of the comparison."""

    seed: int
    arm: str
    folder: Path
    cfg: TrainConfig

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def method(self) -> str:
        """``teskd`` or ``baseline``: what the arm's configuration trains."""
        return self.cfg.method


@dataclass(frozen=True)
class Comparison:
    """The parsed command: where it goes, the seeds, the arms (name -> their change; the first is the reference),
    the runs (seed by seed, arm by arm) and the ``teskd-train`` flags shared by all."""

    out: Path
    base: TrainConfig
    seeds: tuple[int, ...]
    runs: tuple[Run, ...]
    train_argv: tuple[str, ...]
    arms: dict[str, dict[str, Any]] = field(default_factory=lambda: {a: BUILTIN_ARMS[a] for a in DEFAULT_ARMS})
    report_only: bool = False

    @property
    def reference(self) -> str:
        return next(iter(self.arms))


def build_compare_parser() -> argparse.ArgumentParser:
    """``teskd-train``'s parser, renamed, with ``--seeds`` added and ``--out`` / ``--seed`` re-described."""
    parser = build_parser()
    parser.prog = "teskd-compare"
    parser.description = ("Train TESKD and the baselines that matter (arms) for several seeds and report each paired "
                          "difference with its 95% confidence interval and what each arm costs. With no arguments: "
                          "TESKD against its baseline on the digits demo on the CPU, 2 seeds.")
    parser.epilog = ("Every teskd-train flag applies to every run. Rerunning the same command continues it. "
                     "Multi-GPU: torchrun --nproc_per_node N -m teskd_fast.train.compare --preset ...")
    # Exact flag names only: --seed (the first seed) and --seeds (how many) must never be taken for each other.
    parser.allow_abbrev = False
    parser.add_argument("--seeds", type=int, metavar="N",
                        help=f"number of seeds (default {DEFAULT_SEEDS_OTHER}; {DEFAULT_SEEDS['digits-demo']} for "
                        "digits-demo)")
    parser.add_argument("--arms", metavar="A,B,...",
                        help="the arms, the first the reference (default teskd,baseline); built in: "
                        + ", ".join(BUILTIN_ARMS) + "; others from --arms-file")
    parser.add_argument("--arms-file", metavar="FILE.yaml",
                        help="YAML file of arms, name: {field: value} (a change to the shared configuration)")
    parser.add_argument("--report-only", metavar="OUT",
                        help="rebuild OUT's report (compare.md, compare.json, compare.png) from its run folders "
                        "alone, training nothing")
    actions = parser._option_string_actions
    actions["--out"].help = "the comparison's folder (default: runs/compare-<preset>)"
    actions["--seed"].help = "the first seed: the runs use seeds SEED, SEED+1, ... (default: the preset's)"
    actions["--method"].help = "not accepted: an arm sets it (--arms)"
    actions["--resume"].help = "not accepted: run the same teskd-compare command again to continue"
    actions["--eval-only"].help = "not accepted"
    return parser


COMPARE_FLAGS = ("--seeds", "--arms", "--arms-file", "--report-only")


def _strip_compare_flags(argv: list[str]) -> list[str]:
    """``argv`` without the comparison's own flags (``--seeds N``, ``--arms=A,B``, ...): the rest is what every
    run's ``teskd-train`` gets."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok in COMPARE_FLAGS:
            skip = True
        elif not tok.startswith(tuple(f + "=" for f in COMPARE_FLAGS)):
            out.append(tok)
    return out


def _load_arms_yaml(path: str) -> Any:
    """``--arms-file``'s YAML, every mapping key kept as the text it is: a key YAML would read as another value
    (``off`` as False, ``1_000`` as 1000, ``null``) and a key given twice are refused by name and line."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Loader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key, _ in node.value:
            line = key.start_mark.line + 1
            if key.tag == "tag:yaml.org,2002:merge":
                continue
            if not (isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:str"):
                read = loader.construct_object(key, deep=True)
                raise ConfigError(f"--arms-file {path}: line {line}: the name {key.value!r} is read by YAML as "
                                  f"{read!r} ({type(read).__name__}), not as the text {key.value!r}; quote it: "
                                  f"'{key.value}':")
            if key.value in seen:
                raise ConfigError(f"--arms-file {path}: line {line}: {key.value!r} is given twice (first on line "
                                  f"{seen[key.value]}); each name once")
            seen[key.value] = line
        return loader.construct_mapping(node, deep=True)

    Loader.add_constructor("tag:yaml.org,2002:map", mapping)
    try:
        return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=Loader)  # a SafeLoader: plain data only
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--arms-file {path}: cannot be read as YAML ({e})") from None


def _check_value_types(where: str, change: dict[str, Any]) -> None:
    """A value of a type its field cannot take as a ``teskd-train`` flag: a YAML boolean for a number or a text
    (``lr: true`` would become the flag ``--lr`` with no value), an empty list (``--lr-milestones`` with none)."""
    hints = typing.get_type_hints(TrainConfig)
    for name, value in change.items():
        if name not in hints:
            continue  # an unknown field: resolve() names it
        hint = hints[name]
        is_tuple = typing.get_origin(hint) is tuple
        kinds = typing.get_args(hint)[:1] if is_tuple else (typing.get_args(hint) or (hint,))
        values = value if is_tuple and isinstance(value, (list, tuple)) else [value]
        if bool not in kinds and any(isinstance(v, bool) for v in values):
            wanted = " or ".join(k.__name__ for k in kinds if k is not type(None))
            raise ConfigError(f"{where}: {name}: {value!r} holds a YAML boolean, not a {wanted}")
        if isinstance(value, (list, tuple)) and not value:
            raise ConfigError(f"{where}: {name}: an empty list cannot be given as {'--' + name.replace('_', '-')} "
                              "(it takes one value or more)")


def read_arms(path: str | None) -> dict[str, dict[str, Any]]:
    """The built-in arms and those of ``--arms-file`` (name: {field: value}), each change checked."""
    arms = dict(BUILTIN_ARMS)
    if path is None:
        return arms
    data = _load_arms_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--arms-file {path}: expected a mapping of name: {{field: value}}")
    for name, change in data.items():
        where = f"--arms-file {path}: arm {name!r}"
        if name in BUILTIN_ARMS:
            raise ConfigError(f"{where} is a built-in arm; give yours another name")
        if not ARM_NAME.fullmatch(name):
            raise ConfigError(f"{where}: a name is letters, digits and _ . + - (it names the run folders)")
        if not isinstance(change, dict) or not change:
            raise ConfigError(f"{where}: expected a mapping of field: value, got {change!r}")
        arms[name] = {k.replace("-", "_"): v for k, v in change.items()}
        if len(arms[name]) != len(change):
            raise ConfigError(f"{where}: a field is given twice (as snake_case and kebab-case)")
        if None in arms[name].values():
            raise ConfigError(f"{where}: a value is missing (null); an arm gives each field it changes a value")
        _check_value_types(where, arms[name])
    for name, change in arms.items():
        refused = sorted(set(change) & NOT_ARM_FIELDS)
        if refused:
            raise ConfigError(f"--arms-file {path}: arm {name!r} sets {', '.join(refused)}: an arm changes what its "
                              "runs compute; give where and how they run as flags of every run")
    return arms


def choose_arms(names: str | None, known: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``--arms A,B,...`` -> {name: change} in that order (at least two, no repeat, each known)."""
    chosen = [a.strip() for a in names.split(",")] if names is not None else list(DEFAULT_ARMS)
    unknown = [a for a in chosen if a not in known]
    if unknown:
        raise ConfigError(f"--arms: unknown arm(s) {', '.join(map(repr, unknown))}; choose from "
                          f"{', '.join(known)} (others from --arms-file)")
    if len(chosen) < 2 or len(set(chosen)) != len(chosen):
        raise ConfigError(f"--arms: at least two different arms, the first the reference; got {names!r}")
    return {a: known[a] for a in chosen}


def arm_flags(change: dict[str, Any]) -> list[str]:
    """An arm's change as ``teskd-train`` flags (given after the shared ones, so that they override them)."""
    argv = []
    for name, value in change.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse(argv: list[str] | None) -> Comparison:
    """Parse and validate the command line; a bad flag exits with status 2 and a message naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_compare_parser()
    given = vars(parser.parse_args(argv))
    n_seeds = given.pop("seeds", None)
    arm_names, arms_file, report_only = given.pop("arms", None), given.pop("arms_file", None), given.pop(
        "report_only", None)
    try:
        overrides = load_yaml(given.pop("config")) if "config" in given else {}
        overrides.update(given)
        for name in ("method", "resume", "eval_only"):
            if name in overrides:
                raise ConfigError(f"--{name.replace('_', '-')} is not accepted: "
                                  + ("an arm sets it (--arms)" if name == "method" else
                                     "teskd-compare manages its runs; run the same command again to continue"))
        if report_only is not None:
            if overrides or n_seeds is not None or arm_names is not None or arms_file is not None:
                raise ConfigError("--report-only OUT takes no other flag: the report is rebuilt from OUT's record "
                                  "(config.yaml) and run folders")
            return stored_comparison(Path(report_only))
        arms = choose_arms(arm_names, read_arms(arms_file))
        base = resolve({**overrides, "method": "teskd"})
        if n_seeds is None:
            n_seeds = DEFAULT_SEEDS.get(base.preset, DEFAULT_SEEDS_OTHER)
        if n_seeds < 1:
            raise ConfigError(f"--seeds: must be >= 1, got {n_seeds}")
        out = Path(base.out) if base.out else Path("runs") / f"compare-{base.preset}"
        seeds = tuple(base.seed + i for i in range(n_seeds))
        runs = make_runs(out, overrides, arms, seeds)
    except ConfigError as e:
        parser.error(str(e))  # exits with status 2 (exit_status.CONFIG)
    return Comparison(out, base, seeds, runs, tuple(_strip_compare_flags(argv)), arms)


def make_runs(out: Path, overrides: dict[str, Any], arms: dict[str, dict[str, Any]], seeds) -> tuple[Run, ...]:
    """Seed by seed, arm by arm: the arm's change over the shared configuration, in ``OUT/<arm>-seed<S>``."""
    runs = []
    for seed in seeds:
        for arm, change in arms.items():
            folder = out / f"{arm}-seed{seed}"
            try:
                cfg = resolve({**overrides, **change, "seed": seed, "out": str(folder)})
            except ConfigError as e:
                raise ConfigError(f"arm {arm!r} ({change}): {e}") from None
            runs.append(Run(seed, arm, folder, cfg))
    return tuple(runs)


def stored_comparison(out: Path) -> Comparison:
    """``--report-only OUT``: the comparison that OUT/config.yaml records (its seeds, arms and configuration)."""
    import yaml

    record = out / "config.yaml"
    try:
        data = yaml.safe_load(record.read_text())
        train, seeds = dict(data["train"]), tuple(int(s) for s in data["seeds"])
        arms = {str(k): dict(v) for k, v in data.get("arms", {a: BUILTIN_ARMS[a] for a in DEFAULT_ARMS}).items()}
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--report-only {out}: {record} does not hold a comparison's record ({e})") from None
    overrides = {k: v for k, v in train.items() if k in {f.name for f in fields(TrainConfig)}}
    base = resolve({**overrides, "method": "teskd", "out": str(out)})
    return Comparison(out, base, seeds, make_runs(out, overrides, arms, seeds), (), arms, report_only=True)


def config_record(cmp: Comparison) -> dict[str, Any]:
    """OUT/config.yaml: the seeds, the training configuration shared by every run, and the arms' changes."""
    train = {k: v for k, v in cmp.base.to_dict().items() if k not in ("method", "out", "resume", "eval_only")}
    return {"seeds": list(cmp.seeds), "train": train, "arms": {a: dict(c) for a, c in cmp.arms.items()}}
