"""The fused CPU kernel of the torch backend: kernels/csrc, built and called by teskd_fast.kernels.teskd_loss_cpu.

Its exp/log polynomials, invariance to how rows are split between threads, the feature gradient, NaN/inf
semantics, large C, the integer-temperature special path, repeated backwards, non-contiguous inputs, and the
build itself (cache reuse, concurrent builds, the fallback when no compiler works), in subprocesses. The kernel
cases run against every instruction-set build this machine can execute (``build``: AVX-512, AVX2, generic
x86-64); tests/test_cpu_kernel_driver.py checks the aarch64 build under qemu-user.
"""

import math
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from test_loss import make_inputs, reference64, run
from tolerances import assert_close, assert_rms_close

from teskd_fast import teskd_loss
from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel
from teskd_fast.loss import LossOptions

F32_ULP = 2.0**-23  # relative spacing of float32 numbers in [1, 2)
NAN, INF = math.nan, math.inf


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    """Every test here runs the fused kernel for real, unless it switches it off. A machine without any C compiler
    skips them (the torch backend then runs its batched ops, tested in test_loss.py); with one, the kernel must
    build."""
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "1")
    if cpu_kernel._compiler() is None:
        pytest.skip("no C compiler on this machine: the fused CPU kernel cannot be built")
    available, reason = cpu_kernel.status()
    assert available, f"a C compiler is here, so the fused CPU kernel must build: {reason}"


def cpu_flags():
    """The CPU's feature flags (x86: /proc/cpuinfo's ``flags``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
# The kernel's builds, one per instruction-set branch of teskd_loss_cpu.c that this machine can run:
# name -> ($TESKD_FAST_CPU_KERNEL_ISA, what teskd_isa() must report, why it cannot run here or None).
BUILDS = {
    "avx512": ("native", "avx512f", None if "avx512f" in cpu_flags() else "this CPU has no AVX-512"),
    "avx2": ("avx2", "avx2", None if IS_X86 and "avx2" in cpu_flags() else "this CPU has no AVX2"),
    "generic": ("generic", "sse2" if IS_X86 else None, None),
}


@pytest.fixture(scope="module")
def isa_library(tmp_path_factory):
    """``isa_library(name)``: the kernel built for one of BUILDS (through $TESKD_FAST_CPU_KERNEL_ISA), in a cache
    of its own; checked to be that build."""
    native = cpu_kernel.library()
    built = {}

    def get(name):
        isa, reported, skip = BUILDS[name]
        if skip:
            pytest.skip(f"{name} build: {skip}")
        if name not in built:
            mp = pytest.MonkeyPatch()
            try:
                mp.setenv(cpu_kernel.ENV_ISA, isa)
                mp.setenv(cpu_kernel.ENV_CACHE, str(tmp_path_factory.mktemp(name)))
                mp.setitem(cpu_kernel._state, "lib", None)
                mp.setitem(cpu_kernel._state, "error", None)
                lib = cpu_kernel.library()
                assert lib is not None, f"the {name} build failed: {cpu_kernel._state['error']}"
                got = cpu_kernel.built_isa()
                assert reported is None or got == reported, f"the {name} build targets {got}, not {reported}"
            finally:
                mp.undo()
            built[name] = lib
        return built[name]

    yield get
    assert cpu_kernel.library() is native


@pytest.fixture(params=list(BUILDS))
def build(request, monkeypatch):
    """Each of the kernel's builds: AVX-512 (where the CPU has it), AVX2 (-mno-avx512f) and generic x86-64."""
    monkeypatch.setitem(cpu_kernel._state, "lib", request.getfixturevalue("isa_library")(request.param))
    return request.param


def set_path(monkeypatch, path, request=None):
    """``fused`` (this CPU's build), one of BUILDS, or ``batched`` (no kernel)."""
    if path in BUILDS:
        monkeypatch.setitem(cpu_kernel._state, "lib", request.getfixturevalue("isa_library")(path))
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0" if path == "batched" else "1")
    assert cpu_kernel.enabled() == (path != "batched")


def use_split(monkeypatch, split):
    """Make the kernel split rows into the ranges ``split(B)``; returns the list of the splits it used."""
    used = []

    def chunks(B, work):
        used.append(split(B))
        return used[-1]

    monkeypatch.setattr(cpu_kernel, "_chunks", chunks)
    if hasattr(cpu_kernel, "_OPTIONS"):  # the row ranges are cached per shape: start afresh
        monkeypatch.setattr(cpu_kernel, "_OPTIONS", {})
    return used


