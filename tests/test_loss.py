"""The TESKD loss: every backend against the float64 reference, values and every gradient."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from tolerances import assert_close, assert_rms_close

import teskd_fast
from teskd_fast import TESKDLoss, TESKDOutput, teskd_loss
from teskd_fast.loss import LossOptions

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
# Triton runs for real on a GPU, under the interpreter on the CPU otherwise.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
LOW = (torch.bfloat16, torch.float16)


def make_inputs(B, C, K, D=None, dtype=torch.float32, device="cpu", stacked=False, scale=3.0, seed=0):
    """Logits with a realistic spread, targets, and ReLU-like features (exact zeros included)."""
    g = torch.Generator().manual_seed(seed)
    teacher = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    students = (torch.randn(K, B, C, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    target = torch.randint(0, C, (B,), generator=g).to(device)
    feats = None
    if D is not None:
        f_t = torch.randn(B, D, generator=g, dtype=torch.float64).clamp_min(0).to(device, dtype)
        f_s = torch.randn(K, B, D, generator=g, dtype=torch.float64).clamp_min(-0.5).to(device, dtype)
        feats = (f_t, f_s)
    return teacher, students, target, feats


def run(backend, teacher, students, target, feats, grad_out, stacked=True, feature_4d=False, **options):
    """The loss and the gradients of the teacher logits, every student and every student feature."""
    teacher = teacher.detach().clone().requires_grad_()
    students = students.detach().clone().requires_grad_()
    student_arg = students if stacked else list(students.unbind(0))
    args = [teacher, student_arg, target]
    f_s = None
    if feats is not None:
        f_t = feats[0].detach().clone().requires_grad_()
        f_s = feats[1].detach().clone().requires_grad_()
        if feature_4d:
            args += [f_t[:, :, None, None], [f[:, :, None, None] for f in f_s.unbind(0)]]
        else:
            args += [f_t, f_s if stacked else list(f_s.unbind(0))]
    total, parts = teskd_loss(*args, backend=backend, return_parts=True, **options)
    total.backward(grad_out.to(total))
    if feats is not None:
        assert f_t.grad is None, "the teacher feature must receive no gradient"
    return total, parts, teacher.grad, students.grad, None if f_s is None else f_s.grad


def reference64(teacher, students, target, feats, grad_out, **options):
    f64 = None if feats is None else tuple(f.double() for f in feats)
    return run("reference", teacher.double(), students.double(), target, f64, grad_out.double(), **options)


def check_against_reference(backend, dtype, B, C, K, D, options, grad_out, stacked=True, feature_4d=False):
    teacher, students, target, feats = make_inputs(
        B, C, K, D, dtype=dtype, device=TRITON_DEVICE if backend == "triton" else "cpu"
    )
    if "ignore_index" in options:
        target[1::3] = options["ignore_index"]
    got = run(backend, teacher, students, target, feats, grad_out, stacked=stacked, feature_4d=feature_4d, **options)
    want = reference64(teacher, students, target, feats, grad_out, **options)
    names = ["total", "parts", "grad teacher", "grad students", "grad student features"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Scalars are computed in float32 at least whatever the input dtype.
    assert_close(got[0], want[0], acc, f"{backend} total", scale=10)
    for part in ("ce", "kd", "feat"):
        assert_close(got[1][part], want[1][part], acc, f"{backend} {part}", scale=10)
    for name, g, w in zip(names[2:], got[2:], want[2:], strict=True):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected the input dtype {dtype}"
        if dtype in LOW or g.numel() > 4096:
            assert_rms_close(g, w, dtype if dtype in LOW else acc, f"{backend} {name}", scale=2)
        else:
            assert_close(g, w, dtype, f"{backend} {name}", scale=1)


OPTIONS = [
    {},
    {"temperature": 2.0, "detach_teacher": True},
    {"label_smoothing": 0.1, "ignore_index": 1, "head_weights": "ramp"},
    {"ce_weight": 0.7, "kd_weight": 1.3, "feat_weight": 0.05, "kd_eps": 1e-4, "temperature": 7.5},
]


def grad_output(dtype):
    # float16 training always runs with a loss scaler: without one, gradients of 1e-7 * features are subnormal.
    return torch.tensor(1024.0 if dtype == torch.float16 else 1.7)


@pytest.fixture(params=["fused", "batched"])
def cpu_path(request, monkeypatch):
    """The torch backend's two CPU forwards: the fused C kernel (kernels/teskd_loss_cpu.py) or the batched ops."""
    from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel

    fused = request.param == "fused"
    monkeypatch.setenv("TESKD_FAST_CPU_KERNEL", "1" if fused else "0")
    if fused:
        if cpu_kernel._compiler() is None:
            pytest.skip("no C compiler on this machine: the fused CPU kernel cannot be built (batched path tested)")
        available, reason = cpu_kernel.status()
        assert available, f"a C compiler is here, so the fused CPU kernel must build: {reason}"
    assert cpu_kernel.enabled() == fused
    return request.param


def resolve(options, K):
    options = dict(options)
    if options.get("head_weights") == "ramp":
        options["head_weights"] = [1.0 + 0.25 * i for i in range(K + 1)]
    return options


# Torch backend: the full cartesian product of the shapes is cheap in float64, on both CPU paths.
@pytest.mark.parametrize("B", [1, 3, 41, 128])
@pytest.mark.parametrize("C", [2, 10, 100, 1000, 1271, 4099])
@pytest.mark.parametrize("K", [1, 3, 4])
def test_torch_backend_shapes_float64(B, C, K, cpu_path):
    idx = (B + C + K) % len(OPTIONS)
    D = None if (B + K) % 2 else 24
    grad_out = torch.tensor(1.0) if C % 2 else torch.tensor(-0.37)
    check_against_reference("torch", torch.float64, B, C, K, D, resolve(OPTIONS[idx], K), grad_out)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stacked", [True, False])
def test_torch_backend_dtypes_and_options(options, dtype, stacked, cpu_path):
    check_against_reference(
        "torch", dtype, 41, 100, 3, 64, resolve(options, 3), grad_output(dtype), stacked=stacked, feature_4d=not stacked
    )


