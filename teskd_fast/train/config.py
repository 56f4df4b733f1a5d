"""Training configuration: one dataclass, the paper's recipes as presets, argparse flags generated from it.

Precedence, lowest first: the dataclass defaults, the preset (``--preset``), a YAML file (``--config``), then
the flags given on the command line. The resolved configuration is written to ``RUN_DIR/config.yaml``.

Batch size and learning rate: ``batch_size`` is the GLOBAL batch, summed over every process of a
``torchrun`` job; each of N processes loads ``batch_size / N`` images per step. ``lr`` is the learning rate
for that global batch, so a preset behaves the same on 1 GPU or 8. If you change the global batch, scale
the learning rate linearly (``lr * new_batch / preset_batch``, Goyal et al. 2017), with a warm-up for
large batches (``--warmup-epochs``).

The LR milestones are fractions of ``epochs``: ``(0.5, 0.75)`` with 200 epochs gives the published
decays at epochs 100 and 150, and ``--epochs 20`` keeps the schedule's shape (decays at 10 and 15).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

METHODS = ("teskd", "baseline")


def choices() -> dict[str, tuple[str, ...]]:
    """The fields with a fixed set of values, and those values: each set read from the registry that defines it.

    Datasets from :data:`teskd_fast.data.catalog.DATASETS`, ImageFolder loader backends from
    :data:`teskd_fast.data.imagenet.LOADER_BACKENDS`, architectures and stems from :mod:`teskd_fast.models.resnet`
    (and any ``timm/NAME``, :class:`teskd_fast.train.archs.ArchChoices`),
    formulations from :data:`teskd_fast.models.factory.FORMULATIONS`, schedules from
    :data:`teskd_fast.train.schedule.SCHEDULES`. The ``teskd-train`` choices and :func:`validate` read this.
    """
    from teskd_fast.data.catalog import DATASETS
    from teskd_fast.data.imagenet import LOADER_BACKENDS
    from teskd_fast.models.factory import FORMULATIONS
    from teskd_fast.models.resnet import ARCHS, STEMS
    from teskd_fast.train.archs import ArchChoices
    from teskd_fast.train.schedule import SCHEDULES

    return {
        "method": METHODS,
        "dataset": tuple(DATASETS),
        "stem": tuple(STEMS),
        "formulation": tuple(FORMULATIONS),
        "schedule": tuple(SCHEDULES),
        # torch.compile's modes (it refuses any other only when it compiles, deep in the first step)
        "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        "precision": ("auto", "bf16", "fp16", "fp32"),
        "loader": ("auto", *LOADER_BACKENDS),
        "arch": ArchChoices(ARCHS),
    }


# Fields a resumed run may change (``teskd-train --resume RUN --FIELD VALUE``): how long it runs, where and how
# it executes, where its data is, how it reports. Every other field changes what the run computes (the model,
# the data order, the loss, the schedule's shape), so a resume refuses a new value for it; ``--out`` is the
# resumed folder itself. A larger ``epochs`` extends the run: the schedule and progressive resizing follow the
# new total from where the run resumes, even inside an epoch. ``workers`` leaves the data order alone; it changes
# the random crops of the torchvision ImageNet loader, which a resume does not reproduce anyway.
CHANGEABLE_AT_RESUME = frozenset({
    "epochs", "data_dir", "download", "device", "compile", "compile_mode", "channels_last", "workers", "threads",
    "log_every", "report_after", "progress", "tensorboard", "plot", "dry_run",
})


def _f(default, help, **kw):
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run depends on. Every field is a ``--flag`` of ``teskd-train``."""

    preset: str = _f("digits-demo", "named recipe to start from (see --list-presets)")
    method: str = _f("teskd", "teskd: teacher + students + TESKD loss; baseline: the teacher alone with plain CE")
    dataset: str = _f("digits", "the dataset (digits: built in, nothing to download; imagenet: any ImageFolder tree)")
    data_dir: str = _f("", "where the dataset lives (default: ./data)")
    download: bool = _f(False, "download CIFAR with torchvision's downloader when it is missing")
    arch: str = _f("resnet18", "backbone: a torchvision ResNet of the list, or timm/NAME for any timm model "
                   "(pip install timm; --stem and --width apply to the ResNets only)")
    init: str = _f("", "start the teacher (backbone and head) from this local state_dict or checkpoint of the "
                   "plain model (timm, torchvision, a teacher.pt); a head of another class count is replaced")
    stem: str = _f("cifar", "cifar: 3x3 stride-1 conv, no max-pool; imagenet: torchvision's stem")
    formulation: str = _f("fast", "fast (same function, cheaper) or faithful (module for module as published)")
    width: float = _f(1.0, "channel multiplier of the network (for small demos)")
    student_width: int = _f(0, "channels of the students' path and heads (0: W, the published network; smaller "
                            "is cheaper, see the cost line)")
    student_levels: str = _f("3,2,1", "which students exist: a non-empty subset of 3,2,1 (3: the deepest; 1: the "
                             "finest and costliest), e.g. 3,2")
    epochs: int = _f(200, "number of epochs (a larger value at --resume extends a run)")
    batch_size: int = _f(128, "GLOBAL batch size, summed over all processes")
    lr: float = _f(0.1, "peak learning rate for the global batch")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "weight decay")
    bn_weight_decay: bool = _f(True, "apply weight decay to BatchNorm weights and all biases too")
    schedule: str = _f("multistep", "multistep (x lr_gamma at milestones), cosine or linear (to zero)")
    lr_milestones: tuple[float, ...] = _f((0.5, 0.75), "multistep milestones as fractions of --epochs")
    lr_gamma: float = _f(0.1, "multistep decay factor")
    warmup_epochs: float = _f(0.0, "linear warm-up from 0, per step, over this many epochs")
    temperature: float = _f(4.0, "distillation temperature T")
    ce_weight: float = _f(0.2, "alpha: weight of the cross-entropy of every head")
    kd_weight: float = _f(0.8, "beta: weight of the teacher-to-student KL divergence")
    feat_weight: float = _f(1e-7, "gamma: weight of the feature loss (a sum over batch and channels)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    cutmix_alpha: float = _f(0.0, "CutMix: Beta(alpha, alpha) of the kept area, per batch on the device (0: off)")
    cutmix_prob: float = _f(0.5, "CutMix: the probability that a batch is mixed (with --cutmix-alpha > 0)")
    image_size: int = _f(224, "training image size: ImageNet crop (final size when progressive), digits side")
    image_size_start: int = _f(0, "progressive resizing: first training size (0: off); ramps to --image-size")
    progressive_end: float = _f(0.85, "progressive resizing reaches --image-size at this fraction of the epochs")
    val_image_size: int = _f(224, "ImageNet validation centre crop")
    val_resize: int = _f(256, "ImageNet validation: shorter side resized to this before the centre crop")
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on the CPU), bf16, fp16 (with a grad scaler), fp32")
    compile: bool | None = _f(None, "torch.compile the model (default: on with CUDA)")
    compile_mode: str = _f("default", "torch.compile mode")
    channels_last: bool | None = _f(None, "channels_last memory format (default: on with CUDA)")
    loader: str = _f("auto", "ImageFolder loader backend (auto: dali if installed, else nvjpeg on CUDA, else "
                     "torchvision)")
    workers: int = _f(8, "data loading workers per process (ImageNet)")
    threads: int = _f(0, "CPU threads per process for PyTorch's intra-op parallelism (0: PyTorch's default)")
    seed: int = _f(27, "seed of the weights' initialisation and of the data order")
    sync_bn: bool = _f(False, "SyncBatchNorm across processes (CUDA only; turns torch.compile off)")
    out: str = _f("", "run folder (default: runs/<preset>-<method>-<time>)")
    resume: str = _f("", "continue the run in this folder from its last.pt. Only these flags may change: "
                     + ", ".join("--" + n.replace("_", "-") for n in sorted(CHANGEABLE_AT_RESUME))
                     + "; any other that differs from the run's is refused (exit status 2)")
    eval_only: str = _f("", "evaluate this checkpoint (last.pt, best.pt or teacher.pt) and exit")
    steps_per_epoch: int = _f(0, "cap the batches per epoch (0: the whole training set); for smoke runs")
    log_every: int = _f(50, "steps between progress bar updates (read without a device synchronisation)")
    report_after: float = _f(0.75, "also report the best teacher accuracy after this fraction of the epochs")
    progress: bool = _f(True, "show a tqdm progress bar")
    tensorboard: bool = _f(True, "write TensorBoard events when tensorboard is installed")
    plot: bool = _f(True, "draw RUN_DIR/curves.png at the end")
    dry_run: bool = _f(False, "build the data and the network, print the cost line (the students' "
                       "multiply-accumulates against the backbone's) and exit without training")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d