def compare(dtype, B, C, K, D, options, grad_out=1.7, scale=3.0, seed=0):
    """The torch backend against the float64 reference: total, parts and every gradient (as test_loss does)."""
    teacher, students, target, feats = make_inputs(B, C, K, D, dtype=dtype, scale=scale, seed=seed)
    if "ignore_index" in options:
        target[1::3] = options["ignore_index"]
    grad_out = torch.tensor(grad_out)
    got = run("torch", teacher, students, target, feats, grad_out, **options)
    want = reference64(teacher, students, target, feats, grad_out, **options)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(got[0], want[0], acc, "total", scale=10)
    for part in ("ce", "kd", "feat"):
        assert_close(got[1][part], want[1][part], acc, part, scale=10)
    for name, g, w in zip(["grad teacher", "grad students", "grad student features"], got[2:], want[2:], strict=True):
        if w is None:
            assert g is None, name
        elif g.numel() > 4096:
            assert_rms_close(g, w, acc, name, scale=2)
        else:
            assert_close(g, w, dtype, name)


# --- exp and log polynomials (float32) ---------------------------------------------------------------------------


def assert_ulps(name, x, got, want, ulps=4):
    """Relative error of ``got`` against the float64 ``want`` at most ``ulps`` float32 ulps (exact where want = 0)."""
    assert got.dtype == torch.float32 and got.shape == x.shape
    zero = want == 0
    assert (got[zero] == 0).all(), f"{name}: not exactly 0 at x = {x[zero & (got != 0)][:5].tolist()}"
    rel = ((got.double() - want).abs() / want.abs()).masked_fill(zero, 0)
    assert not rel.isnan().any(), f"{name}: NaN at x = {x[rel.isnan()][:5].tolist()}"
    i = int(rel.argmax())
    assert rel[i] <= ulps * F32_ULP, (
        f"{name}({x[i].item()!r}) = {got[i].item()!r}, expected {want[i].item()!r}: "
        f"{rel[i].item() / F32_ULP:.2f} ulp > {ulps}"
    )


def test_exp_polynomial_within_4_ulp(build):
    x = torch.cat(
        [
            torch.linspace(-87.0, 0.0, 400_001),
            torch.linspace(-87.3, -87.0, 1_001),  # down to the smallest normal results
            torch.tensor([1e-30, 1e-7, 0.5, 1.0, 2.0, 10.0, 44.5, 80.0, 87.9, 88.0]),
        ]
    )
    assert_ulps("exp", x, cpu_kernel._elementwise("exp", x), torch.exp(x.double()))


def test_log_polynomial_within_4_ulp(build):
    x = torch.cat(
        [
            torch.logspace(-38, 1, 400_001, dtype=torch.float64).float(),  # (1e-38, 10]
            torch.linspace(1 - 2**-7, 1 + 2**-7, 100_001),  # around 1, where log crosses 0
            torch.tensor([1.0, 0.5, 2.0, 0.70710677, 0.70710683, 1.17549435e-38]),
            # Subnormal inputs, which the kernel rescales by 2^23 first.
            torch.logspace(-45, -38, 20_001, dtype=torch.float64).float(),
            torch.tensor([1e-40, 1.4e-45, 2.8e-45, 1.1754942e-38]),
        ]
    )
    x = x[x > 0]
    assert (x < 1.17549435e-38).sum() > 10_000, "the subnormal inputs must survive the float32 conversion"
    assert_ulps("log", x, cpu_kernel._elementwise("log", x), torch.log(x.double()))


def test_exp_and_log_special_values(build):
    x = torch.tensor([-INF, -1000.0, -200.0, NAN, 0.0, -0.0])
    got = cpu_kernel._elementwise("exp", x)
    assert got[:3].tolist() == [0.0, 0.0, 0.0], f"exp(-inf), exp(-1000), exp(-200): {got[:3].tolist()}"
    assert got[3].isnan(), f"exp(nan) = {got[3].item()}"
    assert got[4:].tolist() == [1.0, 1.0], f"exp(0), exp(-0): {got[4:].tolist()}"

    x = torch.tensor([0.0, -0.0, -1.0, -1e-40, -INF, NAN, INF, 1.0])
    got = cpu_kernel._elementwise("log", x)
    assert got[:2].tolist() == [-INF, -INF], f"log(0), log(-0): {got[:2].tolist()}"
    assert got[2:6].isnan().all(), f"log(-1), log(-1e-40), log(-inf), log(nan): {got[2:6].tolist()}"
    assert got[6:].tolist() == [INF, 0.0], f"log(inf), log(1): {got[6:].tolist()}"