# Triton backend: under TRITON_INTERPRET=1 every program runs on the CPU, so a covering subset of the shapes.
TRITON_CASES = [
    # B, C, K, D, options index
    (1, 2, 1, None, 0),
    (3, 10, 3, 24, 1),
    (41, 100, 3, 64, 2),
    (3, 1000, 4, 512, 3),
    (3, 1271, 3, None, 2),
    (2, 4099, 1, 24, 1),
    (128, 100, 3, 512, 0),
    (2, 32768, 3, None, 3),
]


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails the comparison."""
    from teskd_fast.kernels import teskd_loss as mod

    def empty(shape, dtype=None, device=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def empty_like(t, dtype=None):
        return torch.full_like(t, float("nan"), dtype=dtype)

    monkeypatch.setattr(mod, "_empty", empty)
    monkeypatch.setattr(mod, "_empty_like", empty_like)


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "B{}-C{}-K{}-D{}-opt{}".format(*c))
@pytest.mark.parametrize("grad_out", [1.0, -0.37])
def test_triton_backend_float32(case, grad_out, poisoned):
    B, C, K, D, idx = case
    check_against_reference("triton", torch.float32, B, C, K, D, resolve(OPTIONS[idx], K), torch.tensor(grad_out))


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx", range(len(OPTIONS)))
def test_triton_backend_low_precision(dtype, idx, poisoned):
    check_against_reference(
        "triton", dtype, 17, 1000, 3, 96, resolve(OPTIONS[idx], 3), grad_output(dtype), stacked=bool(idx % 2)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("B,C", [(256, 1000), (1024, 1000), (64, 32768)])
def test_triton_backend_gpu_sizes(B, C, poisoned):
    for dtype in (torch.float32, torch.bfloat16):
        teacher, students, target, feats = make_inputs(B, C, 3, 512, dtype=dtype, device="cuda")
        got = run("triton", teacher, students, target, feats, torch.tensor(1.0, device="cuda"))
        want = reference64(teacher, students, target, feats, torch.tensor(1.0, device="cuda"))
        assert_close(got[0], want[0], torch.float32, "total", scale=10)
        for g, w in zip(got[2:], want[2:], strict=True):
            assert_rms_close(g, w, dtype if dtype in LOW else torch.float32, "grad", scale=2)


def test_auto_backend_picks_torch_on_cpu():
    teacher, students, target, feats = make_inputs(8, 10, 3, 16)
    a = teskd_loss(teacher, students, target, *feats, backend="auto")
    b = teskd_loss(teacher, students, target, *feats, backend="torch")
    assert torch.equal(a, b)


def test_gradcheck_torch_backend(cpu_path):
    teacher, students, target, feats = make_inputs(4, 7, 3, 5, dtype=torch.float64, scale=1.0)
    f_t, f_s = feats
    # Features away from the mask's kink at 0, where the loss is not differentiable.
    f_s = torch.where(f_s.abs() < 1e-3, torch.full_like(f_s, 0.1), f_s)
    target[1] = -100
    inputs = [t.clone().requires_grad_() for t in (teacher, students, f_s)]

    def fn(t, s, fs):
        return teskd_loss(t, s, target, f_t, fs, backend="torch", feat_weight=0.1, label_smoothing=0.1, temperature=3.0)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def _double_backward_inputs():
    teacher, students, target, feats = make_inputs(3, 5, 2, 4, dtype=torch.float64, scale=1.0)
    f_t, f_s = feats
    f_s = torch.where(f_s.abs() < 1e-3, torch.full_like(f_s, 0.1), f_s)  # away from the mask's kink at 0
    target[1] = -100
    return teacher, students, target, f_t, f_s


@pytest.mark.parametrize("stacked", [True, False])
def test_gradgradcheck_torch_backend(stacked, cpu_path):
    # Second-order gradients of the torch backend were silently wrong (0 where the reference has 0.09, issue 34).
    teacher, students, target, f_t, f_s = _double_backward_inputs()
    inputs = [t.clone().requires_grad_() for t in (teacher, students, f_s)]

    def fn(t, s, fs):
        s, fs = (s, fs) if stacked else (list(s.unbind(0)), list(fs.unbind(0)))
        return teskd_loss(t, s, target, f_t, fs, backend="torch", feat_weight=0.1, label_smoothing=0.1,
                          temperature=3.0, head_weights=[1.0, 0.5, 2.0])  # fmt: skip

    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_second_order_gradients_match_the_reference(backend, cpu_path):
    """The issue's case: g = d loss(t * w) / dt with create_graph, then backward of (g ** 2).sum()."""
    teacher, students, target, f_t, f_s = _double_backward_inputs()
    got = {}
    for name in ("reference", backend):
        t = teacher.clone().requires_grad_()
        w = torch.linspace(0.5, 1.5, t.numel(), dtype=torch.float64).view_as(t).requires_grad_()
        s = students.clone().requires_grad_()
        fs = f_s.clone().requires_grad_()
        loss = teskd_loss(t * w, s, target, f_t, fs, backend=name, feat_weight=0.1)
        g_t, g_s, g_f = torch.autograd.grad(loss, (t, s, fs), create_graph=True)
        ((g_t**2).sum() + (g_s**3).sum() + (g_f * fs).sum()).backward()
        got[name] = (t.grad, w.grad, s.grad, fs.grad)
    for label, a, b in zip(("d/dt", "d/dw", "d/ds", "d/dfs"), got[backend], got["reference"], strict=True):
        assert b.norm() > 1e-3, label  # a second derivative that is really there
        assert_close(a, b, torch.float64, f"{backend} {label}")


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_refuses_second_order_gradients():
    teacher, students, target, _ = make_inputs(3, 5, 2, device=TRITON_DEVICE)
    t = teacher.clone().requires_grad_()
    w = torch.full_like(t, 1.3, requires_grad=True)
    g, = torch.autograd.grad(teskd_loss(t * w, students, target, backend="triton"), t, create_graph=True)
    with pytest.raises(RuntimeError, match=r"backend='triton'\) has no second-order gradients.*use backend='torch'"):
        (g**2).sum().backward()
    # A first-order backward with create_graph=True (for another term's sake) still works.
    g, = torch.autograd.grad(teskd_loss(t, students, target, backend="triton"), t, create_graph=True)
    assert torch.isfinite(g).all()


