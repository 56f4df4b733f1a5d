"""teskd-train's optimisers and optimiser step: AdamW against its formula, timm's no-decay rule, gradient accumulation
against the large batch, gradient clipping with and without loss scaling, the teacher's EMA against timm's
ModelEmaV3, and the timm family recipes. All arithmetic in float64."""

import math

import pytest
import torch
from tolerances import assert_close
from torch import nn

import teskd_fast
from teskd_fast.train import distributed as D
from teskd_fast.train import trainer as trainer_module
from teskd_fast.train.build import build_optimizer, param_groups
from teskd_fast.train.config import ConfigError, resolve
from teskd_fast.train.ema import TeacherEMA, ema_decay, teacher_keys
from teskd_fast.train.optim import optimizer_step
from teskd_fast.train.recipes import RECIPES
from teskd_fast.train.trainer import Trainer

F64 = torch.float64
CPU = D.DistEnv(device=torch.device("cpu"))


def _tiny(dtype=F64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 5)).to(
        dtype)


# --- AdamW ---------------------------------------------------------------------------------------------------------


class _Block(nn.Module):
    # ConvNeXt's kinds of parameters: a conv with bias, LayerNorm, a 1-D layer scale, a linear; and BatchNorm.
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.gamma = nn.Parameter(torch.ones(4))
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)


def test_adamw_leaves_norm_weights_and_biases_undecayed_as_timm_does():
    from timm.optim import param_groups_weight_decay

    model = _Block()
    cfg = resolve({"opt": "adamw"})
    assert cfg.bn_weight_decay is False
    ours = {id(p) for g in param_groups(model, cfg) if g["weight_decay"] == 0 for p in g["params"]}
    theirs = {id(p) for g in param_groups_weight_decay(model, 0.05) if g["weight_decay"] == 0 for p in g["params"]}
    assert ours == theirs and len(ours) > 0
    # Asked for, they decay too; SGD keeps its default (decay everywhere).
    assert resolve({"opt": "adamw", "bn_weight_decay": True}).bn_weight_decay is True
    assert resolve({}).bn_weight_decay is True


def test_adamw_step_is_decoupled_adamw(device):
    """Against the formula in float64; on CUDA the fused AdamW in float32, under a grad scaler as teskd-train runs
    it with --precision fp16 (the reference in float64 on the CPU)."""
    dtype = F64 if device.type == "cpu" else torch.float32
    model = _tiny(dtype).to(device)
    cfg = resolve({"opt": "adamw", "lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.95), "eps": 1e-6})
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(bool(g["fused"]) == (device.type == "cuda") for g in optimizer.param_groups)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if device.type == "cuda" else None
    params = list(model.parameters())
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    ref = [p.detach().cpu().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    g = torch.Generator().manual_seed(3)
    for t in range(1, 5):
        grads = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        for p, grad in zip(params, grads, strict=True):
            grad = grad.to(device, dtype)
            p.grad = scaler.scale(grad) if scaler is not None else grad
        optimizer_step(optimizer, scaler, params)
        for k, (p, grad) in enumerate(zip(params, grads, strict=True)):
            ref[k] = ref[k] * (1 - 0.01 * decays[id(p)])
            m[k] = 0.8 * m[k] + 0.2 * grad
            v[k] = 0.95 * v[k] + 0.05 * grad * grad
            m_hat, v_hat = m[k] / (1 - 0.8**t), v[k] / (1 - 0.95**t)
            ref[k] = ref[k] - 0.01 * m_hat / (v_hat.sqrt() + 1e-6)
    assert sorted(set(decays.values())) == [0.0, 0.1]
    for k, p in enumerate(params):
        assert_close(p, ref[k], dtype, f"param {k}", scale=10.0 if dtype != F64 else 1.0)


# --- clipping -------------------------------------------------------------------------------------------------------


def _clip_case(scaler):
    model = _tiny()
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.0, fused=True)
    g = torch.Generator().manual_seed(5)
    grads = [10 * torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    expected = []
    norm = torch.sqrt(sum((x * x).sum() for x in grads))
    assert norm > 2.0
    for p, grad in zip(params, grads, strict=True):
        # torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6).
        expected.append(p.detach() - 0.5 * grad * (2.0 / (norm + 1e-6)))
    for p, grad in zip(params, grads, strict=True):
        p.grad = scaler.scale(grad.clone()) if scaler is not None else grad.clone()
    optimizer_step(optimizer, scaler, params, clip_grad=2.0)
    for k, p in enumerate(params):
        assert_close(p, expected[k], F64, f"param {k}")
        assert p.grad is None


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "loss-scaled"])
def test_clip_grad_clips_the_true_gradient_norm(scaled):
    # Under loss scaling the gradients are 2**16 times too large: clipped before unscaling, the step would be
    # 2**16 times too small.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaled else None
    _clip_case(scaler)


def test_clip_grad_under_loss_scaling_skips_an_overflowing_step():
    model = _tiny()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.5, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for p in params:
        p.grad = scaler.scale(torch.ones_like(p))
    params[0].grad.view(-1)[0] = float("inf")
    optimizer_step(optimizer, scaler, params, clip_grad=1.0)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
    assert scaler.get_scale() == 2.0**15


# --- accumulation -------------------------------------------------------------------------------------------------


def _trainer(tmp_path, name, **overrides):
    cfg = resolve({"width": 0.0625, "device": "cpu", "progress": False, "tensorboard": False, "plot": False,
                   "steps_per_epoch": 2, "threads": 1, **overrides})
    return Trainer(cfg, tmp_path / name, CPU)


@pytest.mark.parametrize("method", ["teskd", "baseline"])
def test_accumulated_step_is_the_large_batch_step_in_float64(tmp_path, monkeypatch, method):
    """Two micro-batches of 4 images make the gradient of one batch of 8, the feature term (a sum over the batch)
    included; BatchNorm in eval mode, where a micro-batch's normalisation is the large batch's."""
    captured = {}

    # The step itself is not the subject (its float32 momentum buffers would not take float64 gradients): the
    # gradients it is given are recorded, then cleared as it would.
    def record(optimizer, scaler, params, clip_grad=0.0):
        captured.setdefault("grads", []).append([p.grad.detach().clone() for p in params])
        optimizer.zero_grad(set_to_none=True)

    monkeypatch.setattr(trainer_module, "optimizer_step", record)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 8, 8, generator=g, dtype=F64)
    target = torch.randint(0, 10, (8,), generator=g)
    grads = {}
    for accum, batch in ((1, 8), (2, 4)):
        t = _trainer(tmp_path, f"a{accum}", method=method, accum_steps=accum, batch_size=batch,
                     feat_weight=1e-3)
        t.raw_model.double().eval()
        step = torch.zeros((), dtype=torch.long)
        captured.clear()
        for i in range(accum):
            t.train_step(images[i * batch:(i + 1) * batch], target[i * batch:(i + 1) * batch], step, i)
        assert len(captured["grads"]) == 1
        grads[accum] = captured["grads"][0]
    assert len(grads[1]) == len(grads[2])
    for k, (a, b) in enumerate(zip(grads[2], grads[1], strict=True)):
        assert_close(a, b, F64, f"grad {k}")