# --- row splits and threads --------------------------------------------------------------------------------------


def kernel_args(dtype, B=41, C=1000, K=3, D=64, temperature=4.0):
    """Arguments of cpu_kernel.fused_loss: ignored rows, label smoothing and unequal head weights included."""
    teacher, students, target, (f_t, f_s) = make_inputs(B, C, K, D, dtype=dtype, seed=3)
    target[1::4] = -100
    return dict(
        teacher=teacher,
        students=list(students.unbind(0)),
        target=target,
        teacher_feature=f_t,
        student_features=list(f_s.unbind(0)),
        head_weights=tuple(1.0 + 0.25 * h for h in range(K + 1)),
        options=LossOptions(temperature=temperature, feat_weight=1e-3, label_smoothing=0.1),
    )


def compute(args):
    total, parts, grad = cpu_kernel.fused_loss(**args)
    feature_grad = cpu_kernel.feature_grad(args["teacher_feature"], args["student_features"], 2e-3 * 1.7)
    return {"total": total, "parts": parts, "grad": grad, "feature grad": feature_grad}


def assert_identical(got, want):
    for name in want:
        assert torch.isfinite(want[name]).all(), f"{name}: non-finite values"
        same = torch.equal(got[name], want[name])
        assert same, (
            f"{name} differs between row splits: max abs difference {(got[name] - want[name]).abs().max().item()}"
        )