MIXED = [
    # (teacher logits, students, teacher feature, student features): as autocast leaves them, and float64 mixes
    (torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16),  # timm ConvNeXt's head under bf16 autocast
    (torch.float16, torch.float16, torch.float32, torch.float16),
    (torch.float32, torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float64, torch.float32, torch.float32, torch.float64),
    (torch.float32, torch.float64, torch.float64, torch.float32),
]


def _mixed_inputs(dtypes, device="cpu"):
    teacher, students, target, (f_t, f_s) = make_inputs(6, 11, 3, 8, dtype=torch.float64, device=device)
    return [x.to(d) for x, d in zip((teacher, students, f_t, f_s), dtypes, strict=True)], target


_TRITON_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")]
MIXED_CASES = [
    pytest.param(backend, dtypes, marks=_TRITON_MARKS if backend == "triton" else (),
                 id=f"{backend}-" + "-".join(str(x).removeprefix("torch.") for x in dtypes))
    for backend in ("reference", "torch", "triton")
    for dtypes in MIXED
    if not (backend == "triton" and torch.float64 in dtypes)  # Triton takes no float64
]  # fmt: skip


@pytest.mark.parametrize("backend, dtypes", MIXED_CASES)
@pytest.mark.parametrize("stacked", [True, False])
def test_mixed_input_dtypes(backend, dtypes, stacked, cpu_path):
    """Inputs of mixed floating dtypes: computed in float32 (float64 where one is), each gradient in its input's
    dtype, against the float64 reference of the same (rounded) values."""
    if backend != "torch" and cpu_path == "batched":
        pytest.skip("one CPU path is enough for the other backends")
    (teacher, students, f_t, f_s), target = _mixed_inputs(dtypes, TRITON_DEVICE if backend == "triton" else "cpu")
    leaves = [x.clone().requires_grad_() for x in (teacher, students, f_s)]
    t, s, fs = leaves
    s_arg, fs_arg = (s, fs) if stacked else (list(s.unbind(0)), list(fs.unbind(0)))
    total, parts = teskd_loss(t, s_arg, target, f_t, fs_arg, backend=backend, return_parts=True, feat_weight=0.05)
    grad_out = torch.tensor(1.7)
    total.backward(grad_out.to(total))
    want = reference64(teacher, students, target, (f_t, f_s), grad_out, feat_weight=0.05)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    assert total.dtype == acc
    assert_close(total, want[0], acc, f"{backend} total", scale=10)
    for part in parts:
        assert_close(parts[part], want[1][part], acc, f"{backend} {part}", scale=10)
    for name, leaf, w in zip(("teacher", "students", "student features"), leaves, want[2:], strict=True):
        assert leaf.grad.dtype == leaf.dtype, f"{name}: gradient in {leaf.grad.dtype}, not its input's {leaf.dtype}"
        # Rounded once, to the input's dtype.
        assert_rms_close(leaf.grad, w, leaf.dtype, f"{backend} grad {name}", scale=2)


def _graph_nodes(root):
    """The names of the autograd nodes reachable from ``root``."""
    names, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize("form", ["stacked logits, list features", "list logits, stacked features"])
def test_torch_backend_mixed_student_forms(form, cpu_path):
    """Stacked students enter the loss as one tensor and get their gradient as one block: no unbind of the input,
    no stack of the K gradients in autograd; a list's tensors get theirs directly. Any mix of the two forms."""
    B, C, K, D = 9, 30, 3, 16
    teacher, students, target, (f_t, f_s) = make_inputs(B, C, K, D, dtype=torch.float64)
    stacked_logits = form.startswith("stacked")
    s = students.clone().requires_grad_()
    fs = f_s.clone().requires_grad_()
    s_arg = s if stacked_logits else list(s.unbind(0))
    fs_arg = list(fs.unbind(0)) if stacked_logits else fs
    t = teacher.clone().requires_grad_()
    total = teskd_loss(t, s_arg, target, f_t, fs_arg, backend="torch", feat_weight=0.05)
    grad_out = torch.tensor(-0.8, dtype=torch.float64)
    total.backward(grad_out)
    want = reference64(teacher, students, target, (f_t, f_s), grad_out, feat_weight=0.05)
    assert_close(total, want[0], torch.float64, "total", scale=10)
    assert_close(t.grad, want[2], torch.float64, "grad teacher")
    assert_close(s.grad, want[3], torch.float64, "grad students")
    assert_close(fs.grad, want[4], torch.float64, "grad student features")

    # Both stacked: the loss's node takes the two stacked leaves directly, with nothing in between.
    s2, fs2 = students.clone().requires_grad_(), f_s.clone().requires_grad_()
    total = teskd_loss(teacher, s2, target, f_t, fs2, backend="torch", feat_weight=0.05)
    function = "FusedLossFunctionBackward" if cpu_path == "fused" else "BatchedLossFunctionBackward"
    assert _graph_nodes(total.grad_fn) == {function, "AccumulateGrad"}
    total.backward(grad_out)
    assert_close(s2.grad, want[3], torch.float64, "grad stacked students")
    assert_close(fs2.grad, want[4], torch.float64, "grad stacked student features")