def test_accum_steps_leaves_a_partial_group_out_and_steps_the_schedule_per_update(tmp_path):
    t = _trainer(tmp_path, "r", accum_steps=2, steps_per_epoch=5)
    assert (t.steps_per_epoch, t.updates_per_epoch) == (4, 2)
    with pytest.raises(ConfigError, match="--accum-steps 8"):
        _trainer(tmp_path, "s", accum_steps=8, steps_per_epoch=5)
    with pytest.raises(ConfigError, match="--accum-steps"):
        resolve({"accum_steps": 0})


# --- EMA ------------------------------------------------------------------------------------------------------------


def test_ema_decay_is_timm_model_ema_v3_warmup():
    from timm.utils import ModelEmaV3

    for decay in (0.9999, 0.99, 0.5):
        timm_ema = ModelEmaV3(nn.Linear(1, 1), decay=decay, use_warmup=True)
        for step in (0, 1, 2, 3, 10, 100, 10_000, 10**7):
            assert ema_decay(decay, step) == pytest.approx(timm_ema.get_decay(step), abs=0, rel=1e-15)


def test_teacher_ema_matches_timm_on_the_teacher_and_leaves_the_students():
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = teskd_fast.create_model("resnet18", 10, width=0.0625).double()
    ours = TeacherEMA(model, 0.9)
    # timm's EMA of the whole network: its teacher entries are the reference.
    theirs = ModelEmaV3(model, decay=0.9, use_warmup=True)
    students = {k: v.clone() for k, v in ours.module.state_dict().items() if k not in ours.keys}
    g = torch.Generator().manual_seed(2)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=F64))
            for b in model.buffers():
                b.add_(torch.rand(b.shape, generator=g, dtype=F64) if b.is_floating_point() else 1)
        ours.update(step)
        theirs.update(model, step=step)
    mine, ref = ours.module.state_dict(), theirs.module.state_dict()
    for k in ours.keys:
        if ref[k].is_floating_point():
            assert_close(mine[k], ref[k], F64, k)
        else:
            assert torch.equal(mine[k], ref[k]), k
    for k, v in students.items():
        assert torch.equal(mine[k], v), k
    assert set(ours.keys) == set(teskd_fast.export_teacher(model).state_dict())
    assert set(teacher_keys(model)) == set(ours.keys)