SPLITS = {
    "uneven": lambda B: [(0, 5), (5, 6), (6, B)],
    "out_of_order": lambda B: [(6, B), (0, 5), (5, 6)],
    "one_row_each": lambda B: [(b, b + 1) for b in range(B)],
}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("temperature", [4.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_split_gives_bitwise_identical_results(split, temperature, dtype, build, monkeypatch):
    args = kernel_args(dtype, temperature=temperature)
    B = args["teacher"].shape[0]
    used = use_split(monkeypatch, lambda B: [(0, B)])
    whole = compute(args)
    assert used == [[(0, B)]] * 2
    used = use_split(monkeypatch, SPLITS[split])
    assert_identical(compute(args), whole)
    assert used == [SPLITS[split](B)] * 2, "fused_loss and feature_grad must use the split"


def test_thread_pool_gives_bitwise_identical_results(build, monkeypatch):
    args = kernel_args(torch.float32)
    B = args["teacher"].shape[0]
    real_chunks = cpu_kernel._chunks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(cpu_kernel, "_MIN_PARALLEL_WORK", 1 << 62)
        used = use_split(monkeypatch, lambda B: real_chunks(B, 10**9))
        whole = compute(args)
        assert [len(u) for u in used] == [1, 1]
        monkeypatch.setattr(cpu_kernel, "_MIN_PARALLEL_WORK", 1)
        used = use_split(monkeypatch, lambda B: real_chunks(B, 10**9))
        assert_identical(compute(args), whole)
        assert [len(u) for u in used] == [2, 2], f"the rows must be split over two threads: {used}"
        # And through the autograd function, against the float64 reference.
        before = len(used)
        compare(torch.float32, B, 1000, 3, 64, {"temperature": 4.0, "label_smoothing": 0.1, "ignore_index": 2})
        assert len(used) > before and all(len(u) == 2 for u in used)
    finally:
        torch.set_num_threads(threads)


# --- the feature gradient ----------------------------------------------------------------------------------------


def features_with_edge_cases(dtype, B=7, D=37, K=3):
    g = torch.Generator().manual_seed(1)
    f_t = torch.randn(B, D, generator=g, dtype=torch.float64)
    f_s = torch.randn(K, B, D, generator=g, dtype=torch.float64)
    f_t[0], f_s[:, 0] = -f_t[0].abs(), -f_s[:, 0].abs()  # row 0: both <= 0 everywhere, gradient 0
    f_t[1, :5], f_s[:, 1, :5] = 0.0, 0.0  # exact zeros: not > 0
    f_t[1, 5], f_s[:, 1, 5] = -1.0, 0.0
    f_t[2, 3] = NAN  # every student's gradient there is NaN
    f_s[1, 4, 6] = NAN
    f_t[4, 6] = -2.0  # NaN against a negative teacher: NaN * 0 is NaN, as in the reference
    f_s[2, 5, 7] = INF
    f_s[0, 6, 8], f_t[6, 8] = -INF, 1.0  # mask 1: -inf
    f_s[0, 6, 9], f_t[6, 9] = -INF, -1.0  # mask 0: -inf * 0 is NaN
    return f_t.to(dtype), f_s.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feature_grad_is_the_masked_difference(dtype, build):
    f_t, f_s = features_with_edge_cases(dtype)
    scale = 2 * 0.05 * -1.7
    got = cpu_kernel.feature_grad(f_t, list(f_s.unbind(0)), scale)
    mask = ((f_s > 0) | (f_t > 0)).to(dtype)
    want = scale * (f_s - f_t) * mask
    assert got.shape == want.shape and got.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=2 * eps, atol=0, equal_nan=True)
    finite = torch.isfinite(f_s) & torch.isfinite(f_t)
    assert (got[(mask == 0) & finite] == 0).all(), "masked-out elements must have gradient exactly 0"
    assert (got[:, 0] == 0).all(), "row 0 (both features <= 0) must have gradient 0"
    assert got[:, 2, 3].isnan().all() and got[1, 4, 6].isnan() and got[0, 6, 9].isnan()
    assert got[2, 5, 7] == -INF and got[0, 6, 8] == INF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_feature_gradient_matches_the_reference_with_nan_and_inf(dtype):
    f_t, f_s = features_with_edge_cases(dtype)
    B, K = f_t.shape[0], f_s.shape[0]
    teacher, students, target, _ = make_inputs(B, 10, K, dtype=dtype)
    options = dict(feat_weight=0.05)
    got = run("torch", teacher, students, target, (f_t, f_s), torch.tensor(1.7), stacked=False, **options)
    want = run("reference", teacher, students, target, (f_t, f_s), torch.tensor(1.7), stacked=False, **options)
    torch.testing.assert_close(got[4], want[4], equal_nan=True, msg=lambda m: f"student feature gradient: {m}")
    assert got[4].isnan().any() and got[4].isinf().any(), "the edge cases must reach the gradient"


# --- NaN and inf -------------------------------------------------------------------------------------------------

BAD_VALUES = [
    # where, column, value
    ("teacher", 0, NAN),
    ("teacher", 3, NAN),
    ("teacher", 3, INF),
    ("teacher", 3, -INF),
    ("student", 0, NAN),
    ("student", 3, NAN),
    ("student", 3, INF),
    ("student", 3, -INF),
    ("teacher_feature", 3, NAN),
    ("teacher_feature", 3, INF),
    ("student_feature", 3, NAN),
    ("student_feature", 3, -INF),
]


def classify(t):
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    t = t.detach().double()
    return t.isnan().int() + 2 * (t == INF).int() + 3 * (t == -INF).int()


@pytest.mark.parametrize("ignored", [False, True], ids=["valid_row", "ignored_row"])
@pytest.mark.parametrize("case", BAD_VALUES, ids=lambda c: f"{c[0]}-col{c[1]}-{c[2]}")
@pytest.mark.parametrize("path", [*BUILDS, "batched"])
def test_nan_and_inf_like_the_reference(path, case, ignored, monkeypatch, request):
    where, col, value = case
    set_path(monkeypatch, path, request)
    teacher, students, target, (f_t, f_s) = make_inputs(6, 10, 3, 8)
    row = 2
    target[row] = -100 if ignored else (col + 1) % 10
    tensor = {"teacher": teacher, "student": students[1], "teacher_feature": f_t, "student_feature": f_s[2]}[where]
    tensor[row, col] = value
    got = run("torch", teacher, students, target, (f_t, f_s), torch.tensor(1.0), feat_weight=0.05)
    want = run("reference", teacher, students, target, (f_t, f_s), torch.tensor(1.0), feat_weight=0.05)
    if where in ("teacher", "student") and value != -INF:
        assert got[0].isnan(), f"a {value} logit must give a NaN loss, got {got[0].item()}"
    names = ["total", "ce", "kd", "feat", "grad teacher", "grad students", "grad student features"]
    got = [got[0], *got[1].values(), *got[2:]]
    want = [want[0], *want[1].values(), *want[2:]]
    for name, g, w in zip(names, got, want, strict=True):
        kinds = classify(g)
        same = torch.equal(kinds, classify(w))
        assert same, (
            f"{name}: NaN/inf pattern differs from the reference:\n{kinds.tolist()}\nvs\n{classify(w).tolist()}"
        )
        finite = kinds == 0
        assert_close(g.detach()[finite], w.detach()[finite], torch.float32, name, scale=10)


# --- shapes and options against the float64 reference -----------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"feat_weight": 0.05},
        {"label_smoothing": 0.1, "ignore_index": 1, "head_weights": [1.0, 1.25, 1.5, 1.75]},
        {"ce_weight": 0.7, "kd_weight": 1.3, "kd_eps": 1e-4, "temperature": 7.5, "detach_teacher": True},
    ],
)
def test_large_number_of_classes(options, build):
    compare(torch.float32, 2, 32768, 3, 512, options)


