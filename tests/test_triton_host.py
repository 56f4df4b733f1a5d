"""The Triton backend's host side: what reaches the kernels (scalar head weights, sizes past 2^31 split on the
host, sizes it refuses), the named gradient plumbing, and a CUDA graph captured on the loss's first call.

On the CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import os

import pytest
import torch
from test_loss import make_inputs, run
from tolerances import assert_close, assert_rms_close

from teskd_fast import teskd_loss
from teskd_fast.loss import LossOptions

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")


class _Launches:
    """Stands in for a ``@triton.jit`` kernel in the launcher's module: records each launch's arguments by name and
    runs the real kernel, over the grid given or, with ``programs``, over the first ``programs`` programs only."""

    def __init__(self, kernel, programs=None):
        self.kernel, self.programs, self.calls = kernel, programs, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append({**dict(zip(self.kernel.arg_names, args, strict=False)), **kwargs})
            return self.kernel[grid if self.programs is None else (self.programs,)](*args, **kwargs)

        return launch


def test_head_weights_reach_the_kernel_as_scalars(monkeypatch):
    """No device buffer is made from the weights (a host-to-device copy would raise inside a CUDA graph capture on
    a tuple's first call): the kernel takes them as K + 1 float arguments, and the loss uses them."""
    from teskd_fast.kernels import teskd_loss as mod

    launches = _Launches(mod._teskd_fwd_kernel)
    monkeypatch.setattr(mod, "_teskd_fwd_kernel", launches)
    teacher, students, target, feats = make_inputs(5, 12, 3, 8, device=DEVICE)
    weights = (0.25, 1.5, 0.75, 2.0)
    grad_out = torch.tensor(1.0, device=DEVICE)
    got = run("triton", teacher, students, target, feats, grad_out, head_weights=weights, label_smoothing=0.1)
    (call,) = launches.calls
    assert "w" in call and not any(name.startswith("w_") for name in call), sorted(call)
    # Padded to BLOCK_K + 1 = 5 with zero weights for the padded student.
    assert call["w"] == (*weights, 0.0) and all(type(w) is float for w in call["w"]), call["w"]
    want = run("reference", teacher.double(), students.double(), target, tuple(f.double() for f in feats),
               grad_out.double(), head_weights=weights, label_smoothing=0.1)  # fmt: skip
    assert_close(got[0], want[0], torch.float32, "total", scale=10)
    assert_close(got[2], want[2], torch.float32, "teacher grad")
    assert_close(got[3], want[3], torch.float32, "student grads")


def test_backward_splits_its_two_buffers_in_64_bits(monkeypatch):
    """With 2^31 - 1 logit gradients, the first program scales the logit buffer: a 32-bit cdiv(N1, BLOCK) wraps to
    a negative program count there and sends every program to the feature buffer. Program 0 alone runs, on a
    stride-0 view (2^31 - 1 elements over BWD_BLOCK floats: it reads only those)."""
    from teskd_fast.kernels import teskd_loss as mod

    block = mod.BWD_BLOCK
    monkeypatch.setattr(mod, "_teskd_bwd_kernel", _Launches(mod._teskd_bwd_kernel, programs=1))
    monkeypatch.setattr(mod, "_empty_like", lambda t, dtype=None: torch.full((min(t.numel(), block),), float("nan")))
    values = torch.randn(block)
    grad = values.as_strided((2**31 - 1,), (0,))
    grad_feat = torch.randn(64)
    scaled, scaled_feat = mod.teskd_bwd(torch.tensor(-0.5), grad, grad_feat, torch.float32, torch.float32)
    torch.testing.assert_close(scaled, values * -0.5, rtol=0, atol=0)
    assert scaled_feat.isnan().all(), "program 0 wrote the feature gradients"


def test_refuses_sizes_its_kernels_cannot_index():
    """A row of 2^31 classes is refused before any copy (stride-0 views: nothing that size is allocated)."""
    from teskd_fast.kernels.teskd_loss import teskd_fwd
    from teskd_fast.kernels.teskd_loss_jit import MAX_DIM

    C = MAX_DIM + 1
    teacher = torch.zeros(1).as_strided((2, C), (0, 0))
    students = torch.zeros(1).as_strided((1, 2, C), (0, 0, 0))
    with pytest.raises(ValueError, match=rf"backend='triton': C = {C} is larger than {MAX_DIM}"):
        teskd_fwd(teacher, students, torch.zeros(2, dtype=torch.long), None, None, (1.0, 1.0), LossOptions())


def test_gradients_are_placed_by_input_name():
    """The Function and the custom op declare their inputs once (their signatures); every gradient tuple follows
    from the names, and the op's schema takes the options' fields by name."""
    from teskd_fast.kernels import teskd_loss as mod

    inputs = ("teacher", "students", "target", "teacher_feature", "student_features", "head_weights")
    assert mod._FUNCTION_INPUTS == (*inputs, "options")
    assert mod._OP_INPUTS == (*inputs, *LossOptions._fields)
    schema = torch.ops.teskd_fast.teskd_loss_fwd.default._schema
    assert tuple(a.name for a in schema.arguments) == mod._OP_INPUTS
    grads = mod._gradients(mod._OP_INPUTS, teacher="t", student_features="f")
    assert len(grads) == len(mod._OP_INPUTS)
    placed = {name: g for name, g in zip(mod._OP_INPUTS, grads, strict=True) if g is not None}
    assert placed == {"teacher": "t", "student_features": "f"}
    with pytest.raises(KeyError, match="target"):
        mod._gradients(mod._OP_INPUTS, target="y")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a CUDA device")
def test_triton_loss_is_capturable_on_its_first_call():
    """A weights tuple seen for the first time inside a capture. The kernels are compiled beforehand, with other
    weights of the same length (compiling is not what this tests)."""
    teacher, students, target, feats = make_inputs(64, 1000, 3, 512, dtype=torch.bfloat16, device="cuda")
    t = teacher.clone().requires_grad_()
    s = students.clone().requires_grad_()
    weights = (0.3, 1.7, 0.9, 1.1)

    def step(head_weights):
        t.grad, s.grad = None, None
        loss = teskd_loss(t, s, target, *feats, backend="triton", head_weights=head_weights)
        loss.backward()
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step((1.0,) * 4)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step(weights)
    graph.replay()
    torch.cuda.synchronize()
    want = run("reference", teacher.double(), students.double(), target, tuple(f.double() for f in feats),
               torch.tensor(1.0, dtype=torch.float64, device="cuda"), head_weights=weights)  # fmt: skip
    assert_close(loss, want[0], torch.float32, "graph total", scale=10)
    assert_rms_close(t.grad, want[2], torch.bfloat16, "graph teacher grad", scale=2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_backward_scales_2_31_logit_gradients_on_cuda():
    """The whole launch at the size where a 32-bit cdiv(N1, BLOCK) wraps: 8 GiB of bfloat16 (skipped if it does not
    fit)."""
    from teskd_fast.kernels.teskd_loss import teskd_bwd

    if torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs 12 GiB of free device memory")
    grad = torch.ones(2**31 - 1, dtype=torch.bfloat16, device="cuda")
    grad_feat = torch.full((1000,), 2.0, device="cuda")
    scaled, scaled_feat = teskd_bwd(torch.tensor(-0.5, device="cuda"), grad, grad_feat, torch.bfloat16, torch.float32)
    del grad
    assert bool((scaled == -0.5).all()), "a logit gradient was not scaled"
    assert bool((scaled_feat == -1.0).all()), "a feature gradient was not scaled"
