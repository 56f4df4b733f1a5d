"""The fused CPU kernel of the TESKD loss: ``kernels/csrc`` (installed as ``teskd_fast/kernels/csrc``), built at
first use and called through ctypes.

One pass per batch row computes every head's cross-entropy, every student's KL divergence, the feature term
and the gradients of all logits and, on request, of the student features, as the Triton kernel does on the GPU
(:func:`feature_grad` recomputes the feature gradient for a second backward);
``teskd_fast.loss.closed_form.FusedLossFunction`` calls it for CPU tensors (``BatchedLossFunction``, its batched
PyTorch ops, runs where no C compiler is found).

The source is plain C (no Python or torch headers: it compiles in about a second) and is built with the
system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) into a per-user cache,
``$TESKD_FAST_CACHE_DIR`` or ``~/.cache/teskd_fast``, keyed by the source, compiler, flags, instruction set and
CPU; it is written atomically, so concurrent processes never load a partial file. ``$TESKD_FAST_CPU_KERNEL_ISA``
chooses the instruction set (read once, at the first build):

- ``native`` (default): ``-march=native``, this CPU's best (the AVX-512 branches where it has AVX-512); built
  without the flag where the compiler rejects it;
- ``avx2``: ``-march=native -mno-avx512f``, the code an AVX2-only x86 CPU runs (for tests and benchmarks of that
  branch on an AVX-512 machine);
- ``generic``: the baseline of the architecture (``-march=x86-64`` on x86, SSE2 only; the compiler's default
  elsewhere).

ctypes releases the GIL for the call, so large batches are split into row ranges computed on several threads,
and the per-row partial sums are then reduced in row order: the result does not depend on the split.

``TESKD_FAST_CPU_KERNEL=0`` turns the kernel off (the batched-op path is then used).
"""

import ctypes
import hashlib
import itertools
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .options import PARTS, SPEC

ENV_SWITCH = "TESKD_FAST_CPU_KERNEL"
ENV_CACHE = "TESKD_FAST_CACHE_DIR"
ENV_ISA = "TESKD_FAST_CPU_KERNEL_ISA"
_ABI_VERSION = 2
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = ("teskd_loss_cpu.c", "teskd_loss_cpu_impl.h")
_FLAGS = ("-O3", "-std=c11", "-ffp-contract=fast", "-fPIC", "-shared", "-fno-math-errno")
_NATIVE = ("-march=native",)
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# Instruction set -> the extra flags to try, in order (the first that compiles is used).
_ISA_FLAGS = {
    "native": (_NATIVE, ()),
    "avx2": (("-march=native", "-mno-avx512f"),),
    "generic": (("-march=x86-64", "-mtune=generic") if _X86 else (),),
}
# Below this many logits (K + 1) * B * C, one thread: handing rows to a second thread costs more than it saves.
_MIN_PARALLEL_WORK = 1 << 18


_SHAPE_FIELDS = ("K", "B", "C", "D", "row_begin", "row_end")
_C_TYPES = {"int64_t": ctypes.c_int64, "double": ctypes.c_double}
_SPEC_C_TYPES = {float: "double", int: "int64_t", bool: "int64_t"}


def struct_fields(spec=SPEC, source=None) -> list[tuple[str, type]]:
    """The ctypes fields of ``teskd_options``, read from its declaration in csrc/teskd_loss_cpu.c (``source``: that
    file's text), checked against the loss's specification: the shape and row range, then every option of
    ``spec`` with its C type. A RuntimeError names an option the struct lacks, a field no option declares, or a
    type that differs: a C kernel that would drop (or misread) an option fails at import, never silently."""
    source = (_CSRC / "teskd_loss_cpu.c").read_text() if source is None else source
    body = re.search(r"typedef struct \{(.*?)\} teskd_options;", source, re.S)
    if body is None:
        raise RuntimeError("csrc/teskd_loss_cpu.c: no `typedef struct {...} teskd_options;` found")
    fields = []
    for declaration in re.sub(r"/\*.*?\*/", "", body.group(1), flags=re.S).split(";"):
        words = declaration.replace(",", " ").split()
        if words:
            fields += [(name, words[0]) for name in words[1:]]
    names = [name for name, _ in fields]
    options = {option.name: _SPEC_C_TYPES[option.type] for option in spec}
    missing = [name for name in options if name not in names]
    extra = [name for name in names if name not in options and name not in _SHAPE_FIELDS]
    if missing or extra or tuple(names[: len(_SHAPE_FIELDS)]) != _SHAPE_FIELDS:
        raise RuntimeError(
            f"teskd_options in csrc/teskd_loss_cpu.c does not match the loss's options (kernels/options.py): "
            f"options missing from the struct {missing}, struct fields no option declares {extra}; the struct "
            f"starts with {list(_SHAPE_FIELDS)}"
        )
    for name, c_type in fields[len(_SHAPE_FIELDS) :]:
        if c_type != options[name]:
            raise RuntimeError(f"teskd_options.{name} is {c_type} in csrc/teskd_loss_cpu.c, expected {options[name]}")
    return [(name, _C_TYPES[c_type]) for name, c_type in fields]


