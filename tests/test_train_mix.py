"""CutMix: the mixed-target TESKD loss against a plain composition (float64, values and every gradient), the
batch mixing as a pure function of (seed, epoch, rank, batch), and exact resume with CutMix on."""

import signal

import pytest
import torch
from test_loss import HAS_CUDA, TRITON_DEVICE, TRITON_OK, make_inputs
from test_train_run import FAST, _same_rows, _same_state, _sigterm_at
from tolerances import assert_close

from teskd_fast import TESKDLoss, TESKDOutput, teskd_loss
from teskd_fast.loss.mixed import mixed_ce_correction, teskd_loss_mixed
from teskd_fast.train.build import build_criterion
from teskd_fast.train.checkpoint import load_checkpoint
from teskd_fast.train.cli import main
from teskd_fast.train.config import resolve
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.mix import CutMix, MixedTarget


def _leaves(teacher, students, feats):
    leaves = [teacher.detach().clone().requires_grad_(), students.detach().clone().requires_grad_()]
    if feats is not None:
        leaves += [feats[0].detach().clone(), feats[1].detach().clone().requires_grad_()]
    return leaves


def _grads(total, leaves, grad_out):
    grads = torch.autograd.grad(total, [t for t in leaves if t.requires_grad], grad_out.to(total))
    return [total, *grads]


OPTIONS = [{}, {"label_smoothing": 0.1, "head_weights": [1.0, 0.5, 1.5, 2.0], "ce_weight": 0.7},
           {"label_smoothing": 1.0, "temperature": 2.0, "detach_teacher": True}]


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("B, C, lam", [(1, 2, 0.3), (41, 13, 0.71), (8, 100, 0.0), (5, 7, 1.0)])
@pytest.mark.parametrize("opt", range(len(OPTIONS)))
def test_mixed_target_loss_float64_against_the_plain_composition(backend, B, C, lam, opt):
    # The plain composition: the whole reference loss once per target, weighted (its KD and feature terms are the
    # same in both, so lam * L(a) + (1 - lam) * L(b) is exactly the mixed CE plus them).
    options = OPTIONS[opt]
    teacher, students, a, feats = make_inputs(B, C, 3, 6, dtype=torch.float64, seed=B + opt)
    b = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(7))
    grad_out = torch.tensor(-1.3, dtype=torch.float64)
    leaves = _leaves(teacher, students, feats)
    got, parts = teskd_loss_mixed(*leaves[:2], a, b, lam, *leaves[2:], backend=backend, return_parts=True, **options)
    got = _grads(got, leaves, grad_out)
    ref = _leaves(teacher, students, feats)
    la, pa = teskd_loss(*ref[:2], a, *ref[2:], backend="reference", return_parts=True, **options)
    lb, pb = teskd_loss(*ref[:2], b, *ref[2:], backend="reference", return_parts=True, **options)
    want = _grads(lam * la + (1 - lam) * lb, ref, grad_out)
    for name, g, w in zip(["total", "grad teacher", "grad students", "grad student features"], got, want, strict=True):
        assert_close(g, w, torch.float64, f"{backend} {name}", scale=10)
    assert_close(parts["ce"], lam * pa["ce"] + (1 - lam) * pb["ce"], torch.float64, "ce part", scale=10)
    for part in ("kd", "feat"):
        assert_close(parts[part], pa[part], torch.float64, part)


@pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.gpu
def test_mixed_target_loss_triton_against_float64():
    if not HAS_CUDA:
        pytest.skip("the float32 triton check runs on a GPU")
    teacher, students, a, feats = make_inputs(64, 100, 3, 32, dtype=torch.float32, device=TRITON_DEVICE)
    b = a.roll(1)
    got = teskd_loss_mixed(teacher, students, a, b, 0.4, *feats, backend="triton", label_smoothing=0.1)
    f64 = [t.double() for t in (teacher, students, *feats)]
    want = teskd_loss_mixed(f64[0], f64[1], a, b, 0.4, *f64[2:], backend="reference", label_smoothing=0.1)
    assert_close(got, want, torch.float32, "triton total", scale=10)


def test_mixed_targets_are_checked():
    teacher, students, a, _ = make_inputs(4, 5, 2)
    with pytest.raises(ValueError, match="lam: the weight of target_a"):
        mixed_ce_correction([teacher, *students], a, a, 1.5)
    with pytest.raises(ValueError, match=r"target_b: class indices must lie in \[0, 5\)"):
        mixed_ce_correction([teacher, *students], a, torch.tensor([0, 1, -100, 2]), 0.5)
    with pytest.raises(ValueError, match="target_b: expected \\[B\\] = \\[4\\]"):
        mixed_ce_correction([teacher, *students], a, a[:3], 0.5)


