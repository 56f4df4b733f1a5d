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
import difflib
import math
import statistics
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from teskd_fast.kernels.options import SPEC, LossOptions
from teskd_fast.train.archs import ArchChoices, timm_defaults, timm_name
from teskd_fast.train.schedule import SCHEDULES

METHODS = ("teskd", "baseline")


def choices() -> dict[str, tuple[str, ...]]:
    """The fields with a fixed set of values, and those values: each set read from the registry that defines it.

    Datasets from :data:`teskd_fast.data.catalog.DATASETS`, ImageFolder loader backends from
    :data:`teskd_fast.data.imagenet.LOADER_BACKENDS`, architectures and stems from :mod:`teskd_fast.models.resnet`
    (and any ``timm/NAME``, :class:`teskd_fast.train.archs.ArchChoices`),
    formulations from :data:`teskd_fast.models.factory.FORMULATIONS`, schedules from
    :data:`teskd_fast.train.schedule.SCHEDULES`. The ``teskd-train`` choices and :func:`validate` read this.
    """
    # Imported here, not at the top: these registries' modules load torch, which the configuration does not need.
    from teskd_fast.data.catalog import DATASETS
    from teskd_fast.data.imagenet import LOADER_BACKENDS
    from teskd_fast.models.factory import FORMULATIONS
    from teskd_fast.models.resnet import ARCHS, STEMS

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
        "folder_augment": ("auto", "rrc", "pad-crop"),
        "opt": ("sgd", "adamw"),
        "export": ("raw", "ema"),
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
    "log_every", "report_after", "progress", "tensorboard", "plot", "export", "dry_run",
})


def _f(default, help, **kw):
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda d=tuple(default): d, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _loss_option(name: str):
    """The field of the loss option ``name``: its default and help are the specification's (kernels/options.py)."""
    option = next(o for o in SPEC if o.name == name)
    return _f(option.default, option.help)