@pytest.mark.parametrize("scale", [3.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0, 4.0, 2.5, 0.5])
def test_temperatures(temperature, dtype, scale, build):
    """T = 1, 2, 3, 4 compute exp(d) as exp(d / T)^T; the others call exp twice. Logits spread by ``scale``."""
    options = {"temperature": temperature, "label_smoothing": 0.05, "feat_weight": 0.01}
    compare(dtype, 17, 1000, 3, 32, options, scale=scale, seed=int(temperature * 2))


@pytest.mark.parametrize("path", ["fused", "batched"])
def test_backward_twice_accumulates_exactly_twice(path, monkeypatch):
    set_path(monkeypatch, path)
    teacher, students, target, (f_t, f_s) = make_inputs(9, 50, 3, 16)
    leaves = [teacher.requires_grad_(), *(s.clone().requires_grad_() for s in students)]
    leaves += [f.clone().requires_grad_() for f in f_s]
    total = teskd_loss(leaves[0], leaves[1:4], target, f_t, leaves[4:], backend="torch", feat_weight=0.05)
    grad_out = torch.tensor(1.7)
    total.backward(grad_out, retain_graph=True)
    once = [leaf.grad.clone() for leaf in leaves]
    want = reference64(teacher, students, target, (f_t, f_s), grad_out, feat_weight=0.05)
    assert_close(once[0], want[2], torch.float32, "teacher grad")
    assert_close(torch.stack(once[1:4]), want[3], torch.float32, "student grads")
    assert_close(torch.stack(once[4:]), want[4], torch.float32, "student feature grads")
    total.backward(grad_out)
    for i, (leaf, g) in enumerate(zip(leaves, once, strict=True)):
        same = torch.equal(leaf.grad, 2 * g)
        assert same, f"input {i}: the second backward did not add the same gradient"


@pytest.mark.parametrize("modified", ["teacher", "student", "target", "student_feature"])
@pytest.mark.parametrize("path", ["fused", "batched"])
def test_second_backward_after_in_place_change_of_an_input(path, modified, monkeypatch):
    """retain_graph=True, then an input modified in place: the second backward either raises (as PyTorch's own
    losses do for the tensors they save) or adds the gradient of the forward's inputs again, never another one."""
    set_path(monkeypatch, path)
    teacher, students, target, (f_t, f_s) = make_inputs(9, 50, 3, 16)
    leaves = [teacher.requires_grad_(), *(s.clone().requires_grad_() for s in students)]
    leaves += [f.clone().requires_grad_() for f in f_s]
    total = teskd_loss(leaves[0], leaves[1:4], target, f_t, leaves[4:], backend="torch", feat_weight=0.05)
    total.backward(retain_graph=True)
    once = [leaf.grad.clone() for leaf in leaves]
    with torch.no_grad():
        if modified == "target":
            target.add_(1).remainder_(50)  # other classes, still in range
        else:
            {"teacher": leaves[0], "student": leaves[2], "student_feature": leaves[5]}[modified].mul_(-3)
    try:
        total.backward()
    except RuntimeError as exc:
        assert "in place" in str(exc) or "inplace" in str(exc), exc
        return
    for i, (leaf, g) in enumerate(zip(leaves, once, strict=True)):
        same = torch.equal(leaf.grad, 2 * g)
        assert same, f"input {i}: the second backward used the modified {modified}, not the forward's inputs"