def test_the_trainer_criteria_on_a_mixed_batch():
    teacher, students, a, (f_t, f_s) = make_inputs(6, 10, 3, 8, dtype=torch.float64)
    b, lam = a.flip(0), 0.35
    out = TESKDOutput(teacher, students, f_t, f_s)
    cfg = resolve({"cutmix_alpha": 1.0, "label_smoothing": 0.1})
    loss, parts = build_criterion(cfg, 1)(out, MixedTarget(a, b, lam))
    plain = TESKDLoss(label_smoothing=0.1, backend="reference")
    assert_close(loss, lam * plain(out, a) + (1 - lam) * plain(out, b), torch.float64, "teskd", scale=10)
    cfg = resolve({"cutmix_alpha": 1.0, "label_smoothing": 0.1, "method": "baseline"})
    loss, parts = build_criterion(cfg, 1)(teacher, MixedTarget(a, b, lam))
    ce = torch.nn.functional.cross_entropy
    want = lam * ce(teacher, a, label_smoothing=0.1) + (1 - lam) * ce(teacher, b, label_smoothing=0.1)
    # The baseline's CE runs in float32 (as without CutMix).
    assert_close(loss, want, torch.float32, "baseline")
    # An unmixed batch of a CutMix run: the plain loss.
    assert_close(build_criterion(cfg, 1)(teacher, a)[0], ce(teacher, a, label_smoothing=0.1), torch.float32, "plain")


def test_cutmix_pastes_one_box_of_the_permuted_batch_and_is_a_pure_function_of_its_keys():
    images = torch.randn(16, 3, 12, 10)
    target = torch.arange(16)
    mix = CutMix(1.0, 1.0, seed=5, rank=1)
    mixed, t = mix(images, target, epoch=2, batch=3)
    perm, (y0, y1, x0, x1), lam = mix.box(2, 3, 16, 12, 10)
    assert isinstance(t, MixedTarget) and torch.equal(t.a, target) and torch.equal(t.b, perm)
    assert lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 120) and t.lam == lam
    inside = torch.zeros(12, 10, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert inside.any() and torch.equal(mixed[:, :, inside], images[perm][:, :, inside])
    assert torch.equal(mixed[:, :, ~inside], images[:, :, ~inside])
    # The same keys, the same mix (a fresh object, another order of calls); another batch or rank, another.
    again = CutMix(1.0, 1.0, seed=5, rank=1)
    again(images, target, 0, 0)
    assert torch.equal(again(images, target, 2, 3)[0], mixed)
    assert not torch.equal(CutMix(1.0, 1.0, seed=5, rank=0)(images, target, 2, 3)[0], mixed)
    assert not torch.equal(mix(images, target, 2, 4)[0], mixed)
    # The probability: about half of the batches mixed at 0.5, none at 0.
    half = CutMix(1.0, 0.5, seed=5)
    share = sum(half.box(0, i, 16, 12, 10) is not None for i in range(400)) / 400
    assert 0.4 < share < 0.6
    assert all(CutMix(1.0, 0.0, seed=5).box(0, i, 16, 12, 10) is None for i in range(50))


def test_cutmix_flags_are_checked(capsys):
    for argv, words in ((["--cutmix-alpha", "-1"], "--cutmix-alpha: must be >= 0"),
                        (["--cutmix-prob", "1.5"], "--cutmix-prob: must be in [0, 1]")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("method", ["teskd", "baseline"])
def test_exact_resume_after_sigterm_mid_epoch_with_cutmix(method, tmp_path, monkeypatch, capsys):
    argv = ["--epochs", "2", "--cutmix-alpha", "1.0", "--cutmix-prob", "0.7", "--method", method, "--width",
            "0.125"] + FAST
    ref = tmp_path / "ref"
    assert main(argv + ["--out", str(ref)]) == 0
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _sigterm_at(m, 4)
        assert main(argv + ["--out", str(run)]) == 128 + signal.SIGTERM
    assert "SIGTERM" in capsys.readouterr().err
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt["epoch"], ckpt["position"]) == (1, 1)
    assert main(["--resume", str(run), "--no-progress"]) == 0
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    _same_state(a["model"], b["model"])
    _same_rows(read_metrics(ref), read_metrics(run))
    # CutMix changed what was trained: the same run without it ends elsewhere.
    plain = tmp_path / "plain"
    assert main([x for x in argv if x not in ("--cutmix-alpha", "1.0", "--cutmix-prob", "0.7")]
                + ["--out", str(plain)]) == 0
    assert not torch.equal(load_checkpoint(plain / "last.pt")["model"]["fc.weight"], a["model"]["fc.weight"])