def test_torch_backend_one_stacked_student_with_a_zero_first_stride(cpu_path):
    """A ``[1, B, C]`` student (and feature) tensor whose first stride is 0 is still contiguous: the kernel's
    pointers into it must not assume a non-zero step between students."""
    B, C, D = 5, 11, 7
    teacher, students, target, (f_t, f_s) = make_inputs(B, C, 1, D, dtype=torch.float64)
    s = students[0].clone().as_strided((1, B, C), (0, C, 1)).requires_grad_()
    fs = f_s[0].clone().as_strided((1, B, D), (0, D, 1)).requires_grad_()
    assert s.is_contiguous() and s.stride(0) == 0
    total = teskd_loss(teacher, s, target, f_t, fs, backend="torch", feat_weight=0.05)
    grad_out = torch.tensor(1.3, dtype=torch.float64)
    total.backward(grad_out)
    want = reference64(teacher, students, target, (f_t, f_s), grad_out, feat_weight=0.05)
    assert_close(total, want[0], torch.float64, "total", scale=10)
    assert_close(s.grad, want[3], torch.float64, "grad student")
    assert_close(fs.grad, want[4], torch.float64, "grad student feature")


def test_torch_backend_gradients_reach_the_inputs_that_need_them(cpu_path):
    """Listed students and features of which only some require a gradient: each gradient lands on its own input
    (the teacher's, student 1's logits, student 2's feature), the others get none."""
    B, C, K, D = 6, 9, 3, 5
    teacher, students, target, (f_t, f_s) = make_inputs(B, C, K, D, dtype=torch.float64)
    t = teacher.clone().requires_grad_()
    s = [x.clone().requires_grad_(k == 1) for k, x in enumerate(students.unbind(0))]
    fs = [x.clone().requires_grad_(k == 2) for k, x in enumerate(f_s.unbind(0))]
    grad_out = torch.tensor(0.6, dtype=torch.float64)
    teskd_loss(t, s, target, f_t, fs, backend="torch", feat_weight=0.05).backward(grad_out)
    want = reference64(teacher, students, target, (f_t, f_s), grad_out, feat_weight=0.05)
    assert_close(t.grad, want[2], torch.float64, "grad teacher")
    assert_close(s[1].grad, want[3][1], torch.float64, "grad student 1")
    assert_close(fs[2].grad, want[4][2], torch.float64, "grad student feature 2")
    assert [x.grad is None for x in s + fs] == [True, False, True, True, True, False]