@pytest.mark.parametrize("path", ["fused", "batched"])
def test_in_place_ops_on_the_loss(path, monkeypatch):
    """``loss /= accumulation_steps`` before backward, as with the reference backend and plain PyTorch losses."""
    set_path(monkeypatch, path)
    teacher, students, target, (f_t, f_s) = make_inputs(6, 10, 3, 8)
    leaves = [teacher.clone().requires_grad_(), students.clone().requires_grad_()]
    loss = teskd_loss(*leaves, target, f_t, f_s, backend="torch")
    loss /= 4
    loss.backward()
    want = reference64(teacher, students, target, (f_t, f_s), torch.tensor(0.25))
    assert_close(loss, want[0] / 4, torch.float32, "total / 4", scale=10)
    assert_close(leaves[0].grad, want[2], torch.float32, "teacher grad")
    assert_close(leaves[1].grad, want[3], torch.float32, "student grads")


@pytest.mark.parametrize("position", [3, 30])
@pytest.mark.parametrize("bad", [10, -3, 1 << 40])
@pytest.mark.parametrize("path", ["fused", "fused-split", "batched"])
def test_out_of_range_targets_are_rejected(path, bad, position, monkeypatch):
    """The fused kernel checks the targets itself (loss.py then skips its own check), in every row range."""
    set_path(monkeypatch, "batched" if path == "batched" else "fused")
    if path == "fused-split":
        used = use_split(monkeypatch, SPLITS["uneven"])
    teacher, students, target, feats = make_inputs(41, 10, 2, 8)
    target[1:3] = -100
    target[position] = bad
    target[35] = 11
    with pytest.raises(ValueError, match=rf"target: class index {bad} at position {position} is out of range"):
        teskd_loss(teacher, students, target, *feats, backend="torch")
    if path == "fused-split":
        assert used, "the split was not used"