_CIFAR = dict(
    dataset="cifar100", stem="cifar", epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
    weight_decay=5e-4, bn_weight_decay=True, schedule="multistep", lr_milestones=(0.5, 0.75), lr_gamma=0.1,
    warmup_epochs=0.0, temperature=4.0, ce_weight=0.2, kd_weight=0.8, feat_weight=1e-7, label_smoothing=0.0,
    seed=27,
)
_IMAGENET = dict(
    dataset="imagenet", stem="imagenet", epochs=90, batch_size=256, lr=0.1, momentum=0.9, nesterov=False,
    weight_decay=1e-4, bn_weight_decay=True, schedule="multistep", lr_milestones=(1 / 3, 2 / 3), lr_gamma=0.1,
    warmup_epochs=0.0, temperature=4.0, ce_weight=0.2, kd_weight=0.8, feat_weight=1e-7, label_smoothing=0.0,
    image_size=224, image_size_start=0, val_image_size=224, val_resize=256, seed=27,
)
# Our own short ImageNet recipe (not the paper's), after published fast ResNet-18 anchors (docs/method.md):
# progressive 160 -> 192 px, label smoothing 0.1, no weight decay on BN and biases, a 2-epoch warm-up then a
# linear decay to zero, global batch 1024 with the lr scaled linearly, evaluation at 224 after resize 256.
_IMAGENET_FAST = dict(
    _IMAGENET, epochs=16, batch_size=1024, lr=2.0, weight_decay=5e-5, bn_weight_decay=False, schedule="linear",
    warmup_epochs=2.0, label_smoothing=0.1, image_size=192, image_size_start=160, progressive_end=0.85,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The built-in demo: scikit-learn's bundled digits (8x8 greyscale), a quarter-width ResNet-18 with the
    # CIFAR stem (stages at 8, 4, 2, 1 pixels); about a minute on 2 CPU cores.
    "digits-demo": dict(
        dataset="digits", arch="resnet18", stem="cifar", width=0.25, image_size=8, val_image_size=8, val_resize=8,
        epochs=20, batch_size=64, lr=0.05,
        momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0, temperature=4.0,
        ce_weight=0.2, kd_weight=0.8, feat_weight=1e-7, seed=27, log_every=10,
        # Its operations are tiny: one thread beats two on 2 cores, by far when other work shares them.
        threads=1,
    ),
    **{f"cifar100-{a}": dict(_CIFAR, arch=a) for a in ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")},
    **{f"imagenet-{a}": dict(_IMAGENET, arch=a) for a in ("resnet18", "resnet34", "resnet50")},
    "imagenet-resnet18-fast16-ours": dict(_IMAGENET_FAST, arch="resnet18"),
}

PRESET_HELP = {
    "digits-demo": "built-in demo on scikit-learn's digits, CPU, about a minute",
    **{f"cifar100-{a}": "the published CIFAR-100 recipe (docs/method.md), exactly"
       for a in ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")},
    **{f"imagenet-{a}": "the method's ImageNet recipe (torchvision's: 90 epochs, batch 256, lr 0.1, x0.1 every 30)"
       for a in ("resnet18", "resnet34", "resnet50")},
    "imagenet-resnet18-fast16-ours": "OUR fast recipe, not the paper's: 16 epochs, progressive 160->192 px, "
    "label smoothing 0.1, no BN weight decay, batch 1024",
}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the flag and the problem."""


def config_differences(stored: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = frozenset()) \
        -> list[str]:
    """``"field stored -> current"`` for every field outside ``ignore`` whose value differs (sorted by name).

    A field one side lacks shows as ``(unset)``; a list and a tuple of the same values are equal.
    """
    def plain(d: dict[str, Any]) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items() if k not in ignore}

    a, b = plain(stored), plain(current)
    return [f"{k} {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    """The annotated type with Optional stripped: (type, is_optional, is_tuple)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner, _, is_tuple = _base_type(args[0])
        return inner, True, is_tuple
    if origin is tuple:
        return typing.get_args(tp)[0], False, True
    return tp, False, False


_HINTS = typing.get_type_hints(TrainConfig)


class _ListPresets(argparse.Action):
    """``--list-presets``: print every preset with its description, and exit (as ``--help`` does)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for name in sorted(PRESETS):
            print(f"{name:<32} {PRESET_HELP.get(name, '')}")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    """The ``teskd-train`` parser: one flag per :class:`TrainConfig` field, defaults suppressed.

    Returns:
        an ``argparse.ArgumentParser`` whose namespace holds only the flags the user gave.
    """
    parser = argparse.ArgumentParser(
        prog="teskd-train",
        description="Train a TESKD network (or its same-recipe baseline). With no arguments: the built-in "
        "digits demo on the CPU.",
        epilog="The batch size is the global batch over all processes; scale --lr linearly with it. "
        "Multi-GPU: torchrun --nproc_per_node N -m teskd_fast.train --preset ...",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of field: value pairs (over the preset)")
    parser.add_argument("--list-presets", action=_ListPresets, help="list the presets and exit")
    allowed = choices()
    for f in fields(TrainConfig):
        tp, optional, is_tuple = _base_type(_HINTS[f.name])
        kw: dict[str, Any] = {"help": f.metadata["help"], "dest": f.name}
        if f.name in allowed:
            kw["choices"] = allowed[f.name]
        if f.name == "preset":
            kw["choices"] = sorted(PRESETS)
            kw["metavar"] = "NAME"
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif is_tuple:
            parser.add_argument(_flag(f.name), type=tp, nargs="+", metavar=tp.__name__.upper(), **kw)
        elif "metavar" in kw:
            parser.add_argument(_flag(f.name), type=tp, **kw)
        elif "choices" in kw:
            parser.add_argument(_flag(f.name), type=tp, metavar="{" + ",".join(kw["choices"]) + "}", **kw)
        else:
            parser.add_argument(_flag(f.name), type=tp, metavar=tp.__name__.upper(), **kw)
    return parser


def _coerce(name: str, value: Any) -> Any:
    tp, optional, is_tuple = _base_type(_HINTS[name])
    if value is None and optional:
        return None
    try:
        if is_tuple:
            values = value if isinstance(value, (list, tuple)) else [value]
            return tuple(tp(v) for v in values)
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise TypeError
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{_flag(name)}: expected {tp.__name__}, got {value!r}") from None


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config: a mapping of field names (``snake_case`` or ``kebab-case``) to values."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"--config {p}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {p}: not a text file (not UTF-8): expected a YAML mapping of field: value") \
            from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of field: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> TrainConfig:
    """Build a validated config from a preset (or ``base``) and overrides.

    Args:
        overrides: field -> value, applied last (YAML values, then flags, merged by the caller).
        base: a complete config dict to start from instead of the preset (used by ``--resume``).

    Returns:
        a :class:`TrainConfig` that passed :func:`validate`.
    """
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
    if base is None:
        preset = overrides.get("preset", TrainConfig.preset)
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
        values = {**PRESETS[preset], "preset": preset}
    else:
        values = {k: v for k, v in base.items() if k in names}
    values.update(overrides)
    from teskd_fast.train.archs import timm_defaults, timm_name

    if timm_name(str(values.get("arch", ""))) is not None and base is None:
        timm_defaults(values, overrides)
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Reject values that cannot work, with a message naming the flag. Raises :class:`ConfigError`."""
    for name, allowed in choices().items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{_flag(name)}: {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(f.name)}: must be a finite number, got {value}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"--momentum: must be in [0, 1), got {cfg.momentum}")
    _check_loss_options(cfg)
    positive = ("epochs", "batch_size", "lr", "width", "log_every")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{_flag(name)}: must be > 0, got {getattr(cfg, name)}")
    non_negative = ("momentum", "weight_decay", "warmup_epochs", "ce_weight", "kd_weight", "feat_weight",
                    "workers", "steps_per_epoch", "image_size_start", "threads", "cutmix_alpha")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_flag(name)}: must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.cutmix_prob <= 1.0:
        raise ConfigError(f"--cutmix-prob: must be in [0, 1], got {cfg.cutmix_prob}")
    if not 0.0 < cfg.lr_gamma <= 1.0:
        raise ConfigError(f"--lr-gamma: must be in (0, 1], got {cfg.lr_gamma}")
    ms = list(cfg.lr_milestones)
    if any(not 0.0 < m < 1.0 for m in ms) or ms != sorted(ms):
        raise ConfigError(f"--lr-milestones: fractions of --epochs, increasing, each in (0, 1); got {ms}")
    if not 0.0 <= cfg.report_after <= 1.0 or not 0.0 < cfg.progressive_end <= 1.0:
        raise ConfigError("--report-after must be in [0, 1] and --progressive-end in (0, 1]")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup-epochs ({cfg.warmup_epochs}) exceeds --epochs ({cfg.epochs})")
    for name in ("image_size", "val_image_size", "val_resize"):
        if getattr(cfg, name) < 8:
            raise ConfigError(f"{_flag(name)}: must be >= 8 pixels, got {getattr(cfg, name)}")
    if cfg.student_width < 0:
        raise ConfigError(f"--student-width: must be >= 0 (0: W, the published network), got {cfg.student_width}")
    student_levels(cfg)
    from teskd_fast.train.archs import check_timm_arch

    check_timm_arch(cfg)
    if cfg.val_resize < cfg.val_image_size:
        raise ConfigError(f"--val-resize ({cfg.val_resize}) must be >= --val-image-size ({cfg.val_image_size})")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {dev!r}")
    if cfg.resume and cfg.eval_only:
        raise ConfigError("--resume and --eval-only cannot be combined")
    if not 0 <= cfg.seed < 2**64:  # torch.manual_seed's range (and the data's SeedSequence keys)
        raise ConfigError(f"--seed: must be in [0, 2**64), got {cfg.seed}")