def _strided(t):
    """``t``'s values in a non-contiguous tensor: its last two dimensions' transpose, transposed back."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("stacked", [True, False])
def test_torch_backend_takes_non_contiguous_inputs(stacked, cpu_path):
    """Non-contiguous logits, targets and features (transposed views, a strided target) on both CPU paths, against
    the reference: the batched path once failed on them (``view size is not compatible``)."""
    B, C, K, D = 4, 5, 3, 6
    teacher, students, target, (f_t, f_s) = make_inputs(B, C, K, D, dtype=torch.float64)
    t, s, fs = (_strided(x).requires_grad_() for x in (teacher, students, f_s))
    assert not (t.is_contiguous() or s.is_contiguous() or fs.is_contiguous())
    s_arg = s if stacked else [_strided(x) for x in s.unbind(0)]
    fs_arg = fs if stacked else [_strided(x) for x in fs.unbind(0)]
    strided_target = torch.stack([target, target], 1)[:, 0]
    assert not strided_target.is_contiguous()
    total = teskd_loss(t, s_arg, strided_target, _strided(f_t), fs_arg, backend="torch", feat_weight=0.05,
                       label_smoothing=0.1)  # fmt: skip
    grad_out = torch.tensor(-1.3, dtype=torch.float64)
    total.backward(grad_out)
    want = reference64(teacher, students, target, (f_t, f_s), grad_out, feat_weight=0.05, label_smoothing=0.1)
    assert_close(total, want[0], torch.float64, "total", scale=10)
    assert_close(t.grad, want[2], torch.float64, "grad teacher")
    assert_close(s.grad, want[3], torch.float64, "grad students")
    assert_close(fs.grad, want[4], torch.float64, "grad student features")


def test_module_accepts_teskd_output_and_positional():
    teacher, students, target, feats = make_inputs(6, 12, 3, 8)
    crit = TESKDLoss(temperature=3.0, backend="torch")
    out = TESKDOutput(teacher, list(students.unbind(0)), feats[0], feats[1])
    a = crit(out, target)
    b = crit(teacher, students, target, *feats)
    c = teskd_loss(teacher, students, target, *feats, temperature=3.0, backend="reference")
    assert_close(a, c, torch.float32, "module")
    assert_close(b, c, torch.float32, "module positional")
    with pytest.raises(TypeError, match="unknown options.*temprature"):
        TESKDLoss(temprature=3.0)


@pytest.mark.gpu
def test_parts_are_detached_and_sum_to_total():
    for backend in ["reference", "torch"] + (["triton"] if TRITON_OK else []):
        device = TRITON_DEVICE if backend == "triton" else "cpu"
        teacher, students, target, feats = make_inputs(5, 10, 3, 8, device=device)
        teacher.requires_grad_()
        total, parts = teskd_loss(
            teacher, students, target, *feats, backend=backend, return_parts=True, feat_weight=0.01
        )
        assert set(parts) == {"ce", "kd", "feat"}
        assert all(not p.requires_grad for p in parts.values())
        recombined = 0.2 * parts["ce"] + 0.8 * parts["kd"] + 0.01 * parts["feat"]
        assert_close(total, recombined, torch.float32, f"{backend} parts")


@pytest.mark.gpu
def test_logits_are_never_overwritten(cpu_path):
    # cpu_path only concerns the torch backend: triton runs once.
    for backend in ["torch"] + (["triton"] if TRITON_OK and cpu_path == "fused" else []):
        device = TRITON_DEVICE if backend == "triton" else "cpu"
        teacher, students, target, feats = make_inputs(5, 10, 3, 8, device=device)
        copies = [t.clone() for t in (teacher, students, *feats)]
        t, s = teacher.clone().requires_grad_(), students.clone().requires_grad_()
        teskd_loss(t, s, target, *feats, backend=backend).backward()
        assert torch.equal(t.detach(), copies[0]) and torch.equal(s.detach(), copies[1])
        assert torch.equal(feats[0], copies[2]) and torch.equal(feats[1], copies[3])


def test_detach_teacher_only_removes_the_kd_gradient():
    teacher, students, target, _ = make_inputs(6, 10, 2)
    t1 = teacher.clone().requires_grad_()
    teskd_loss(t1, students, target, backend="torch", detach_teacher=True, kd_weight=0.8).backward()
    t2 = teacher.clone().requires_grad_()
    teskd_loss(t2, students, target, backend="torch", kd_weight=0.0).backward()
    assert_close(t1.grad, t2.grad, torch.float32, "teacher grad with detach_teacher")


def test_all_targets_ignored_gives_nan_like_pytorch(cpu_path):
    teacher, students, target, _ = make_inputs(4, 10, 2)
    target[:] = -100
    total, parts = teskd_loss(teacher, students, target, backend="torch", return_parts=True)
    ref, ref_parts = teskd_loss(teacher, students, target, backend="reference", return_parts=True)
    assert torch.isnan(parts["ce"]) and torch.isnan(ref_parts["ce"])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_compiles_without_graph_break(backend):
    teacher, students, target, feats = make_inputs(8, 10, 3, 16)

    def step(t, s, fs):
        return teskd_loss(t, s, target, feats[0], fs, backend=backend)

    inputs = [x.clone().requires_grad_() for x in (teacher, students, feats[1])]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    out.backward()
    ref_inputs = [x.clone().requires_grad_() for x in (teacher, students, feats[1])]
    ref = step(*ref_inputs)
    ref.backward()
    assert_close(out, ref, torch.float32, "compiled total")
    for a, b in zip(inputs, ref_inputs, strict=True):
        assert_close(a.grad, b.grad, torch.float32, "compiled grad")


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_custom_op_compiles_without_graph_break():
    teacher, students, target, feats = make_inputs(4, 10, 3, 16, device=TRITON_DEVICE)

    def step(t, s, fs):
        return teskd_loss(t, s, target, feats[0], fs, backend="triton")

    inputs = [x.clone().requires_grad_() for x in (teacher, students, feats[1])]
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs)
    out.backward()
    ref = run("reference", teacher, students, target, feats, torch.tensor(1.0, device=TRITON_DEVICE))
    assert_close(out, ref[0], torch.float32, "compiled triton total", scale=10)
    assert_close(inputs[0].grad, ref[2], torch.float32, "compiled triton teacher grad")
    assert_close(inputs[2].grad, ref[4], torch.float32, "compiled triton feature grad")


@pytest.mark.gpu
def test_triton_kernel_opcheck():
    """torch.library's own consistency checks of the custom ops (schema, fake tensors, autograd)."""
    if not TRITON_OK:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    import teskd_fast.kernels.teskd_loss  # noqa: F401  (registers the ops)

    teacher, students, target, feats = make_inputs(3, 10, 2, 8, device=TRITON_DEVICE)
    args = (
        teacher.requires_grad_(),
        students.requires_grad_(),
        target,
        feats[0],
        feats[1].requires_grad_(),
        [1.0, 1.0, 1.0],
        4.0,
        0.2,
        0.8,
        1e-7,
        1e-7,
        False,
        0.0,
        -100,
    )
    torch.library.opcheck(
        torch.ops.teskd_fast.teskd_loss_fwd,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


# Bad input: every error names the argument and what was wrong.
def _good():
    teacher, students, target, feats = make_inputs(4, 10, 3, 8)
    return dict(
        teacher_logits=teacher,
        student_logits=students,
        target=target,
        teacher_feature=feats[0],
        student_features=feats[1],
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(student_logits=a["student_logits"][:, :3]), ValueError, r"student_logits.*\[4, 10\]"),
        (lambda a: a.update(student_logits=a["student_logits"][..., :7]), ValueError, r"student_logits.*\[4, 7\]"),
        (
            lambda a: a.update(student_features=a["student_features"][:2]),
            ValueError,
            r"student_features: 2 students.*K = 3",
        ),
        (
            lambda a: a.update(teacher_logits=a["teacher_logits"][None]),
            ValueError,
            r"teacher_logits: expected \[B, C\]",
        ),
        (
            lambda a: a.update(student_logits=a["student_logits"][0]),
            ValueError,
            r"student_logits: expected a \[K, B, C\]",
        ),
        (lambda a: a.update(student_logits=[]), ValueError, r"K = 0"),
        (lambda a: a.update(student_logits=a["student_logits"][:0]), ValueError, r"student_logits: K = 0 students"),
        (lambda a: a.update(target=a["target"].float()), TypeError, r"target: expected integer.*float32"),
        (lambda a: a.update(target=a["target"][:3]), ValueError, r"target: expected shape \[B\] = \[4\], got \(3,\)"),
        (lambda a: a.update(target=a["target"].to("meta")), ValueError, r"target: on meta.*teacher_logits is on cpu"),
        (
            lambda a: a.update(teacher_logits=a["teacher_logits"].long()),
            TypeError,
            r"teacher_logits: dtype torch.int64",
        ),
        (lambda a: a.update(student_logits=a["student_logits"].int()), TypeError, r"student_logits: dtype.*int32"),
        (
            lambda a: a.update(student_features=list(a["student_features"].to(torch.uint8))),
            TypeError,
            r"student_features: dtype torch.uint8",
        ),
        (
            lambda a: a.update(teacher_logits=a["teacher_logits"][:, :1], student_logits=a["student_logits"][..., :1]),
            ValueError,
            r"at least 2 classes",
        ),
        (lambda a: a.update(teacher_feature=None), ValueError, r"give both or neither"),
        (
            lambda a: a.update(teacher_feature=a["teacher_feature"][:2]),
            ValueError,
            r"teacher_feature: expected \[B, D\]",
        ),
        (lambda a: a.update(student_features=a["student_features"][..., :5]), ValueError, r"student_features: each"),
        (lambda a: a["target"].__setitem__(2, 10), ValueError, r"target: class index 10 at position 2 is out of range"),
        (lambda a: a["target"].__setitem__(1, -3), ValueError, r"target: class index -3 at position 1"),
    ],
)
def test_bad_input_errors(change, error, match):
    args = _good()
    change(args)
    with pytest.raises(error, match=match):
        teskd_loss(**args, backend="torch")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"temperature": 0.0}, r"temperature: must be a finite number > 0"),
        ({"temperature": -1.0}, r"temperature"),
        ({"temperature": float("nan")}, r"temperature"),
        ({"head_weights": [1.0, 1.0]}, r"head_weights: expected K \+ 1 = 4"),
        ({"head_weights": torch.ones(2, 2)}, r"head_weights: expected K \+ 1 = 4 numbers .*shape \(2, 2\)"),
        ({"head_weights": ["a"] * 4}, r"head_weights: expected K \+ 1 = 4 numbers"),
        ({"label_smoothing": 1.5}, r"label_smoothing"),
        ({"kd_eps": -1.0}, r"kd_eps"),
        ({"backend": "cuda"}, r"backend: expected one of"),
    ],
)
def test_bad_option_errors(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        teskd_loss(**_good(), **options)


def test_every_option_takes_numbers_of_any_numeric_type_and_0d_tensors():
    """One rule for every option, temperature included (issue 34): Python numbers, numpy scalars, 0-d tensors."""
    from teskd_fast.loss.options import SPEC

    given = {"temperature": 2.5, "ce_weight": 0.5, "kd_weight": 1.5, "feat_weight": 0.25, "kd_eps": 2**-10,
             "detach_teacher": True, "label_smoothing": 0.125, "ignore_index": 3}  # fmt: skip
    assert set(given) == {option.name for option in SPEC}
    forms = {
        "python": lambda v: v,
        "numpy": lambda v: np.array(v)[()],
        "numpy 0-d array": np.array,
        "0-d tensor": torch.tensor,
        "int for an integral value": lambda v: int(v) if float(v).is_integer() and not isinstance(v, bool) else v,
    }
    want = teskd_loss(**_good(), **given)
    for form, make in forms.items():
        options = {name: make(value) for name, value in given.items()}
        assert LossOptions.checked(**options) == LossOptions(**given), form
        assert torch.equal(teskd_loss(**_good(), **options), want), form
    weights = [1.0, 0.5, 2.0, 1.0]
    for head_weights in (np.array(weights), torch.tensor(weights), [1, np.float32(0.5), 2, 1]):
        got = teskd_loss(**_good(), head_weights=head_weights)
        assert torch.equal(got, teskd_loss(**_good(), head_weights=weights))


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"temperature": "2"}, TypeError, r"^temperature: expected a number, got '2'$"),
        ({"temperature": torch.ones(2)}, TypeError, r"^temperature: expected a number or a 0-d tensor.*\(2,\)"),
        ({"ce_weight": True}, TypeError, r"^ce_weight: expected a number, got True$"),
        ({"kd_weight": -1.0}, ValueError, r"^kd_weight: must be >= 0"),  # the library's range is the command's
        ({"feat_weight": float("inf")}, ValueError, r"^feat_weight: must be >= 0 \(and finite\)"),
        ({"ignore_index": 2.5}, TypeError, r"^ignore_index: expected an integer, got 2.5$"),
        ({"detach_teacher": "no"}, TypeError, r"^detach_teacher: expected a boolean, got 'no'$"),
        ({"head_weights": np.ones((2, 2))}, ValueError, r"^head_weights: .*ndarray of shape \(2, 2\)"),
        ({"head_weights": ["1", "1", "1", "1"]}, TypeError, r"^head_weights: expected K \+ 1 = 4 numbers"),
    ],
)
def test_options_of_the_wrong_type_are_refused_by_name(options, error, match):
    with pytest.raises(error, match=match):
        teskd_loss(**_good(), **options)