@dataclass
class TrainConfig:
    """Everything a training run depends on. Every field is a ``--flag`` of ``teskd-train``."""

    preset: str = _f("digits-demo", "named recipe to start from (see --list-presets)")
    method: str = _f("teskd", "teskd: teacher + students + TESKD loss; baseline: the teacher alone with plain CE")
    dataset: str = _f("digits", "the dataset (digits: built in, nothing to download; folder: any ImageFolder tree "
                      "ROOT/train/<class>/*, ROOT/val/<class>/*, also called imagenet)")
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
    opt: str = _f("sgd", "optimizer: sgd (momentum, Nesterov) or adamw (decoupled weight decay; fused on CUDA)")
    lr: float = _f(0.1, "peak learning rate for the global batch")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "weight decay")
    bn_weight_decay: bool = _f(True, "apply weight decay to norm weights, biases and every 1-D parameter too "
                               "(default: on for sgd, off for adamw, as timm does)")
    betas: tuple[float, ...] = _f((0.9, 0.999), "AdamW beta1 beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    accum_steps: int = _f(1, "micro-batches per optimizer step (gradient accumulation; --batch-size is the "
                          "micro-batch, the step sees accum_steps x batch_size images)")
    clip_grad: float = _f(0.0, "clip the global gradient norm to this value before each step (0: off)")
    ema_decay: float = _f(0.0, "EMA of the teacher's weights with this decay, warmed up as timm's ModelEmaV3 "
                          "(0: off)")
    export: str = _f("raw", "teacher.pt from the raw teacher or its EMA (ema needs --ema-decay)")
    schedule: str = _f("multistep", "multistep (x lr_gamma at milestones), cosine or linear (to zero)")
    lr_milestones: tuple[float, ...] = _f((0.5, 0.75), "multistep milestones as fractions of --epochs")
    lr_gamma: float = _f(0.1, "multistep decay factor")
    warmup_epochs: float = _f(0.0, "linear warm-up from 0, per step, over this many epochs")
    temperature: float = _loss_option("temperature")
    ce_weight: float = _loss_option("ce_weight")
    kd_weight: float = _loss_option("kd_weight")
    feat_weight: float = _loss_option("feat_weight")
    label_smoothing: float = _loss_option("label_smoothing")
    cutmix_alpha: float = _f(0.0, "CutMix: Beta(alpha, alpha) of the kept area, per batch on the device (0: off)")
    cutmix_prob: float = _f(0.5, "CutMix: the probability that a batch is mixed (with --cutmix-alpha > 0)")
    image_size: int = _f(224, "training image size: a folder's crop (final size when progressive; a folder's "
                         "default 0: from its images), the digits' side")
    image_size_start: int = _f(0, "progressive resizing: first training size (0: off); ramps to --image-size")
    progressive_end: float = _f(0.85, "progressive resizing reaches --image-size at this fraction of the epochs")
    val_image_size: int = _f(224, "image folder validation centre crop (a folder's default 0: --image-size)")
    val_resize: int = _f(256, "image folder validation: shorter side resized to this before the centre crop (a "
                         "folder's default 0: 256/224 of --val-image-size)")
    norm_mean: tuple[float, ...] = _f((), "folder data: normalisation mean R G B in [0, 1] units (default: ImageNet's)")
    norm_std: tuple[float, ...] = _f((), "folder data: normalisation std R G B (default: ImageNet's)")
    norm_from_data: bool = _f(False, "folder data: normalise with the mean and std of up to 1000 training images")
    crop_scale: tuple[float, ...] = _f((), "folder data: random-resized crop area range MIN MAX (default: 0.08 1 "
                                       "from 128 px, 0.25 1 below)")
    folder_augment: str = _f("auto", "folder data training augmentation: rrc (random-resized crop, flip), pad-crop "
                             "(resize, zero-pad by 1/8, random crop, flip: CIFAR's), auto (pad-crop at 64 px and "
                             "below, else rrc)")
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
    eval_only: str = _f("", "evaluate this checkpoint (last.pt, best.pt or teacher.pt; a run folder: its best.pt, "
                        "else last.pt, else teacher.pt) and exit")
    steps_per_epoch: int = _f(0, "cap the batches per epoch (0: the whole training set); for smoke runs")
    log_every: int = _f(50, "steps between progress bar updates (read without a device synchronisation)")
    report_after: float = _f(0.75, "also report the best teacher accuracy after this fraction of the epochs")
    progress: bool = _f(True, "show a tqdm progress bar on a terminal (none when stderr is a file or a pipe: the "
                        "line per epoch is the log)")
    tensorboard: bool | None = _f(None, "write TensorBoard events under RUN_DIR/tb (default: when tensorboard is "
                                  "installed; --tensorboard says once when it is not)")
    plot: bool = _f(True, "draw RUN_DIR/curves.png at the end")
    dry_run: bool = _f(False, "build the data and the network, print the cost line (the students' "
                       "multiply-accumulates against the backbone's) and exit without training")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        d["betas"] = list(self.betas)
        return d


# The published recipes. Their loss is the loss's defaults (kernels/options.py SPEC), not repeated here
# (tests/test_train_config.py checks the resolved presets against the paper's values).
_CIFAR = dict(
    dataset="cifar100", stem="cifar", epochs=200, batch_size=128, lr=0.1, momentum=0.9, nesterov=True,
    weight_decay=5e-4, bn_weight_decay=True, schedule="multistep", lr_milestones=(0.5, 0.75), lr_gamma=0.1,
    warmup_epochs=0.0, seed=27,
)
_IMAGENET = dict(
    dataset="imagenet", stem="imagenet", epochs=90, batch_size=256, lr=0.1, momentum=0.9, nesterov=False,
    weight_decay=1e-4, bn_weight_decay=True, schedule="multistep", lr_milestones=(1 / 3, 2 / 3), lr_gamma=0.1,
    warmup_epochs=0.0, image_size=224, image_size_start=0, val_image_size=224, val_resize=256, seed=27,
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
    # CIFAR stem (stages at 8, 4, 2, 1 pixels); about a minute on 2 CPU cores. Its image sizes and thread count
    # are the digits' dataset defaults (DATASET_DEFAULTS), not the preset's.
    "digits-demo": dict(
        dataset="digits", width=0.25, epochs=20, batch_size=64, lr=0.05, schedule="cosine", warmup_epochs=1.0,
        log_every=10,
    ),
    # No recipe: the defaults (the published CIFAR-100 recipe) and the dataset's defaults alone.
    "none": {},
    # Fashion-MNIST (60,000 28 x 28 training images) on 2 CPU cores: an eighth-width ResNet-18, CIFAR stem (stages at
    # 28, 14, 7, 4 px), 4 epochs of 100 batches of 64 (a fresh random 6,400 images each), the whole test set each.
    "fashion-mnist-demo": dict(
        dataset="fashion-mnist", width=0.125, epochs=4, steps_per_epoch=100, batch_size=64, lr=0.05,
        schedule="cosine", warmup_epochs=0.5, log_every=25,
    ),
    **{f"cifar100-{a}": dict(_CIFAR, arch=a) for a in ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")},
    **{f"imagenet-{a}": dict(_IMAGENET, arch=a) for a in ("resnet18", "resnet34", "resnet50")},
    "imagenet-resnet18-fast16-ours": dict(_IMAGENET_FAST, arch="resnet18"),
}

# The fields whose value fits a dataset rather than a recipe: a preset's values for them apply only to the
# preset's own dataset, and each dataset's defaults for them (DATASET_DEFAULTS) only to that dataset.
DATASET_FIELDS = frozenset({"stem", "image_size", "image_size_start", "progressive_end", "val_image_size",
                            "val_resize", "threads"})
# What fits each dataset whatever the recipe, over the dataclass defaults and under the preset. An image folder's
# sizes of 0 are taken from its images (folder_defaults): its median shorter side, rounded to a multiple of 8, at
# most 224; the validation resize keeps ImageNet's 256/224 ratio; the stem is torchvision's from 128 px, CIFAR's
# below.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # 8x8 images; its operations are tiny: one thread beats two on 2 cores, by far when other work shares them.
    "digits": dict(image_size=8, val_image_size=8, val_resize=8, threads=1),
    "folder": dict(image_size=0, val_image_size=0, val_resize=0),
    # 32x32 images held on the device (the loader ignores the sizes; the cost line and the start-up line use them).
    **{name: dict(image_size=32, val_image_size=32, val_resize=32) for name in ("cifar10", "cifar100")},
    # 28x28 images held on the device (the loader ignores the sizes); tiny operations, as the digits'.
    **{name: dict(image_size=28, val_image_size=28, val_resize=28, threads=1) for name in ("fashion-mnist", "mnist")},
}
# Other names of a dataset (kept working): "imagenet" is any image folder.
DATASET_ALIASES = {"imagenet": "folder"}
# An image folder's image size when its images cannot be measured, and the largest one taken from the data.
FOLDER_MAX_SIZE = 224


def dataset_kind(dataset: str) -> str:
    """The dataset's own name: ``imagenet`` is the image folder ``folder``."""
    return DATASET_ALIASES.get(dataset, dataset)


PRESET_HELP = {
    "digits-demo": "built-in demo on scikit-learn's digits, CPU, about a minute",
    "fashion-mnist-demo": "Fashion-MNIST (apt-get install dataset-fashion-mnist, or --data-dir DIR), sized for 2 CPU "
    "cores: width 0.125, 4 epochs of 100 batches",
    "none": "no recipe: the defaults (the published CIFAR-100 recipe) with the dataset's defaults",
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
_DEFAULTS = dataclasses.asdict(TrainConfig())


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


_TYPE_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _kind(value: Any) -> str:
    """What a value is, in a word (for the message about a value of the wrong type)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "null" if value is None else f"a {type(value).__name__}"


def _number(tp, value: Any) -> int | float:
    """``value`` as a ``tp`` (int or float), or a TypeError. A boolean is not a number; a string is taken only
    when it is a number's text (YAML reads ``1e-4``, without a dot, as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError
    if isinstance(value, str):
        try:
            value = float(value) if tp is float or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            raise TypeError from None
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise TypeError
        return int(value)
    return float(value)


def _coerce(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` as field ``name``'s type, or a :class:`ConfigError` naming ``label`` (default: the flag).

    Types are checked, not converted from anything: a boolean is not a number, a list of numbers needs at least
    one unless the field's default is the empty list (a YAML ``lr: true`` would otherwise train at lr 1.0)."""
    tp, optional, is_tuple = _base_type(_HINTS[name])
    label = label or _flag(name)
    if value is None and optional:
        return None
    if is_tuple and isinstance(value, (list, tuple)) and not value and _DEFAULTS[name] != ():
        raise ConfigError(f"{label}: expected a list of one or more numbers, got an empty list")
    try:
        if is_tuple:
            values = list(value) if isinstance(value, (list, tuple)) else [value]
            return tuple(_number(tp, v) for v in values)
        if tp is bool:
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp in (int, float):
            return _number(tp, value)
        if not isinstance(value, tp):
            raise TypeError
        return value
    except (TypeError, ValueError):
        expected = f"a list of {_TYPE_WORDS[tp][2:]}s" if is_tuple else _TYPE_WORDS.get(tp, tp.__name__)
        raise ConfigError(f"{label}: expected {expected}, got {value!r} ({_kind(value)})") from None


def _field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


# Other libraries' names of a field, for the did-you-mean of an unknown key.
_SYNONYMS = {"learning_rate": "lr", "batch": "batch_size", "wd": "weight_decay", "model": "arch",
             "num_epochs": "epochs", "data": "data_dir", "output_dir": "out"}


def _suggestion(key: str) -> str | None:
    """The field an unknown key probably means (spelt as the key is: kebab-case or snake_case), or None."""
    name = key.replace("-", "_")
    close = [_SYNONYMS[name]] if name in _SYNONYMS else difflib.get_close_matches(name, _field_names(), n=1, cutoff=0.6)
    return (_flag(close[0])[2:] if "-" in key else close[0]) if close else None


def _unknown(key: str, where: str) -> ConfigError:
    """The error for a key that names no field, with the closest field name as a suggestion."""
    close = _suggestion(key)
    hint = f"; did you mean {close}?" if close else " (teskd-train --help lists the fields)"
    return ConfigError(f"{where}: unknown field {key!r}{hint}")


def named_fields(mapping: dict[Any, Any], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A mapping of field names (``snake_case`` or ``kebab-case``) to values, checked to name fields.

    Args:
        mapping: key -> value, as a YAML file or an arms entry gives it.
        where: how to name the mapping in a message (a file, an arm).

    Returns:
        ``(values, labels)``: field -> value, and field -> how a message names it (``"WHERE: key 'the-key'"``).

    Raises:
        ConfigError: a key that is not a string (YAML reads ``off:`` as a boolean) or names no field (with a
            did-you-mean suggestion).
    """
    names = set(_field_names())
    values, labels = {}, {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} ({_kind(key)}) is not a field name; quote it")
        name = key.replace("-", "_")
        if name not in names:
            raise _unknown(key, where)
        values[name], labels[name] = value, f"{where}: key {key!r}"
    return values, labels


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses a mapping with a key twice (``yaml.YAMLError`` naming the key and its line),
    which PyYAML otherwise takes silently, the last value winning."""
    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def load_yaml(path: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a YAML config: a mapping of field names (``snake_case`` or ``kebab-case``) to values.

    Args:
        path: the file.
        labels: filled with field -> how a message names its key in the file (for :func:`resolve`'s ``origin``).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {p}")
    try:
        data = safe_load_unique(p.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"--config {p}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {p}: not a text file (not UTF-8): expected a YAML mapping of field: value") \
            from None
    except yaml.YAMLError as e:
        # PyYAML's message spans lines (the problem, then where): one line.
        raise ConfigError(f"--config {p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping of field: value, got {type(data).__name__}")
    values, found = named_fields(data, str(p))
    if labels is not None:
        labels.update(found)
    return values


def _preset_values(overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The preset's name and the values it gives this run: all of them on its own dataset; on another, only
    its recipe (not its DATASET_FIELDS), and the default preset (the digits demo) none at all."""
    name = overrides.get("preset", TrainConfig.preset)
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    dataset = overrides.get("dataset", preset.get("dataset", TrainConfig.dataset))
    if not isinstance(dataset, str) or dataset_kind(dataset) == dataset_kind(preset.get("dataset", dataset)):
        return name, preset
    if "preset" not in overrides:
        return "none", {}
    return name, {k: v for k, v in preset.items() if k not in DATASET_FIELDS}


def resolve(overrides: dict[str, Any], base: dict[str, Any] | None = None,
            origin: dict[str, str] | None = None) -> TrainConfig:
    """Build a validated config from a preset (or ``base``) and overrides.

    Precedence, lowest first: the dataclass defaults, the dataset's defaults (:data:`DATASET_DEFAULTS`), the
    preset (its DATASET_FIELDS only on its own dataset), then ``overrides``. An image folder's sizes left at 0
    are taken from its images (:func:`folder_defaults`, which reads a few image headers).

    Args:
        overrides: field -> value, applied last (YAML values, then flags, merged by the caller).
        base: a complete config dict to start from instead of the preset (used by ``--resume``).
        origin: field -> how a message names where its value came from (a YAML file's key); default: its flag.

    Returns:
        a :class:`TrainConfig` that passed :func:`validate`; its ``notes`` attribute lists the values taken
        from the data.
    """
    names = set(_field_names())
    unknown = sorted(set(overrides) - names)
    if unknown:
        hints = [f"did you mean {_suggestion(k)} for {k}?" for k in unknown if _suggestion(k)]
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}" + (f" ({' '.join(hints)})" if hints else ""))
    origin = origin or {}
    if base is None:
        preset_name, preset = _preset_values(overrides)
        dataset = overrides.get("dataset", preset.get("dataset", TrainConfig.dataset))
        values = {**DATASET_DEFAULTS.get(dataset_kind(dataset) if isinstance(dataset, str) else "", {}), **preset,
                  "preset": preset_name}
    else:
        values = {k: v for k, v in base.items() if k in names}
    values.update(overrides)
    values = {k: _coerce(k, v, origin.get(k)) for k, v in values.items()}
    if timm_name(str(values.get("arch", ""))) is not None and base is None:
        timm_defaults(values, overrides)
    if base is None and values.get("opt") == "adamw" and "bn_weight_decay" not in overrides:
        # timm's rule for every optimizer it builds: no weight decay on norm weights, biases and 1-D parameters.
        values["bn_weight_decay"] = False
    notes: list[str] = []
    if base is None:
        notes = folder_defaults(values, given=set(overrides) | set(preset))
    cfg = TrainConfig(**values)
    validate(cfg, origin)
    cfg.notes = notes
    return cfg


def folder_defaults(values: dict[str, Any], given: set[str]) -> list[str]:
    """An image folder's sizes of 0 (and its stem, unless given) from its images, in place; what was taken.

    The training size is the median shorter side of up to 256 training images (read from their headers, evenly
    spread over the sorted list), rounded to a multiple of 8, between 8 and :data:`FOLDER_MAX_SIZE`; the
    validation crop is the training size and the validation resize keeps ImageNet's 256/224 ratio; the stem is
    torchvision's (``imagenet``) from 128 px and CIFAR's below (a stride-1 stem keeps small images' detail).

    A folder that is not there (or that its index refuses) is left alone: its sizes stay 0, and the run's check
    of the dataset, before any work, says what is wrong.

    Returns:
        one line per value taken from the data (empty for any other dataset).
    """
    from teskd_fast.data import DatasetError  # here: the data package loads torch (see choices)

    if dataset_kind(values.get("dataset", "")) != "folder":
        return []
    notes = []
    if not values.get("image_size"):
        root = Path(values.get("data_dir") or "data").expanduser()
        try:
            side, measured = _median_side(root / "train")
        except DatasetError:
            return []
        values["image_size"] = min(FOLDER_MAX_SIZE, max(8, 8 * round(side / 8)))
        notes.append(f"image size {values['image_size']} (the median shorter side of {measured} training images "
                     f"is {side} px; at most {FOLDER_MAX_SIZE}; set --image-size to choose)" if measured else
                     f"image size {values['image_size']} (no training image could be measured; set --image-size)")
    if not values.get("val_image_size"):
        values["val_image_size"] = values["image_size"]
    if not values.get("val_resize"):
        values["val_resize"] = round(values["val_image_size"] * 256 / 224)
    if "stem" not in given:
        values["stem"] = "imagenet" if values["image_size"] >= 128 else "cifar"
        if not str(values.get("arch", "")).startswith("timm/"):  # --stem applies to the torchvision ResNets only
            notes.append(f"stem {values['stem']} (for {values['image_size']} px images; set --stem to choose)")
    return notes


def _median_side(split: Path, limit: int = 256) -> tuple[int, int]:
    """(median shorter side in pixels, images measured) of up to ``limit`` images of an ImageFolder split.

    Raises the data package's :class:`~teskd_fast.data.DatasetError` when the folder is not there (or its index
    refuses it)."""
    from PIL import Image  # here: an image folder's defaults only (the data package loads torch, see choices)

    from teskd_fast.data.folder import index_image_folder, open_regular

    index = index_image_folder(split)
    n = len(index.samples)
    picks = sorted({i * n // limit for i in range(limit)}) if n > limit else range(n)
    sides = []
    for i in picks:
        try:
            # Regular files only, opened without blocking: a named pipe among the images must not hang the run.
            with open_regular(index.path(i)) as f, Image.open(f) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not sides:
        return FOLDER_MAX_SIZE, 0
    return int(statistics.median_low(sides)), len(sides)


def check_config(mapping: dict[Any, Any], source: str | None = None) -> TrainConfig:
    """Check a complete training configuration without training: what ``teskd-train`` would refuse.

    Field names, types (a YAML boolean is not a number, an empty list is not a list of numbers), ranges and
    choices, and the files that must exist (``init``, ``resume``, ``eval_only``). An image folder's sizes left
    at 0 are measured from its images when the folder is there (else they stay 0: the dataset is checked when a
    run starts).

    Args:
        mapping: field -> value (``snake_case`` or ``kebab-case`` keys), over the preset it names (or the
            default one), as a YAML file or an arm of ``teskd-compare`` gives it.
        source: how a message names the mapping (``"arms.yaml: arm 'x'"``); its keys are then named
            ``SOURCE: key 'lr'``. Default: each field's ``--flag``.

    Returns:
        the resolved :class:`TrainConfig`.

    Raises:
        ConfigError: the first problem, in one line naming the key (or flag) and the value.
    """
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source or 'configuration'}: expected a mapping of field: value, got {_kind(mapping)}")
    values, labels = named_fields(mapping, source or "configuration")
    cfg = resolve(values, origin=labels if source else None)
    check_files(cfg, labels if source else None)
    return cfg


def check_files(cfg: TrainConfig, origin: dict[str, str] | None = None) -> None:
    """Refuse a configuration whose ``init``, ``resume`` or ``eval_only`` names no file or folder that is there
    (a ConfigError naming the flag or ``origin``'s key)."""
    origin = origin or {}
    wanted = {"init": ("a file", Path.is_file), "resume": ("a folder", Path.is_dir),
              "eval_only": ("a file or folder", Path.exists)}
    for name, (kind, ok) in wanted.items():
        value = getattr(cfg, name)
        if value and not ok(Path(value).expanduser()):
            there = Path(value).expanduser().exists()
            raise ConfigError(f"{origin.get(name, _flag(name))}: {value} is not {kind}"
                              if there else f"{origin.get(name, _flag(name))}: no such {kind[2:]}: {value}")


def validate(cfg: TrainConfig, origin: dict[str, str] | None = None) -> None:
    """Reject values that cannot work, with a message naming the flag (or ``origin``'s name for it: a YAML
    file's key). Raises :class:`ConfigError`."""
    origin = origin or {}

    def flag(name: str) -> str:
        return origin.get(name, _flag(name))

    for name, allowed in choices().items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{flag(name)}: {getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag(f.name)}: must be a finite number, got {value}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise ConfigError(f"{flag('momentum')}: must be in [0, 1), got {cfg.momentum}")
    _check_loss_options(cfg, flag)
    positive = ("epochs", "batch_size", "lr", "width", "log_every")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{flag(name)}: must be > 0, got {getattr(cfg, name)}")
    non_negative = ("momentum", "weight_decay", "warmup_epochs",
                    "workers", "steps_per_epoch", "image_size_start", "threads", "cutmix_alpha")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{flag(name)}: must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.cutmix_prob <= 1.0:
        raise ConfigError(f"{flag('cutmix_prob')}: must be in [0, 1], got {cfg.cutmix_prob}")
    if not 0.0 < cfg.lr_gamma <= 1.0:
        raise ConfigError(f"{flag('lr_gamma')}: must be in (0, 1], got {cfg.lr_gamma}")
    ms = list(cfg.lr_milestones)
    if not ms or any(not 0.0 < m < 1.0 for m in ms) or ms != sorted(ms):
        raise ConfigError(f"{flag('lr_milestones')}: fractions of --epochs, increasing, each in (0, 1); got {ms} "
                          "(for no decay: --lr-gamma 1)")
    if not 0.0 <= cfg.report_after <= 1.0:
        raise ConfigError(f"{flag('report_after')}: must be in [0, 1], got {cfg.report_after}")
    if not 0.0 < cfg.progressive_end <= 1.0:
        raise ConfigError(f"{flag('progressive_end')}: must be in (0, 1], got {cfg.progressive_end}")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"{flag('warmup_epochs')} ({cfg.warmup_epochs}) exceeds --epochs ({cfg.epochs})")
    folder = dataset_kind(cfg.dataset) == "folder"
    for name in ("image_size", "val_image_size", "val_resize"):
        size = getattr(cfg, name)
        if size < 8 and not (folder and size == 0):
            raise ConfigError(f"{flag(name)}: must be >= 8 pixels, got {size}"
                              + (" (0: from the folder's images)" if folder else ""))
    _check_folder_options(cfg)
    if cfg.student_width < 0:
        raise ConfigError(f"--student-width: must be >= 0 (0: W, the published network), got {cfg.student_width}")
    student_levels(cfg)
    check_timm_arch(cfg)
    if cfg.val_resize < cfg.val_image_size:
        raise ConfigError(f"{flag('val_resize')} ({cfg.val_resize}) must be >= --val-image-size "
                          f"({cfg.val_image_size})")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"{flag('device')}: expected auto, cpu, cuda or cuda:N, got {dev!r}")
    _check_optimizer_options(cfg)
    if cfg.resume and cfg.eval_only:
        raise ConfigError("--resume and --eval-only cannot be combined")
    if not 0 <= cfg.seed < 2**64:  # torch.manual_seed's range (and the data's SeedSequence keys)
        raise ConfigError(f"{flag('seed')}: must be in [0, 2**64), got {cfg.seed}")


def check_timm_arch(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` when ``--arch timm/NAME`` cannot be built: timm missing, no such model, or a
    ResNet-only ``--width``."""
    arch = cfg.arch
    name = timm_name(arch)
    if name is None:
        return
    try:
        import timm
    except ImportError:
        raise ConfigError(f"--arch {arch}: needs timm, an optional dependency: pip install timm") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ConfigError(f"--arch {arch}: timm has no model {name!r}"
                          + (f" (similar: {', '.join(close)})" if close else ""))
    if cfg.width != 1.0:
        raise ConfigError(f"--width {cfg.width:g}: the width factor applies to the torchvision ResNets; for "
                          f"{arch} choose a smaller timm model instead")


def _check_folder_options(cfg: TrainConfig) -> None:
    """The folder data's normalisation and crop options (:class:`ConfigError` naming the flags)."""
    mean, std, scale = cfg.norm_mean, cfg.norm_std, cfg.crop_scale
    if (mean or std) and (len(mean) != 3 or len(std) != 3 or min(std) <= 0):
        raise ConfigError(f"--norm-mean and --norm-std: both or neither, 3 values (R G B) each, std > 0; got "
                          f"{list(mean)} and {list(std)}")
    if cfg.norm_from_data and mean:
        raise ConfigError("--norm-from-data computes the mean and std: drop --norm-mean and --norm-std, or it")
    if scale and (len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"--crop-scale: two area fractions MIN MAX with 0 < MIN <= MAX <= 1, got {list(scale)}")


def _check_optimizer_options(cfg: TrainConfig) -> None:
    """--opt's own flags, --accum-steps, --clip-grad, --ema-decay and --export."""
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"--betas: two numbers in [0, 1), got {' '.join(f'{b:g}' for b in cfg.betas)}")
    if not cfg.eps > 0:
        raise ConfigError(f"--eps: must be > 0, got {cfg.eps}")
    if cfg.accum_steps < 1:
        raise ConfigError(f"--accum-steps: must be >= 1, got {cfg.accum_steps}")
    if cfg.clip_grad < 0:
        raise ConfigError(f"--clip-grad: must be >= 0 (0: off), got {cfg.clip_grad}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"--ema-decay: must be in [0, 1) (0: off), got {cfg.ema_decay}")
    if cfg.export == "ema" and cfg.ema_decay == 0:
        raise ConfigError("--export ema needs an EMA: give --ema-decay (e.g. 0.9998)")


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

    names = {f.name for f in fields(TrainConfig)}
    return tuple(name for name in LossOptions._fields if name in names)


def _check_loss_options(cfg: TrainConfig, flag: Callable[[str], str] = _flag) -> None:
    """The loss's own check of its options (LossOptions.checked, the only one of their types and ranges), its error
    as a ConfigError naming the flag."""

    for name in loss_fields():
        try:
            LossOptions.checked(**{name: getattr(cfg, name)})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{flag(name)}: {str(e).removeprefix(name + ': ')}") from None