@pytest.mark.parametrize("flags, phrase", [
    (["--export", "ema"], "--export ema needs an EMA"),
    (["--accum-steps", "0"], "--accum-steps: must be >= 1"),
    (["--clip-grad", "-1"], "--clip-grad: must be >= 0"),
    (["--betas", "0.9"], "--betas: two numbers in [0, 1)"),
    (["--opt", "lamb"], "--opt"),
])
def test_bad_optimizer_flags_are_one_line_exit_2(flags, phrase, tmp_path, capsys):
    from teskd_fast.train.cli import main

    with pytest.raises(SystemExit) as info:
        main([*flags, "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_export_ema_needs_an_ema():
    with pytest.raises(ConfigError, match="--export ema"):
        resolve({"export": "ema"})
    with pytest.raises(ConfigError, match="--ema-decay"):
        resolve({"ema_decay": 1.0})


# --- recipes --------------------------------------------------------------------------------------------------------


def test_timm_recipe_scales_the_published_numbers_and_yields_to_flags():
    cfg = resolve({"arch": "timm/convnext_atto"})
    convnext = RECIPES["convnext"]
    assert "4e-3" in convnext.source and "4096" in convnext.source and "0.05" in convnext.source
    assert (cfg.opt, cfg.weight_decay, cfg.ema_decay, cfg.label_smoothing) == ("adamw", 0.05, 0.9999, 0.1)
    # timm's sqrt rule for the Adam family: 4e-3 at 4096 -> 5e-4 at the demo's 64.
    assert cfg.lr == pytest.approx(4e-3 * math.sqrt(64 / 4096))
    assert cfg.warmup_epochs == pytest.approx(20 * 20 / 300, abs=1e-4)
    regnet = resolve({"arch": "timm/regnetx_002", "batch_size": 128})
    assert (regnet.opt, regnet.lr, regnet.weight_decay) == ("sgd", pytest.approx(0.1), 5e-5)
    given = resolve({"arch": "timm/convnext_atto", "lr": 1e-3, "opt": "sgd", "ema_decay": 0.0})
    assert (given.opt, given.lr, given.ema_decay) == ("sgd", 1e-3, 0.0)
    # A family without a recipe keeps the preset's.
    assert resolve({"arch": "timm/mobilenetv3_small_050"}).opt == "sgd"


# --- kill and resume ------------------------------------------------------------------------------------------------

RESUME = ["--epochs", "2", "--steps-per-epoch", "4", "--batch-size", "16", "--width", "0.0625", "--accum-steps", "2",
          "--opt", "adamw", "--lr", "0.01", "--clip-grad", "0.5", "--ema-decay", "0.9", "--export", "ema",
          "--no-progress", "--no-tensorboard", "--no-plot", "--device", "cpu", "--threads", "1"]


@pytest.mark.slow
def test_exact_resume_inside_an_accumulation_with_adamw_and_ema(tmp_path, monkeypatch, capsys):
    import signal

    from test_train_run import _same_rows, _same_state, _sigterm_at

    from teskd_fast.train.checkpoint import load_checkpoint
    from teskd_fast.train.cli import main
    from teskd_fast.train.metrics import read_metrics

    ref = tmp_path / "ref"
    assert main(RESUME + ["--out", str(ref)]) == 0
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        # Micro-batch 3 of epoch 1: the second optimiser step has one of its two micro-batches.
        _sigterm_at(m, 3)
        assert main(RESUME + ["--out", str(run)]) == 128 + signal.SIGTERM
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt["epoch"], ckpt["position"]) == (0, 3)
    assert ckpt["grads"] is not None and ckpt["ema"]["updates"] == 1
    assert main(["--resume", str(run), "--no-progress"]) == 0

    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    _same_state(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[key], sb[key]), key
    _same_state(a["ema"]["teacher"], b["ema"]["teacher"])
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4
    rows = read_metrics(run)
    _same_rows(read_metrics(ref), rows)
    assert all(0 <= r["val_top1_teacher_ema"] <= 100 for r in rows)
    # teacher.pt is the EMA's teacher (--export ema), which differs from the raw one.
    exported = torch.load(run / "teacher.pt", weights_only=True)
    assert torch.equal(exported["fc.weight"], b["ema"]["teacher"]["fc.weight"])
    assert not torch.equal(exported["fc.weight"], b["model"]["fc.weight"])
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert "top1_teacher_ema" in summary["final"]
    assert "teacher_ema" in capsys.readouterr().out
    # --eval-only of the checkpoint evaluates its EMA teacher too: the run's last row.
    assert main(["--eval-only", str(ref / "last.pt"), "--device", "cpu", "--no-progress"]) == 0
    assert f"teacher_ema top-1 {rows[-1]['val_top1_teacher_ema']:6.2f}%" in capsys.readouterr().out