class _Options(ctypes.Structure):
    """Mirror of ``teskd_options`` in teskd_loss_cpu.c: the shape, a row range and the loss's options, read from
    the C declaration and checked against the specification (:func:`struct_fields`). Unknown keywords are refused
    (ctypes itself would set them as plain attributes, which the kernel never sees)."""

    _fields_ = struct_fields()

    def __init__(self, **fields):
        unknown = sorted(set(fields) - {name for name, _ in self._fields_})
        if unknown:
            raise TypeError(f"teskd_options has no field(s) {unknown}: the C kernel would ignore them")
        super().__init__(**fields)


_lock = threading.Lock()
_state = {"lib": None, "error": None, "warned": False}
_pool = None


def _compiler():
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity():
    """What -march=native depends on: the machine and its CPU flags."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    ident += line
    except OSError:
        ident += platform.processor()
    return ident


def _cache_dir():
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "teskd_fast"
    )
    return Path(root)


def isa() -> str:
    """The instruction set the kernel is built for: ``$TESKD_FAST_CPU_KERNEL_ISA``, default ``native``."""
    name = os.environ.get(ENV_ISA, "").strip().lower() or "native"
    if name not in _ISA_FLAGS:
        raise RuntimeError(f"{ENV_ISA}={name!r}: expected one of {', '.join(_ISA_FLAGS)}")
    if name == "avx2" and not _X86:
        raise RuntimeError(f"{ENV_ISA}=avx2 needs an x86 CPU (this one is {platform.machine()})")
    return name


def _build(cc):
    """Compile the kernel (once per source/compiler/flags/instruction set/CPU) and return the path of the shared
    library."""
    isa_name = isa()
    attempts = _ISA_FLAGS[isa_name]
    source = b"".join((_CSRC / name).read_bytes() for name in _SOURCES)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = " ".join(_FLAGS) + " | " + isa_name + " | " + " / ".join(" ".join(extra) for extra in attempts)
    key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), flags.encode(),
                                     _cpu_identity().encode()])).hexdigest()[:20]  # fmt: skip
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache, delete=True)
        probe.close()
    except OSError:
        cache = Path(tempfile.mkdtemp(prefix="teskd_fast_"))
    target = cache / f"teskd_loss_cpu_{key}.so"
    if target.exists():
        return target
    errors = []
    for extra in attempts:
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        cmd = [cc, *_FLAGS, *extra, str(_CSRC / "teskd_loss_cpu.c"), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            os.replace(tmp, target)  # atomic: another process sees the whole file or none
            return target
        os.unlink(tmp)
        errors.append(f"$ {' '.join(cmd)}\n{proc.stderr.strip()}")
    raise RuntimeError("compiling the fused CPU kernel failed:\n" + "\n".join(errors))


def _load():
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install cc/gcc/clang)")
    lib = ctypes.CDLL(str(_build(cc)))
    lib.teskd_abi_version.restype = ctypes.c_int64
    if lib.teskd_abi_version() != _ABI_VERSION:
        raise RuntimeError(f"kernel ABI {lib.teskd_abi_version()} != {_ABI_VERSION}")
    ptr = ctypes.c_void_p
    for suffix in ("f32", "f64"):
        rows = getattr(lib, f"teskd_rows_{suffix}")
        rows.argtypes = [ctypes.POINTER(_Options), *([ptr] * 11)]
        rows.restype = ctypes.c_int64
        feature_grad = getattr(lib, f"teskd_feature_grad_{suffix}")
        feature_grad.argtypes = [ctypes.POINTER(_Options), ptr, ptr, ptr, ctypes.c_double]
        feature_grad.restype = None
        scale = getattr(lib, f"teskd_scale_{suffix}")
        scale.argtypes = [ptr, ptr, ctypes.c_int64, ctypes.c_double]
        scale.restype = None
        reduce = getattr(lib, f"teskd_reduce_rows_{suffix}")
        reduce.argtypes = [ctypes.POINTER(_Options), ptr, ptr, ptr, ptr]
        reduce.restype = None
    lib.teskd_isa.restype = ctypes.c_char_p
    for name in ("teskd_exp_f32", "teskd_log_f32"):
        getattr(lib, name).argtypes = [ptr, ptr, ctypes.c_int64]
        getattr(lib, name).restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (with the reason in :func:`status`) where it cannot be built."""
    if _state["lib"] is not None or _state["error"] is not None:
        return _state["lib"]
    with _lock:
        if _state["lib"] is None and _state["error"] is None:
            try:
                _state["lib"] = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["error"] = str(exc)
    return _state["lib"]


