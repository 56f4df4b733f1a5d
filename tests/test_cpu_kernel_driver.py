"""The fused CPU kernel on instruction sets this machine may not run: aarch64 (NEON) under qemu-user.

tests/teskd_kernel_driver.c includes the kernel's source and checks its outputs (loss, parts, every logit
gradient, the feature gradient, the exp/log polynomials) against values the float64 reference computed here on
the same float32 inputs, written to a binary file. It is cross-compiled with ``aarch64-linux-gnu-gcc`` and run
with ``qemu-aarch64 -L /usr/aarch64-linux-gnu`` (Debian: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross,
qemu-user; .ci/run installs them); without them the aarch64 case skips, saying so. The same driver is also built
for this machine, where it must agree with the Python-side tests, and must fail on wrong expectations.
"""

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from test_loss import make_inputs, reference64

from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel
from teskd_fast.loss import LossOptions

INF = float("inf")
DRIVER = Path(__file__).with_name("teskd_kernel_driver.c")
FLAGS = ["-O3", "-std=c11", "-ffp-contract=fast", "-fno-math-errno"]
CROSS_CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"

# (B, C, K, D, options): a full vector body with tails, shorter than one vector, many classes, no features.
CASES = [
    (
        33,
        100,
        3,
        70,
        dict(
            temperature=4.0,
            label_smoothing=0.1,
            ignore_index=-100,
            feat_weight=0.05,
            head_weights=[1.0, 1.25, 1.5, 1.75],
        ),
    ),  # fmt: skip
    (7, 37, 2, 13, dict(temperature=2.5, detach_teacher=True, kd_eps=1e-4, feat_weight=0.01)),
    (5, 5, 3, 0, dict(temperature=1.0, ce_weight=0.7, kd_weight=1.3)),
    (4, 1000, 1, 512, dict(temperature=3.0, feat_weight=1e-3)),
]


def _f32(t):
    return t.detach().to(torch.float32).contiguous().numpy().tobytes()


def _f64(t):
    return t.detach().to(torch.float64).contiguous().numpy().tobytes()


def _case(B, C, K, D, options, seed):
    """The driver's record of one case: shapes, options, inputs, and the reference's outputs (grad_output 1)."""
    teacher, students, target, feats = make_inputs(B, C, K, D or None, seed=seed)
    if options.get("label_smoothing"):  # ignored rows too
        target[1::4] = options.get("ignore_index", LossOptions().ignore_index)
    total, parts, g_teacher, g_students, g_feats = reference64(teacher, students, target, feats, torch.tensor(1.0),
                                                               **options)  # fmt: skip
    o = LossOptions(**{name: value for name, value in options.items() if name != "head_weights"})
    head_weights = torch.tensor(options.get("head_weights", [1.0] * (K + 1)), dtype=torch.float64)
    f_t, f_s = feats if D else (torch.zeros(0), torch.zeros(0))
    # The struct as the library packs it (every option of the specification, by name), then the driver's own.
    packed = bytes(cpu_kernel._Options(K=K, B=B, C=C, D=D, row_begin=0, row_end=B, **o._asdict()))
    out = struct.pack("<q", len(packed)) + packed + struct.pack("<3d", 2.0 * o.feat_weight, 1e-5, 1e-4)
    out += _f64(head_weights) + _f32(teacher) + _f32(students) + _f32(f_t) + _f32(f_s)
    out += target.to(torch.int64).numpy().tobytes()
    want = [total.reshape(1), torch.stack([parts["ce"], parts["kd"], parts["feat"]]), g_teacher, g_students]
    want.append(g_feats if D else torch.zeros(0))
    return out + b"".join(_f64(w.reshape(-1)) for w in want)


def _polynomial_inputs():
    exp_x = torch.cat([torch.linspace(-87.0, 0.0, 20_001), torch.tensor([-INF, -1000.0, -0.0, 0.0, 1e-7])])
    log_x = torch.cat([
        torch.logspace(-45, 1, 20_001, dtype=torch.float64).float(),  # subnormals up to 10
        torch.linspace(1 - 2**-7, 1 + 2**-7, 2_001),
        torch.tensor([0.0, -1.0, INF, 0.70710677, 0.70710683]),
    ])  # fmt: skip
    out = b""
    for x, fn in ((exp_x, torch.exp), (log_x, torch.log)):
        out += struct.pack("<q", x.numel()) + _f32(x) + _f64(fn(x.double()))
    return out


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
    records = [_case(*case, seed=i) for i, case in enumerate(CASES)]
    path = tmp_path_factory.mktemp("driver") / "cases.bin"
    path.write_bytes(struct.pack("<q", len(records)) + b"".join(records) + _polynomial_inputs())
    return path


def _compile(cc, out, extra=()):
    cmd = [cc, *FLAGS, *extra, f"-I{cpu_kernel._CSRC}", str(DRIVER), "-o", str(out), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stderr}"
    return out


def _run(cmd, expect_ok=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0 and "all passed" in report, f"$ {' '.join(map(str, cmd))}\n{report}"
    return proc.returncode, report


def _checked_lines(report):
    """Every case reports its 5 quantities (the feature gradient from the forward and from the backward's
    function), and both polynomials are checked."""
    lines = report.splitlines()
    assert sum(line.startswith("case ") for line in lines) == 5 * len(CASES), report
    assert sum(line.startswith(("exp ", "log ")) for line in lines) == 2, report


def test_aarch64_build_under_qemu_matches_the_reference(cases_file, tmp_path):
    missing = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: install gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user "
            "(Debian/Ubuntu) to check the aarch64 build; .ci/run does"
        )
    driver = _compile(CROSS_CC, tmp_path / "driver-aarch64", ["-march=armv8-a"])
    _, report = _run([QEMU, "-L", SYSROOT, str(driver), str(cases_file)])
    assert "kernel built for neon" in report, report
    _checked_lines(report)


def test_driver_on_this_machine_and_its_failure_path(cases_file, tmp_path):
    """The driver compiled for this machine (its default instruction set) passes, and reports a failure when
    one expected value is wrong: the aarch64 check above cannot pass vacuously."""
    cc = cpu_kernel._compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    driver = _compile(cc, tmp_path / "driver")
    _, report = _run([str(driver), str(cases_file)])
    _checked_lines(report)

    data = bytearray(cases_file.read_bytes())
    wrong = tmp_path / "wrong.bin"
    # The last float64 of the first case's logit gradients (just before its feature gradient) made wrong.
    B, C, K, D, _ = CASES[0]
    end = len(_case(*CASES[0], seed=0)) + 8
    at = end - 8 * K * B * D - 8
    value = struct.unpack_from("<d", data, at)[0]
    struct.pack_into("<d", data, at, value + 1e-2)
    wrong.write_bytes(bytes(data))
    code, report = _run([str(driver), str(wrong)], expect_ok=False)
    assert code == 1 and "case 0 grad logits" in report and "FAIL" in report and "FAILED" in report, report
