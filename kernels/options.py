"""The loss's specification: its scalar options and its parts, each declared once, here.

:data:`SPEC` lists every option (name, type, default, range, meaning). From it follow

- :class:`LossOptions`, the record every backend takes as it is, and :meth:`LossOptions.checked`, the one check
  of the options (types and ranges), used by ``teskd_fast.teskd_loss`` and by the ``teskd-train`` configuration;
- the C kernel's ``ctypes`` struct (``teskd_loss_cpu._Options``: the shape fields, then the options in this order,
  checked field by field against ``csrc/teskd_loss_cpu.c`` by tests/test_cpu_kernel.py);
- the Triton custom op's schema and fake (the options are its named arguments), the kernels' scalar arguments
  (passed by keyword), the C test driver's packing, the configuration's flags (defaults and help), and the
  options table of docs/loss.md (tests/test_loss.py compares them).

:data:`PARTS` lists the loss's parts, in the order of every backend's ``parts`` tensor, with the option that
weighs each. It lives with the kernels, the lowest layer (``teskd_fast.loss.options`` re-exports it).
"""

import math
import numbers
import sys
from typing import NamedTuple


class Range(NamedTuple):
    """The values an option takes: finite, within ``[low, high]`` (``(low, ...`` when ``low_open``)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    text: str = ""  # the error's wording, when the generated one reads badly

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        if self.text:
            return self.text
        if math.isinf(self.low) and math.isinf(self.high):
            return "must be a finite number"
        if math.isinf(self.high):
            return f"must be a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return f"must lie in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


class Option(NamedTuple):
    """One scalar option of the loss."""

    name: str
    type: type  # float, int or bool
    default: float | int | bool
    range: Range | None  # None: any value of the type
    help: str  # its meaning (the configuration flag's help, the docs' table)


SPEC: tuple[Option, ...] = (
    Option("temperature", float, 4.0, Range(0.0, low_open=True), "distillation temperature T"),
    Option("ce_weight", float, 0.2, Range(0.0, text="must be >= 0 (and finite)"),
           "alpha: weight of the cross-entropy of every head"),
    Option("kd_weight", float, 0.8, Range(0.0, text="must be >= 0 (and finite)"),
           "beta: weight of the teacher-to-student KL divergence"),
    Option("feat_weight", float, 1e-7, Range(0.0, text="must be >= 0 (and finite)"),
           "gamma: weight of the feature loss (a sum over batch and channels)"),
    Option("kd_eps", float, 1e-7, Range(0.0), "added to every class of the teacher's softened probabilities"),
    Option("detach_teacher", bool, False, None, "stop the KD gradient into the teacher logits (an ablation)"),
    Option("label_smoothing", float, 0.0, Range(0.0, 1.0), "label smoothing of the cross-entropy"),
    # Targets are int64 (the C kernel and Triton take ignore_index as one): a wider value would be truncated.
    Option("ignore_index", int, -100, Range(-(2**63), 2**63 - 1, text="must fit in int64 (the targets' type)"),
           "target value excluded from the cross-entropy terms"),
)  # fmt: skip

PARTS: tuple[str, ...] = ("ce", "kd", "feat")
"""The loss's parts, in the order of every backend's ``parts`` tensor (the unweighted terms)."""
PART_WEIGHTS: dict[str, str] = {"ce": "ce_weight", "kd": "kd_weight", "feat": "feat_weight"}
"""The option that weighs each part: ``total = sum(options[PART_WEIGHTS[p]] * parts[p] for p in PARTS)``."""
SUMMED_PARTS: frozenset[str] = frozenset({"feat"})
BASELINE_PARTS: tuple[str, ...] = ("ce",)
"""The parts of the baseline's plain cross-entropy loss (the teacher's CE alone)."""
"""The parts that are a sum over the batch, not a mean (the feature loss): over several processes, the global
batch's value is the sum of theirs."""
if set(PART_WEIGHTS) != set(PARTS) or not SUMMED_PARTS <= set(PARTS) or not set(BASELINE_PARTS) <= set(PARTS):
    raise RuntimeError("kernels/options.py: PART_WEIGHTS, SUMMED_PARTS and BASELINE_PARTS must name parts of PARTS")


def _plain(name, value):
    """A 0-d tensor or numpy scalar as the Python number it holds; anything else as it is."""
    # A tensor exists only once torch is imported: the specification itself does not load torch (the training
    # configuration reads its defaults without it).
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{name}: expected a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}")
        return value.item()
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():  # numpy scalars, 0-d arrays
        return value.item()
    return value


def convert(option: Option, value):
    """``value`` as ``option``'s type: numbers of any numeric type (numpy scalars included) and 0-d tensors, by one
    rule for every option. A TypeError names the option; the range is not checked here."""
    plain = _plain(option.name, value)
    if option.type is bool:
        if isinstance(plain, bool) or (isinstance(plain, numbers.Integral) and plain in (0, 1)):
            return bool(plain)
        raise TypeError(f"{option.name}: expected a boolean, got {value!r}")
    if isinstance(plain, bool) or not isinstance(plain, numbers.Real):
        raise TypeError(f"{option.name}: expected a number, got {value!r}")
    if option.type is int:
        if isinstance(plain, numbers.Integral):
            return int(plain)
        if math.isfinite(plain) and float(plain).is_integer():
            return int(plain)
        raise TypeError(f"{option.name}: expected an integer, got {value!r}")
    return float(plain)


def options_record(spec: tuple[Option, ...]) -> type:
    """The record type of ``spec``'s options, with its ``checked`` constructor (``LossOptions`` is that of
    :data:`SPEC`; the tests build one with a throwaway option)."""
    by_name = {option.name: option for option in spec}

    def checked(cls, **options):
        """The record of ``options`` (names as the fields, any subset; the rest default), converted and checked.

        Values: numbers of any numeric type (numpy scalars included) or 0-d tensors. A TypeError names an unknown
        option or a value of the wrong type, a ValueError a value out of its range."""
        unknown = sorted(set(options) - set(by_name))
        if unknown:
            raise TypeError(f"unknown loss option(s) {unknown}; valid: {sorted(by_name)}")
        values = {}
        for option in spec:
            if option.name not in options:
                values[option.name] = option.default
                continue
            given = options[option.name]
            value = convert(option, given)
            if option.range is not None and value not in option.range:
                raise ValueError(f"{option.name}: {option.range}, got {given!r}")
            values[option.name] = value
        return cls(**values)

    record = NamedTuple("LossOptions", [(option.name, option.type) for option in spec])
    record.__new__.__defaults__ = tuple(option.default for option in spec)
    record._field_defaults = {option.name: option.default for option in spec}
    record.checked = classmethod(checked)
    record.__module__ = __name__
    return record


LossOptions = options_record(SPEC)
LossOptions.__doc__ = """The TESKD loss's options (see :data:`SPEC`, and :func:`teskd_fast.teskd_loss` for their
meaning), generated from :data:`SPEC`.

A tuple: hashable (kernels cache per options), immutable, and a constant to ``torch.compile``. Build it with
:meth:`checked` (converted and checked); the plain constructor checks nothing."""