@pytest.mark.parametrize("ignore_index", [-100, 10, 255])
@pytest.mark.parametrize("path", ["fused", "batched"])
def test_ignore_index_outside_the_classes(path, ignore_index, monkeypatch):
    set_path(monkeypatch, path)
    compare(torch.float32, 9, 10, 2, 8, {"ignore_index": ignore_index, "label_smoothing": 0.1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_contiguous_inputs(dtype, build):
    B, C, K, D = 13, 100, 3, 24
    teacher, students, target, (f_t, f_s) = make_inputs(B, C, K, D, dtype=dtype)
    wide = torch.zeros(B, 2 * C, dtype=dtype)
    wide[:, ::2] = teacher
    views = {
        "teacher": wide[:, ::2],  # every other column
        "students": students.transpose(0, 1).contiguous().transpose(0, 1),  # [K, B, C], the K dimension innermost
        "target": torch.stack([target, target], 1)[:, 0],
        "teacher_feature": f_t.t().contiguous().t(),  # column-major
        "student_features": [f.t().contiguous().t() for f in f_s],
    }
    flat = [views["teacher"], views["students"], views["target"], views["teacher_feature"], *views["student_features"]]
    assert not any(t.is_contiguous() for t in flat)
    assert all(torch.equal(a, b) for a, b in zip(flat, [teacher, students, target, f_t, *f_s], strict=True))

    def loss(teacher, students, target, f_t, f_s):
        leaves = [teacher.detach().requires_grad_(), students.detach().requires_grad_()]
        leaves += [f.detach().requires_grad_() for f in f_s]
        options = dict(backend="torch", return_parts=True, feat_weight=0.05, label_smoothing=0.1, temperature=3.0)
        total, parts = teskd_loss(leaves[0], leaves[1], target, f_t, leaves[2:], **options)
        total.backward(torch.tensor(-0.6))
        return [total, *parts.values(), *(leaf.grad for leaf in leaves)]

    got = loss(*views.values())
    want = loss(teacher, students, target, f_t, list(f_s))
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        same = torch.equal(g, w)
        assert same, f"output {i} differs for non-contiguous inputs"


def test_torch_backend_calls_the_kernel_only_when_enabled(monkeypatch):
    calls = []

    def spy(name):
        real = getattr(cpu_kernel, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(cpu_kernel, name, wrapper)

    spy("fused_loss")
    spy("feature_grad")
    teacher, students, target, (f_t, f_s) = make_inputs(5, 10, 2, 8)
    # The forward's call also writes the feature gradient; a second backward recomputes both gradients.
    fused = ["fused_loss"], ["fused_loss", "fused_loss", "feature_grad"]
    for switch, expected in (("1", fused), ("0", ([], []))):
        monkeypatch.setenv(cpu_kernel.ENV_SWITCH, switch)
        calls.clear()
        f_s = f_s.clone().requires_grad_()
        total = teskd_loss(teacher, students, target, f_t, f_s, backend="torch")
        total.backward(retain_graph=True)
        assert calls == expected[0], f"{cpu_kernel.ENV_SWITCH}={switch}: kernel calls {calls}"
        total.backward()
        assert calls == expected[1], f"{cpu_kernel.ENV_SWITCH}={switch}, second backward: kernel calls {calls}"
    # Student features that need no gradient: none is computed.
    calls.clear()
    monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "1")
    real = cpu_kernel.fused_loss
    monkeypatch.setattr(cpu_kernel, "fused_loss", lambda *a: calls.append(a[-1]) or real(*a))
    teskd_loss(teacher.requires_grad_(), students, target, f_t, f_s.detach(), backend="torch").backward()
    flags = [c for c in calls if isinstance(c, bool)]  # (the spy above also records the call's name)
    assert flags == [False], f"with_feature_grad for features without requires_grad: {calls}"


# --- building: the cache, concurrent builds, the fallback --------------------------------------------------------

LOSS_SCRIPT = r"""
import sys, warnings
import torch
from teskd_fast import teskd_loss
from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel

g = torch.Generator().manual_seed(0)
teacher = torch.randn(6, 10, generator=g) * 3
students = torch.randn(3, 6, 10, generator=g) * 3
target = torch.randint(0, 10, (6,), generator=g)
f_t = torch.randn(6, 8, generator=g).clamp_min(0)
f_s = torch.randn(3, 6, 8, generator=g)
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for backend in ("torch", "torch", "reference"):
        leaves = [x.clone().requires_grad_() for x in (teacher, students, f_s)]
        total = teskd_loss(leaves[0], leaves[1], target, f_t, leaves[2], backend=backend, feat_weight=0.05)
        total.backward()
        out.setdefault(backend, []).append([total.detach(), *(x.grad for x in leaves)])
out["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
if sys.argv[2] == "status":
    out["status"] = list(cpu_kernel.status())
torch.save(out, sys.argv[1])
"""


def write_script(path, text):
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def start_loss_script(tmp_path, env, name, status=True):
    """Run LOSS_SCRIPT in a fresh interpreter; returns the process and the path its results go to."""
    out = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-c", LOSS_SCRIPT, str(out), "status" if status else "-"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def finish(proc, out):
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"the subprocess failed:\n{output}"
    return torch.load(out)


def run_loss_script(tmp_path, env, name, status=True):
    return finish(*start_loss_script(tmp_path, env, name, status))


def check_results(res):
    """Both torch-backend calls agree with the reference backend (same process, same inputs)."""
    (ref,) = res["reference"]
    for i, call in enumerate(res["torch"]):
        names = ["total", "grad teacher", "grad students", "grad student features"]
        for name, g, w in zip(names, call, ref, strict=True):
            assert_close(g, w, torch.float32, f"call {i}: {name}", scale=10)


def real_compiler():
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("no C compiler found, but the kernel was built")


def logging_compiler(tmp_path):
    """A compiler that records every call in a log, then runs the real one."""
    log = tmp_path / "cc.log"
    cc = write_script(tmp_path / "logcc", f'echo "$*" >> "{log}"\nexec "{real_compiler()}" "$@"\n')
    return cc, log


def compilations(log):
    """The compile commands in the log (not the --version queries)."""
    return [line for line in log.read_text().splitlines() if " -o " in f" {line} "] if log.exists() else []


def cache_contents(cache):
    names = sorted(os.listdir(cache))
    libraries = [n for n in names if n.startswith("teskd_loss_cpu_") and n.endswith(".so")]
    leftovers = [n for n in names if "tmp" in n]
    return libraries, leftovers


def test_build_once_then_reuse_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    cc, log = logging_compiler(tmp_path)
    env = dict(os.environ, TESKD_FAST_CACHE_DIR=str(cache), CC=str(cc), TESKD_FAST_CPU_KERNEL="1")

    first = run_loss_script(tmp_path, env, "first")
    assert first["status"] == [True, None]
    check_results(first)
    libraries, leftovers = cache_contents(cache)
    assert len(libraries) == 1 and not leftovers, f"cache after the first run: {sorted(os.listdir(cache))}"
    built = len(compilations(log))
    assert built >= 1, f"the compiler was not called: {log.read_text() if log.exists() else 'no log'}"
    stat = (cache / libraries[0]).stat()

    second = run_loss_script(tmp_path, env, "second")
    assert second["status"] == [True, None]
    check_results(second)
    assert cache_contents(cache) == (libraries, []), f"cache after the second run: {sorted(os.listdir(cache))}"
    again = (cache / libraries[0]).stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), "the library was rebuilt"
    assert len(compilations(log)) == built, f"the second run compiled again:\n{log.read_text()}"


def test_concurrent_first_builds_share_one_library(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, TESKD_FAST_CACHE_DIR=str(cache), TESKD_FAST_CPU_KERNEL="1")
    procs = [start_loss_script(tmp_path, env, f"run{i}") for i in range(2)]
    for proc, out in procs:
        res = finish(proc, out)
        assert res["status"] == [True, None]
        check_results(res)
    libraries, leftovers = cache_contents(cache)
    assert len(libraries) == 1 and not leftovers, f"cache: {sorted(os.listdir(cache))}"


@pytest.fixture
def no_working_compiler(tmp_path):
    """An environment whose only compiler ($CC) fails, and whose PATH holds no other."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "failcc.log"
    fail = 'echo "failcc: simulated compiler failure" >&2\nexit 1\n'
    cc = write_script(bin_dir / "failcc", f'echo "$*" >> "{log}"\n{fail}')
    for name in ("cc", "gcc", "clang"):
        assert shutil.which(name, path=str(bin_dir)) is None
    cache = tmp_path / "cache"
    env = dict(os.environ, PATH=str(bin_dir), CC=str(cc), TESKD_FAST_CACHE_DIR=str(cache))
    env.pop(cpu_kernel.ENV_SWITCH, None)
    return env, log, cache


def test_fallback_when_the_kernel_cannot_be_built(tmp_path, no_working_compiler):
    env, log, cache = no_working_compiler
    res = run_loss_script(tmp_path, env, "fallback")
    available, reason = res["status"]
    assert available is False
    assert isinstance(reason, str) and "simulated compiler failure" in reason, f"reason: {reason!r}"
    assert log.exists(), "the failing compiler was never called"
    check_results(res)
    warned = [w for w in res["warnings"] if cpu_kernel.ENV_SWITCH in w]
    assert len(warned) == 1 and warned[0].startswith("RuntimeWarning"), f"warnings: {res['warnings']}"
    if cache.exists():
        assert os.listdir(cache) == [], f"a failed build left files: {os.listdir(cache)}"


def test_switched_off_kernel_is_silent_and_never_built(tmp_path, no_working_compiler):
    env, log, cache = no_working_compiler
    env[cpu_kernel.ENV_SWITCH] = "0"
    res = run_loss_script(tmp_path, env, "off", status=False)
    check_results(res)
    assert not [w for w in res["warnings"] if "teskd" in w.lower()], f"warnings: {res['warnings']}"
    assert not log.exists(), f"the compiler was called with the kernel switched off:\n{log.read_text()}"


def test_instruction_set_choice_is_part_of_the_cache_key(tmp_path, monkeypatch):
    """$TESKD_FAST_CPU_KERNEL_ISA builds another library beside the native one in the same cache, and each
    reports its branch; an unknown name is an error (the batched ops are then used)."""
    monkeypatch.setenv(cpu_kernel.ENV_CACHE, str(tmp_path))
    names = {}
    for isa in ("native", "generic", "native"):
        monkeypatch.setenv(cpu_kernel.ENV_ISA, isa)
        monkeypatch.setitem(cpu_kernel._state, "lib", None)
        monkeypatch.setitem(cpu_kernel._state, "error", None)
        assert cpu_kernel.library() is not None, cpu_kernel._state["error"]
        names.setdefault(isa, set()).add(cpu_kernel.library()._name)
        if isa == "generic" and IS_X86:
            assert cpu_kernel.built_isa() == "sse2"
    assert len(names["native"]) == 1 and names["native"] != names["generic"]
    assert len(cache_contents(tmp_path)[0]) == 2, sorted(os.listdir(tmp_path))

    monkeypatch.setenv(cpu_kernel.ENV_ISA, "avx9000")
    monkeypatch.setitem(cpu_kernel._state, "lib", None)
    monkeypatch.setitem(cpu_kernel._state, "error", None)
    available, reason = cpu_kernel.status()
    assert not available and cpu_kernel.ENV_ISA in reason and "avx9000" in reason, reason
