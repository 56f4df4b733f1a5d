"""teskd-train --arch timm/NAME: both methods on the very same timm model, --init, resume, export, torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

import teskd_fast
from teskd_fast.train import build
from teskd_fast.train.checkpoint import load_checkpoint
from teskd_fast.train.cli import main
from teskd_fast.train.config import ConfigError, build_parser, resolve
from teskd_fast.train.metrics import read_metrics

timm = pytest.importorskip("timm", reason="timm is optional: pip install timm")

ARCH = "timm/test_convnext"
FAST = ["--arch", ARCH, "--steps-per-epoch", "2", "--batch-size", "16", "--no-progress", "--no-tensorboard",
        "--no-plot", "--device", "cpu"]


def test_arch_takes_any_timm_name_and_checks_it():
    parsed = build_parser().parse_args(["--arch", "timm/convnext_atto"])
    assert parsed.arch == "timm/convnext_atto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--arch", "timm/"])
    cfg = resolve({"arch": "timm/convnext_atto"})
    # The digits demo's ResNet-only values give way: no width factor, 8x8 digits resized to 32 px.
    assert (cfg.width, cfg.image_size, cfg.val_image_size, cfg.val_resize) == (1.0, 32, 32, 32)
    assert resolve({"arch": "timm/convnext_atto", "image_size": 48}).image_size == 48
    with pytest.raises(ConfigError, match=r"--arch timm/convnext_nope: timm has no model 'convnext_nope'"):
        resolve({"arch": "timm/convnext_nope"})
    with pytest.raises(ConfigError, match=r"--width 0.5: the width factor applies to the torchvision ResNets"):
        resolve({"arch": "timm/convnext_atto", "width": 0.5})


def test_baseline_is_the_plain_timm_model_with_the_teskd_teachers_weights():
    teskd = build.build_model(resolve({"arch": ARCH}), 10)
    baseline = build.build_model(resolve({"arch": ARCH, "method": "baseline"}), 10)
    torch.manual_seed(resolve({}).seed)
    fresh = timm.create_model("test_convnext", num_classes=10)
    assert type(baseline) is type(fresh) and teskd.kind == "timm"
    for key, value in fresh.state_dict().items():
        assert torch.equal(baseline.state_dict()[key], value), key
        assert torch.equal(teskd.backbone.state_dict()[key], value), key
    with pytest.raises(TypeError, match="image batch, got int64"):
        baseline(torch.zeros(2, 3, 32, 32, dtype=torch.int64))


def test_train_both_methods_export_loads_into_timm_and_evaluates(tmp_path, capsys):
    for method in ("teskd", "baseline"):
        run = tmp_path / method
        assert main([*FAST, "--epochs", "1", "--method", method, "--out", str(run)]) == 0
        info = json.loads((run / "teacher.json").read_text())
        assert info["timm"] == "test_convnext" and info["num_classes"] == 10
        plain = timm.create_model(info["timm"], num_classes=info["num_classes"]).eval()
        plain.load_state_dict(torch.load(run / "teacher.pt"), strict=True)
        # teacher.safetensors: the same tensors, strictly into the plain model, through timm's own loader (the
        # num_classes of the overlay keeps timm from dropping the classifier) and through load_teacher.
        from safetensors.torch import load_file

        x = torch.randn(2, 3, 32, 32)
        again = timm.create_model(info["timm"], num_classes=10).eval()
        again.load_state_dict(load_file(run / "teacher.safetensors"), strict=True)
        hub = timm.create_model(info["timm"], pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(
            file=str(run / "teacher.safetensors"), num_classes=10)).eval()
        with torch.no_grad():
            for model in (again, hub, teskd_fast.load_teacher(run)):
                assert type(model) is type(plain)
                assert torch.equal(model(x), plain(x))
        capsys.readouterr()
        assert main(["--eval-only", str(run / "teacher.pt"), "--device", "cpu", "--no-progress"]) == 0
        row = read_metrics(run)[-1]
        assert f"teacher    top-1 {row['val_top1_teacher']:6.2f}%" in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*FAST, "--epochs", "2", "--out", str(straight)]) == 0
    assert main([*FAST, "--epochs", "1", "--out", str(split)]) == 0
    assert main(["--resume", str(split), "--epochs", "2", "--no-progress"]) == 0
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(split / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("source", ["timm", "safetensors", "teacher.pt", "other-classes"])
def test_init_reproduces_the_plain_models_logits_at_step_0(tmp_path, source, capsys):
    import argparse

    from safetensors.torch import save_file

    torch.manual_seed(5)
    plain = timm.create_model("test_convnext", num_classes=10 if source != "other-classes" else 1000).eval()
    path = tmp_path / ("weights.safetensors" if source == "safetensors" else "weights.pth")
    state = plain.state_dict()
    if source == "timm":  # timm's train.py: its arguments as an argparse.Namespace beside the weights
        torch.save({"state_dict": state, "epoch": 3, "args": argparse.Namespace(model="test_convnext", lr=0.1,
                                                                                 betas=(0.9, 0.99))}, path)
    elif source == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    plain.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for method in ("teskd", "baseline"):
        model = build.build_model(resolve({"arch": ARCH, "method": method, "init": str(path)}), 10).double().eval()
        with torch.no_grad():
            got = model.teacher_forward(x) if method == "teskd" else model(x)
            if source == "other-classes":
                # Backbone loaded, classifier fresh: the pre-logits are the plain model's, and it says so.
                teacher = model.backbone if method == "teskd" else model
                torch.testing.assert_close(teacher.forward_head(teacher.forward_features(x), pre_logits=True),
                                           plain.forward_head(plain.forward_features(x), pre_logits=True),
                                           rtol=0, atol=1e-12)
                assert "its classifier has 1000 classes, this run 10: a new classifier" in capsys.readouterr().err
            else:
                torch.testing.assert_close(got, plain(x), rtol=0, atol=1e-12)
                assert f"--init {path}: the teacher loaded (" in capsys.readouterr().out


def test_init_names_the_mismatched_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), path)
    with pytest.raises(ConfigError, match=r"--init .*resnet.pth: state_dict does not match the teacher \(ConvNeXt\): "
                                          r"\d+ missing key\(s\) \['head.*unexpected key\(s\) \['bn1"):
        build.build_model(resolve({"arch": ARCH, "init": str(path)}), 10)
    with pytest.raises(ConfigError, match="--init: no such file"):
        build.build_model(resolve({"arch": ARCH, "init": str(tmp_path / "none.pth")}), 10)


def test_init_of_a_torchvision_resnet_teacher(tmp_path):
    import torchvision

    torch.manual_seed(2)
    plain = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(plain.state_dict(), path)
    cfg = resolve({"arch": "resnet18", "stem": "imagenet", "width": 1.0, "init": str(path)})
    model = build.build_model(cfg, 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.teacher_forward(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "teskd_fast.train", *FAST, "--epochs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 process(es)" in proc.stdout
    plain = timm.create_model("test_convnext", num_classes=10)
    plain.load_state_dict(torch.load(out / "teacher.pt"), strict=True)


def test_compare_takes_the_same_arch(tmp_path):
    from teskd_fast.train.compare import main as compare_main

    out = tmp_path / "cmp"
    assert compare_main([*FAST, "--epochs", "1", "--out", str(out)]) == 0
    assert json.loads((out / "compare.json").read_text())["arch"] == ARCH
    for run in ("teskd-seed27", "baseline-seed27"):
        plain = timm.create_model("test_convnext", num_classes=10)
        plain.load_state_dict(torch.load(out / run / "teacher.pt"), strict=True)


def test_init_from_a_previous_runs_checkpoint_and_from_torchvision_weights(tmp_path):
    import torchvision

    run = tmp_path / "run"
    assert main([*FAST, "--epochs", "1", "--out", str(run)]) == 0
    trained = load_checkpoint(run / "last.pt")["model"]
    model = build.build_model(resolve({"arch": ARCH, "init": str(run / "last.pt"), "seed": 3}), 10)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, trained["backbone." + key]), key
    # The baseline (the plain timm model) from a TESKD run's checkpoint: its teacher, the backbone. prefix dropped.
    model = build.build_model(resolve({"arch": ARCH, "method": "baseline", "init": str(run / "last.pt")}), 10)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained["backbone." + key]), key
    # timm's ResNets have torchvision's parameter names: torchvision weights start a timm resnet18 teacher.
    plain = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(plain.state_dict(), tmp_path / "tv.pth")
    cfg = resolve({"arch": "timm/resnet18", "method": "baseline", "init": str(tmp_path / "tv.pth")})
    model = build.build_model(cfg, 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