def reload() -> str | None:
    """Load the kernel again, for the instruction set ``$TESKD_FAST_CPU_KERNEL_ISA`` now names (built or taken from
    the cache); for benchmarks that compare the builds in one process. Returns :func:`built_isa`."""
    with _lock:
        _state["lib"], _state["error"] = None, None
    library()
    return built_isa()


def enabled() -> bool:
    """True when the fused CPU kernel will be used: not switched off, and built."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if library() is None:
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                f"teskd_fast: the fused CPU loss kernel is unavailable, using batched PyTorch ops instead "
                f"(slower, same results): {_state['error']}. Set {ENV_SWITCH}=0 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return True


def status() -> tuple[bool, str | None]:
    """``(available, reason)``: whether the kernel is built, and why not."""
    return library() is not None, _state["error"]


def built_isa() -> str | None:
    """The widest vector instruction set the loaded kernel was compiled for: ``avx512f``, ``avx2``, ``sse2``,
    ``neon`` or ``scalar`` (the branches of teskd_loss_cpu.c); None where it is not built."""
    lib = library()
    return None if lib is None else lib.teskd_isa().decode()


def _thread_pool():
    global _pool
    if _pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="teskd_cpu")
    return _pool


def _chunks(B, work):
    threads = min(torch.get_num_threads(), B, max(1, work // _MIN_PARALLEL_WORK))
    bounds = [B * i // threads for i in range(threads + 1)]
    return list(itertools.pairwise(bounds))


_HEAD_WEIGHTS = {}
_OPTIONS = {}


def _pointers(tensors):
    """The K data pointers of K tensors, or of the K slices of one contiguous ``[K, ...]`` tensor (no views made)."""
    if isinstance(tensors, torch.Tensor):
        base, step = tensors.data_ptr(), tensors.stride(0) * tensors.element_size()
        # A generator, not range(): a [1, ...] tensor may have stride 0 in its first dimension.
        return (ctypes.c_void_p * tensors.shape[0])(*(base + k * step for k in range(tensors.shape[0])))
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _run_rows(fn, opts, *args):
    """``fn(options, *args)`` for every row range, on the thread pool when there are several."""
    if len(opts) == 1:
        return [fn(ctypes.byref(opts[0]), *args)]
    return list(_thread_pool().map(lambda o: fn(ctypes.byref(o), *args), opts))


def _options(K, B, C, D, work, options):
    """The kernel's struct, one per row range; cached (a loss is called with the same few shapes).

    ``options`` (a :class:`~teskd_fast.kernels.options.LossOptions`) is unpacked here, by field name; None for the
    feature gradient, which reads only the shape and the row range."""
    key = (K, B, C, D, work, torch.get_num_threads(), _MIN_PARALLEL_WORK, options)
    opts = _OPTIONS.get(key)
    if opts is None:
        if len(_OPTIONS) > 256:
            _OPTIONS.clear()
        fields = {} if options is None else options._asdict()
        opts = _OPTIONS[key] = [
            _Options(K=K, B=B, C=C, D=D, row_begin=begin, row_end=end, **fields) for begin, end in _chunks(B, work)
        ]
    return opts


def target_error(target, index, num_classes, ignore_index) -> ValueError:
    """The error for an out-of-range class index (also raised by ``teskd_fast.teskd_loss``'s own check)."""
    return ValueError(
        f"target: class index {int(target[index])} at position {index} is out of range [0, {num_classes}) "
        f"(and is not ignore_index={ignore_index})"
    )


def fused_loss(
    teacher, students, target, teacher_feature, student_features, head_weights, options, with_feature_grad=False
) -> tuple[torch.Tensor, ...]:
    """Loss and unscaled logit gradients in one call; also checks the targets (a ValueError names the first
    out-of-range one).

    Inputs: contiguous CPU tensors of one dtype, float32 or float64: teacher ``[B, C]``, students a sequence of
    K ``[B, C]`` or one ``[K, B, C]``, features ``[B, D]`` and K ``[B, D]`` or one ``[K, B, D]`` (or None); target
    int64 ``[B]``; ``options`` a
    :class:`~teskd_fast.kernels.options.LossOptions`.
    Returns ``(total, parts, grad)``, ``grad`` the ``[K + 1, B, C]`` gradient of the logits (teacher first); with
    ``with_feature_grad`` (and features), also the ``[K, B, D]`` gradient of the student features, unscaled by
    grad_output (``feature_grad(..., 2 * feat_weight)``), written in the same pass as the feature term.
    """
    lib = library()
    K = len(students)
    B, C = teacher.shape
    D = 0 if teacher_feature is None else teacher_feature.shape[1]
    dtype = teacher.dtype
    f64 = dtype == torch.float64
    hw = _HEAD_WEIGHTS.get(head_weights)
    if hw is None:
        hw = _HEAD_WEIGHTS.setdefault(head_weights, (ctypes.c_double * len(head_weights))(*head_weights))
    grad = torch.empty((K + 1, B, C), dtype=dtype)
    grad_f = torch.empty((K, B, D), dtype=dtype) if with_feature_grad and D else None
    rows = torch.empty((B, len(PARTS)), dtype=torch.float64)
    parts = torch.empty(len(PARTS), dtype=dtype)
    total = torch.empty((), dtype=dtype)
    opts = _options(K, B, C, D, (K + 1) * B * C + K * B * D, options)
    single = len(opts) == 1
    codes = _run_rows(
        lib.teskd_rows_f64 if f64 else lib.teskd_rows_f32,
        opts,
        teacher.data_ptr(),
        _pointers(students),
        target.data_ptr(),
        ctypes.addressof(hw),
        teacher_feature.data_ptr() if D else None,
        _pointers(student_features) if D else None,
        grad.data_ptr(),
        None if grad_f is None else grad_f.data_ptr(),
        rows.data_ptr(),
        parts.data_ptr() if single else None,
        total.data_ptr() if single else None,
    )
    if any(codes):
        code = max(codes)
        if code > 0:
            raise target_error(target, code - 1, C, options.ignore_index)
        raise MemoryError(f"teskd_fast CPU kernel: could not allocate its scratch rows (C = {C}, K = {K})")
    if not single:
        (lib.teskd_reduce_rows_f64 if f64 else lib.teskd_reduce_rows_f32)(
            ctypes.byref(opts[0]), target.data_ptr(), rows.data_ptr(), parts.data_ptr(), total.data_ptr()
        )
    return (total, parts, grad) if not with_feature_grad else (total, parts, grad, grad_f)


def feature_grad(teacher_feature, student_features, scale) -> torch.Tensor:
    """``scale * (f_k - f_t) * [f_k > 0 or f_t > 0]`` for the K student features (K ``[B, D]`` tensors or one
    ``[K, B, D]``), as one ``[K, B, D]`` tensor."""
    K = len(student_features)
    B, D = teacher_feature.shape
    dtype = teacher_feature.dtype
    grad = torch.empty((K, B, D), dtype=dtype)
    opts = _options(K, B, 0, D, 2 * K * B * D, None)
    fn = getattr(library(), f"teskd_feature_grad_{'f64' if dtype == torch.float64 else 'f32'}")
    _run_rows(fn, opts, teacher_feature.data_ptr(), _pointers(student_features), grad.data_ptr(), float(scale))
    return grad


def scale_(grad, scale) -> torch.Tensor:
    """``grad *= scale`` in place (single-threaded: no OpenMP fork at these sizes)."""
    fn = library().teskd_scale_f64 if grad.dtype == torch.float64 else library().teskd_scale_f32
    fn(grad.data_ptr(), grad.data_ptr(), grad.numel(), scale)
    return grad


def _elementwise(name, x):
    """``exp`` or ``log`` of a float32 CPU tensor through the kernel's polynomials (for the tests)."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    getattr(library(), f"teskd_{name}_f32")(x.data_ptr(), out.data_ptr(), x.numel())
    return out