def test_unknown_options_are_refused_by_name():
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['new_weight'\]"):
        LossOptions.checked(new_weight=0.5)
    with pytest.raises(TypeError, match=r"TESKDLoss: unknown options \['new_weight'\]"):
        TESKDLoss(new_weight=0.5)


def test_module_called_with_a_tensor_says_it_expected_a_teskd_output():
    args = _good()
    with pytest.raises(TypeError, match=r"^TESKDLoss: expected criterion\(output, target\) with output a TESKDOutput"):
        TESKDLoss()(args["teacher_logits"], args["target"])


@pytest.mark.parametrize("ignore_index", [2**64, 2**63, -(2**63) - 1])
def test_every_backend_refuses_an_ignore_index_past_int64(ignore_index, cpu_path):
    # The fused CPU kernel took 2**64 for 0 (ctypes truncates it), where the other paths raised their own errors.
    for backend in ["reference", "torch"] + (["triton"] if TRITON_OK else []):
        with pytest.raises(ValueError, match=rf"ignore_index: must fit in int64.*got {ignore_index}"):
            teskd_loss(**_good(), ignore_index=ignore_index, backend=backend)


def test_triton_backend_rejects_float64_and_cpu_without_interpreter(monkeypatch):
    args = _good()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
            teskd_loss(**args, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = {k: v.double() if v.is_floating_point() else v for k, v in args.items()}
    with pytest.raises(TypeError, match=r"float64 is not supported by backend='triton'"):
        teskd_loss(**args, backend="triton")


def test_top_level_api():
    assert {"teskd_loss", "TESKDLoss", "TESKDOutput"} <= set(teskd_fast.__all__)
    for name in teskd_fast.__all__:
        assert not name.startswith("_teskd") and "Function" not in name


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_masks_out_of_range_targets_like_ignore_index(poisoned):
    """Unchecked out-of-range targets (the CUDA default) never index memory: they count like ignore_index."""
    from teskd_fast.kernels.teskd_loss import teskd_fwd

    device = "cuda" if HAS_CUDA else "cpu"
    teacher, students, target, feats = make_inputs(6, 10, 2, 8, device=device)
    bad = target.clone()
    bad[1], bad[4] = 10 + 5, -7
    total, parts, grad, grad_feat = teskd_fwd(teacher, students, bad, *feats, (1.0,) * 3, LossOptions())
    masked = target.clone()
    masked[1], masked[4] = -100, -100
    want = run("reference", teacher.double(), students.double(), masked, tuple(f.double() for f in feats),
               torch.tensor(1.0, dtype=torch.float64, device=device))  # fmt: skip
    assert_close(total, want[0], torch.float32, "total", scale=10)
    assert_close(grad[0], want[2], torch.float32, "teacher grad")
    assert_close(grad[1:], want[3], torch.float32, "student grads")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
def test_triton_loss_is_cuda_graph_capturable():
    teacher, students, target, feats = make_inputs(64, 1000, 3, 512, dtype=torch.bfloat16, device="cuda")
    t = teacher.clone().requires_grad_()
    s = students.clone().requires_grad_()

    def step():
        t.grad, s.grad = None, None
        loss = teskd_loss(t, s, target, *feats, backend="triton")
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    graph.replay()
    torch.cuda.synchronize()
    want = run("reference", teacher.double(), students.double(), target, tuple(f.double() for f in feats),
               torch.tensor(1.0, dtype=torch.float64, device="cuda"))  # fmt: skip
    assert_close(loss, want[0], torch.float32, "graph total", scale=10)
    assert_rms_close(t.grad, want[2], torch.bfloat16, "graph teacher grad", scale=2)


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_evaluation_call_stores_no_gradients():
    """A call that needs no gradient (no input requires one, or under no_grad) computes the loss alone."""
    from teskd_fast.kernels.teskd_loss import teskd_fwd

    device = "cuda" if HAS_CUDA else "cpu"
    teacher, students, target, feats = make_inputs(6, 10, 3, 8, device=device)
    options = LossOptions(label_smoothing=0.1, feat_weight=0.01)
    full = teskd_fwd(teacher, students, target, *feats, (1.0,) * 4, options)
    bare = teskd_fwd(teacher, students, target, *feats, (1.0,) * 4, options, need_grad=False)
    assert bare[2].numel() == 0 and bare[3].numel() == 0, "gradient buffers were allocated"
    torch.testing.assert_close(bare[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(bare[1], full[1], rtol=0, atol=0)
    with torch.no_grad():
        got = teskd_loss(teacher.requires_grad_(), students, target, *feats, backend="triton", feat_weight=0.01,
                         label_smoothing=0.1)  # fmt: skip
    want = teskd_loss(teacher.double(), students.double(), target, *(f.double() for f in feats), backend="reference",
                      feat_weight=0.01, label_smoothing=0.1)  # fmt: skip
    assert_close(got, want, torch.float32, "no_grad total")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
def test_triton_loss_graphs_replayed_concurrently_each_reduce_their_own_rows():
    # Two captured losses of different batches, replayed at once on two streams, many times: a reduction counter
    # shared between calls would let one launch's last program see the other's ticket and sum the wrong rows.
    inputs = [make_inputs(B, 1000, 3, 512, device="cuda", seed=B) for B in (96, 160)]
    wants = [run("reference", t.double(), s.double(), y, tuple(f.double() for f in fs),
                 torch.tensor(1.0, dtype=torch.float64, device="cuda"))[0] for t, s, y, fs in inputs]  # fmt: skip
    graphs, losses, streams = [], [], [torch.cuda.Stream(), torch.cuda.Stream()]
    for (t, s, y, fs), stream in zip(inputs, streams, strict=True):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            teskd_loss(t, s, y, *fs, backend="triton")  # warm-up (compiles the kernels) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            losses.append(teskd_loss(t, s, y, *fs, backend="triton"))
        graphs.append(graph)
    for _ in range(50):
        for graph, stream in zip(graphs, streams, strict=True):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                graph.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        for loss, want in zip(losses, wants, strict=True):
            assert_close(loss, want, torch.float32, "concurrently replayed total", scale=10)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_loss_launches_on_the_tensors_device():
    teacher, students, target, feats = make_inputs(32, 100, 3, 64, device="cuda:1")
    t = teacher.clone().requires_grad_()
    with torch.cuda.device(0):
        loss = teskd_loss(t, students, target, *feats, backend="triton")
        loss.backward()
    want = run("reference", teacher.double(), students.double(), target, tuple(f.double() for f in feats),
               torch.tensor(1.0, dtype=torch.float64, device="cuda:1"))  # fmt: skip
    assert_close(loss, want[0], torch.float32, "total on cuda:1", scale=10)
    assert_close(t.grad, want[2], torch.float32, "teacher grad on cuda:1", scale=10)


# timm backbones under autocast (issue 27): ConvNeXt's (and EdgeNeXt's) head keeps its feature in float32 while the
# students' are bfloat16 / float16. One small model per family that docs/backbones.md names (the slow tier), and
# timm's tiny test ConvNeXt (the fast one).
_SWIN = dict(img_size=64, window_size=2, drop_path_rate=0.0, embed_dim=16, depths=(1,) * 4, num_heads=(1,) * 4)
AUTOCAST_FAMILIES = {
    "convnext-test": ("test_convnext", {}, 32),
    "convnext": ("convnext_atto", {}, 32),
    "efficientnet": ("test_efficientnet", {}, 32),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 32),
    "regnet": ("regnetx_002", {}, 32),
    "resnet-d": ("resnet10t", {}, 32),
    "swin": ("swin_tiny_patch4_window7_224", _SWIN, 64),
    "edgenext": ("edgenext_xx_small", {}, 32),
}
AUTOCAST_CASES = [
    pytest.param(family, dtype, marks=() if family == "convnext-test" else pytest.mark.slow,
                 id=f"{family}-{str(dtype).removeprefix('torch.')}")
    for family in AUTOCAST_FAMILIES
    for dtype in (torch.bfloat16, torch.float16)
]  # fmt: skip


@pytest.mark.parametrize("family, dtype", AUTOCAST_CASES)
def test_timm_backbones_train_under_cpu_autocast(family, dtype):
    timm = pytest.importorskip("timm", reason="timm is optional: pip install timm")
    name, kwargs, size = AUTOCAST_FAMILIES[family]
    torch.manual_seed(0)
    model = teskd_fast.wrap(timm.create_model(name, num_classes=10, pretrained=False, **kwargs), num_classes=10)
    images, target = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    with torch.autocast("cpu", dtype=dtype):
        out = model(images)
        loss = teskd_loss(out.logits, out.student_logits, target, out.feature, out.student_features)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # The same (rounded) outputs through the reference: the torch backend computed them in float32 too.
    detached = [x.detach() if isinstance(x, torch.Tensor) else [t.detach() for t in x] for x in out]
    want = teskd_loss(detached[0], detached[1], target, detached[2], detached[3], backend="reference")
    assert_close(loss, want, torch.float32, f"{name} loss under {dtype} autocast", scale=10)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), name


# One specification of the options (kernels/options.py): every boundary declares what it says, and a new option is
# carried or refused by name at each.
def _docs_option_mismatches(spec):
    """The options whose row in docs/loss.md's table differs from ``spec`` (type, default, meaning), or is missing,
    and the rows no option of ``spec`` declares."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "loss.md").read_text()
    rows = {name: (kind, default.strip(), meaning.strip())
            for name, kind, default, meaning in re.findall(r"^\| `(\w+)` \| (\w+) \| ([^|]+) \| [^|]* \| ([^|]+) \|$",
                                                           text, re.M)}  # fmt: skip
    names = [option.name for option in spec]
    return [o.name for o in spec if rows.get(o.name) != (o.type.__name__, str(o.default), o.help)] + [
        name for name in rows if name not in names
    ]


def _flag_mismatches(spec):
    """The options that are teskd-train flags (a TrainConfig field of their name) with another default or help."""
    import dataclasses

    from teskd_fast.train.config import TrainConfig

    flags = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return [o.name for o in spec if o.name in flags
            and (flags[o.name].default != o.default or flags[o.name].metadata["help"] != o.help)]  # fmt: skip


def _checked_call_mismatches(spec):
    """The options of ``spec`` that ``teskd_loss`` does not pass on to ``LossOptions.checked`` as ``name=name`` (its
    parameter of that name), and the keywords it passes that are no option: its call lists them by hand."""
    import ast
    import inspect
    import textwrap

    from teskd_fast.loss import api

    tree = ast.parse(textwrap.dedent(inspect.getsource(api.teskd_loss)))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "checked" and getattr(n.func.value, "id", None) == "LossOptions"]
    assert len(calls) == 1, "teskd_loss checks its options in one LossOptions.checked call"
    passed = {k.arg for k in calls[0].keywords if isinstance(k.value, ast.Name) and k.value.id == k.arg}
    names = {o.name for o in spec}
    return sorted(names - passed) + sorted({k.arg for k in calls[0].keywords} - names)


def test_every_boundary_declares_the_specifications_options():
    from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel
    from teskd_fast.loss import api
    from teskd_fast.loss.options import SPEC
    from teskd_fast.train.config import loss_fields

    assert LossOptions._fields == tuple(o.name for o in SPEC)
    assert LossOptions() == LossOptions(**{o.name: o.default for o in SPEC})
    assert _docs_option_mismatches(SPEC) == []
    assert _flag_mismatches(SPEC) == [] and set(loss_fields()) >= {"temperature", "ce_weight", "kd_weight"}
    # The ctypes struct is the C declaration's, field by field; the options among its fields are SPEC's.
    assert cpu_kernel._Options._fields_ == cpu_kernel.struct_fields(SPEC)
    assert {name for name, _ in cpu_kernel._Options._fields_[6:]} == set(LossOptions._fields)
    api.check_signature(SPEC)
    assert _checked_call_mismatches(SPEC) == []
    if TRITON_OK or importlib.util.find_spec("triton") is not None:
        from teskd_fast.kernels import teskd_loss as triton_host

        triton_host.check_op_options(SPEC)


def test_a_new_option_is_carried_or_refused_by_name_at_every_boundary():
    """A throwaway option added to the specification: the record and its check carry it; every boundary that has
    not been taught it (the C struct, the custom op's schema, teskd_loss's keywords, the docs' table) refuses it
    by name, at import or here, never silently."""
    import ctypes

    from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel
    from teskd_fast.kernels.options import options_record
    from teskd_fast.loss import api
    from teskd_fast.loss.options import SPEC, Option, Range

    spec = (*SPEC, Option("new_weight", float, 0.0, Range(0.0, text="must be >= 0 (and finite)"), "a new term"))
    record = options_record(spec)
    assert record.checked(new_weight=np.float32(0.5)).new_weight == 0.5
    assert record.checked().new_weight == 0.0 and record.checked(kd_weight=0.5).kd_weight == 0.5
    with pytest.raises(ValueError, match=r"^new_weight: must be >= 0"):
        record.checked(new_weight=-1.0)
    with pytest.raises(TypeError, match=r"^new_weight: expected a number"):
        record.checked(new_weight="0.5")

    with pytest.raises(RuntimeError, match=r"options missing from the struct \['new_weight'\]"):
        cpu_kernel.struct_fields(spec)
    source = (cpu_kernel._CSRC / "teskd_loss_cpu.c").read_text()
    taught = source.replace("} teskd_options;", "    double new_weight;\n} teskd_options;")
    assert cpu_kernel.struct_fields(spec, taught)[-1] == ("new_weight", ctypes.c_double)
    wrong_type = source.replace("} teskd_options;", "    int64_t new_weight;\n} teskd_options;")
    with pytest.raises(RuntimeError, match=r"teskd_options.new_weight is int64_t .* expected double"):
        cpu_kernel.struct_fields(spec, wrong_type)
    with pytest.raises(TypeError, match=r"teskd_options has no field\(s\) \['new_weight'\]"):
        cpu_kernel._Options(K=1, new_weight=3.0)

    with pytest.raises(RuntimeError, match=r"the option new_weight .* is not a keyword"):
        api.check_signature(spec)
    assert _checked_call_mismatches(spec) == ["new_weight"]
    assert _docs_option_mismatches(spec) == ["new_weight"]
    if TRITON_OK or importlib.util.find_spec("triton") is not None:
        from teskd_fast.kernels import teskd_loss as triton_host

        with pytest.raises(RuntimeError, match=r"teskd_loss_fwd's schema .* missing \['new_weight'\]"):
            triton_host.check_op_options(spec)