def student_levels(cfg: TrainConfig) -> tuple[int, ...]:
    """``--student-levels`` as a tuple of levels, deepest first (:class:`ConfigError` unless a subset of 3,2,1)."""
    from teskd_fast.models.teskd import check_student_levels

    text = str(cfg.student_levels).replace(" ", "")
    try:
        return check_student_levels([int(v) for v in text.split(",")])
    except ValueError:
        raise ConfigError(f"--student-levels: expected a non-empty subset of 3,2,1 separated by commas (e.g. 3,2), "
                          f"got {cfg.student_levels!r}") from None


def loss_fields() -> tuple[str, ...]:
    """The fields that are options of the loss: those named as a field of
    :class:`teskd_fast.loss.options.LossOptions` (a new loss option becomes a flag by a field of that name here)."""
    from teskd_fast.loss.options import LossOptions

    names = {f.name for f in fields(TrainConfig)}
    return tuple(name for name in LossOptions._fields if name in names)


def _check_loss_options(cfg: TrainConfig) -> None:
    """The loss's own check of its options (LossOptions.checked), its ValueError as a ConfigError naming the flag."""
    from teskd_fast.loss.options import LossOptions

    for name in loss_fields():
        try:
            LossOptions.checked(**{name: getattr(cfg, name)})
        except ValueError as e:
            raise ConfigError(f"{_flag(name)}: {str(e).removeprefix(name + ': ')}") from None
