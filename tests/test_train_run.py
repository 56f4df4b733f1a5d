"""teskd-train end to end on the CPU: the demo, exact resume, atomic checkpoints, non-finite loss, CIFAR-100."""

import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
import torch
import torchvision

import teskd_fast
from teskd_fast.models.resnet import build_resnet
from teskd_fast.train import build, trainer
from teskd_fast.train.checkpoint import load_checkpoint
from teskd_fast.train.cli import main
from teskd_fast.train.config import resolve
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.plot import main as plot_main
from teskd_fast.train.schedule import LRSchedule

# The demo preset, shortened: a few steps per epoch, no progress bar, no TensorBoard.
FAST = ["--steps-per-epoch", "3", "--no-progress", "--no-tensorboard", "--no-plot", "--device", "cpu"]
# The published CIFAR-100 recipe on a narrow network and a small generated archive (see _write_cifar100).
CIFAR = ["--preset", "cifar100-resnet18", "--width", "0.125", "--batch-size", "32", "--threads", "1"]
# Keys of a metrics row that measure time, not what was computed.
TIMING = {"train_time", "eval_time", "epoch_time", "images_per_s", "resumed_mid_epoch"}


def _same_rows(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        ka = {k: v for k, v in ra.items() if k not in TIMING}
        kb = {k: v for k, v in rb.items() if k not in TIMING}
        assert ka == kb


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _sigterm_at(monkeypatch, global_step):
    """Send this process a real SIGTERM right after optimiser step number ``global_step`` (1-based)."""
    real = trainer.Trainer.train_step
    calls = {"n": 0}

    def step(self, *args):
        real(self, *args)
        calls["n"] += 1
        if calls["n"] == global_step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer.Trainer, "train_step", step)


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--epochs", "2", "--out", str(out), "--steps-per-epoch", "6", "--no-tensorboard", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for head in ("teacher", "student3", "student2", "student1", "ensemble"):
        assert f"{head}" in printed and "top-1" in printed
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_ce", "train_kd", "train_feat", "val_top1_teacher", "val_top5_student1",
                "val_top1_ensemble", "images_per_s", "epoch_time", "lr"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[-1]["val_top5_teacher"] >= rows[-1]["val_top1_teacher"]
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and "val_top1_teacher" in csv_lines[0]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lr: 0.05" in (out / "config.yaml").read_text()
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(out / name)
        assert {"model", "optimizer", "scaler", "rng", "epoch", "step", "position", "config"} <= set(ckpt)
        # The schedule is a function of the config: nothing of it is saved.
        assert "schedule" not in ckpt
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    # teacher.pt: a plain torchvision ResNet state_dict whose logits are the TESKD teacher's.
    info = json.loads((out / "teacher.json").read_text())
    teacher = build_resnet(info["arch"], info["num_classes"], stem=info["stem"], width=info["width"])
    assert isinstance(teacher, torchvision.models.ResNet)
    teacher.load_state_dict(torch.load(out / "teacher.pt", weights_only=True))
    model = build.build_model(resolve(load_checkpoint(out / "last.pt")["config"]), 10)
    model.load_state_dict(load_checkpoint(out / "last.pt")["model"])
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(teacher.eval()(x), model.eval().teacher_forward(x))
    # teskd-plot redraws it.
    (out / "curves.png").unlink()
    assert plot_main([str(out)]) == 0 and (out / "curves.png").exists()


def test_baseline_trains_the_teacher_alone_and_exports_to_torchvision(tmp_path, capsys):
    out = tmp_path / "base"
    argv = ["--method", "baseline", "--width", "1", "--batch-size", "16", "--epochs", "1", "--out", str(out)]
    assert main(argv + FAST) == 0
    row = read_metrics(out)[0]
    assert "train_kd" not in row and "val_top1_student1" not in row and "val_top1_teacher" in row
    # Width 1: the teacher loads strictly into torchvision's own resnet18 with the CIFAR stem.
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.load_state_dict(torch.load(out / "teacher.pt", weights_only=True))
    # --eval-only on the exported teacher rebuilds it from teacher.json and the run's config.yaml.
    assert main(["--eval-only", str(out / "teacher.pt"), "--no-progress"]) == 0
    assert f"teacher    top-1 {row['val_top1_teacher']:6.2f}%" in capsys.readouterr().out


def test_baseline_starts_from_the_teskd_teacher_weights():
    t = build.build_model(resolve({"width": 0.25}), 10)
    b = build.build_model(resolve({"width": 0.25, "method": "baseline"}), 10)
    _same_state(teskd_fast.export_teacher(t).state_dict(), b.state_dict())


@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory):
    """The uninterrupted 3-epoch digits run that both digits resume cases compare with, trained once."""
    ref = tmp_path_factory.mktemp("digits") / "ref"
    assert main(["--epochs", "3"] + FAST + ["--out", str(ref)]) == 0
    return ref


@pytest.mark.parametrize("data, stop_step", [("digits", 3), ("digits", 5),
                                              pytest.param("cifar100", 5, marks=pytest.mark.slow)],
                         ids=["digits-between-epochs", "digits-mid-epoch", "cifar100-mid-epoch"])
def test_exact_resume_after_sigterm(data, stop_step, tmp_path, monkeypatch, capsys, request):
    argv = ["--epochs", "3"] + FAST
    if data == "cifar100":
        _write_cifar100(tmp_path)
        argv += CIFAR + ["--data-dir", str(tmp_path)]
        ref = tmp_path / "ref"
        assert main(argv + ["--out", str(ref)]) == 0
    else:
        ref = request.getfixturevalue("digits_reference")

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _sigterm_at(m, stop_step)
        assert main(argv + ["--out", str(run)]) == 128 + signal.SIGTERM
    assert "SIGTERM" in capsys.readouterr().err
    ckpt = load_checkpoint(run / "last.pt")
    # Step 3 ends epoch 1 (3 steps per epoch): saved between epochs; step 5 is batch 2 of epoch 2.
    assert (ckpt["epoch"], ckpt["position"], ckpt["step"]) == ((1, 0, 3) if stop_step == 3 else (1, 2, 5))
    assert main(["--resume", str(run), "--no-progress"]) == 0

    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    _same_state(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    _same_rows(read_metrics(ref), read_metrics(run))
    assert torch.equal(torch.load(ref / "teacher.pt")["fc.weight"], torch.load(run / "teacher.pt")["fc.weight"])


@pytest.mark.slow
def test_sigterm_to_the_command_writes_last_pt_and_resume_finishes(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "teskd_fast.train", "--epochs", "40", "--out", str(run)] + FAST
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The first epoch's checkpoint shows that training is under way; then stop it.
        for _ in range(1200):
            if (run / "last.pt").exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and f"--resume {run}" in err
    ckpt = load_checkpoint(run / "last.pt")
    assert 1 <= ckpt["epoch"] < 40
    assert main(["--resume", str(run), "--epochs", str(ckpt["epoch"] + 1), "--no-progress"]) == 0
    assert read_metrics(run)[-1]["epoch"] == ckpt["epoch"] + 1


def test_resume_with_more_epochs_extends_a_finished_run(tmp_path):
    run = tmp_path / "run"
    assert main(["--epochs", "1", "--out", str(run)] + FAST) == 0
    # Keys a resume does not know are ignored: here settings of the schedule, which follows the config alone.
    old = load_checkpoint(run / "last.pt")
    torch.save({**old, "schedule": {"kind": "cosine", "epochs": 1, "steps_per_epoch": 3}}, run / "last.pt")
    assert main(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["epochs"] == 2
    # The schedule follows the new total: epoch 2's lr is the 2-epoch cosine's.
    cfg = resolve(ckpt["config"], base=ckpt["config"])
    assert rows[1]["lr"] == pytest.approx(LRSchedule(cfg, 3)(1, 2))
    # A run folder that holds a run is not overwritten without --resume.
    assert main(["--epochs", "1", "--out", str(run)] + FAST) == 2


@pytest.mark.parametrize("kill_at", ["pickling", "before_rename"])
def test_killed_checkpoint_write_leaves_previous_last_pt(kill_at, tmp_path):
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from teskd_fast.train import checkpoint

        class Killer:
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.atomic_save({{"epoch": 1, "w": torch.arange(10.0)}}, {str(path)!r})
        if {kill_at!r} == "before_rename":
            # Everything written to the temporary file, killed before the rename.
            def fsync(fd):
                os.kill(os.getpid(), signal.SIGKILL)
            checkpoint.os.fsync = fsync
            checkpoint.atomic_save({{"epoch": 2, "w": torch.zeros(1_000_000)}}, {str(path)!r})
        else:
            checkpoint.atomic_save({{"epoch": 2, "w": torch.zeros(1_000_000), "k": Killer()}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["w"], torch.arange(10.0))


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt"):
        load_checkpoint(bad)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = build.build_criterion
    calls = {"n": 0}

    def poisoned_criterion(cfg, world_size):
        crit = real(cfg, world_size)

        def poisoned(out, target):
            loss, parts = crit(out, target)
            calls["n"] += 1
            if calls["n"] == 5:
                # Global step 4 (0-based): the KD part and so the total go NaN.
                loss = loss * float("nan")
                parts = {**parts, "kd": parts["kd"] * float("nan")}
            return loss, parts

        return poisoned

    monkeypatch.setattr(trainer, "build_criterion", poisoned_criterion)
    run = tmp_path / "run"
    assert main(["--epochs", "3", "--out", str(run)] + FAST) == 3
    err = capsys.readouterr().err
    assert "global step 4" in err and "'kd' part" in err and "total loss" in err and "'ce'" not in err
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["position"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in read_metrics(run)] == [1]


def _write_cifar100(root, n_train=96, n_test=40):
    rng = np.random.default_rng(0)
    folder = root / "build" / "cifar-100-python"
    folder.mkdir(parents=True)

    def dump(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    for name, n in (("train", n_train), ("test", n_test)):
        dump(name, {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": [0] * n})
    dump("meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["a"] * 20})
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")


def test_cifar100_short_epoch_through_the_cli(tmp_path):
    _write_cifar100(tmp_path)
    run = tmp_path / "run"
    argv = CIFAR + ["--data-dir", str(tmp_path), "--epochs", "1", "--out", str(run), "--no-progress",
                    "--no-tensorboard", "--no-plot", "--device", "cpu"]
    assert main(argv) == 0
    row = read_metrics(run)[0]
    assert row["epoch"] == 1 and row["step"] == 3
    assert np.isfinite(row["train_loss"]) and 0 <= row["val_top1_teacher"] <= 100
    assert {f"val_top1_{h}" for h in ("teacher", "student3", "student2", "student1", "ensemble")} <= set(row)
    assert main(["--eval-only", str(run / "best.pt"), "--no-progress"]) == 0


def test_imagenet_folder_with_progressive_resizing_through_the_cli(tmp_path, monkeypatch):
    from PIL import Image

    sizes = []
    real = trainer.Trainer.train_step
    monkeypatch.setattr(trainer.Trainer, "train_step",
                        lambda self, x, *a: (sizes.append(x.shape[-1]), real(self, x, *a)))

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("n01", "n02", "n03"):
            folder = tmp_path / "imagenet" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (48 + 8 * i, 56, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{c}_{i}.JPEG", quality=90)
    run = tmp_path / "run"
    argv = ["--preset", "imagenet-resnet18", "--data-dir", str(tmp_path / "imagenet"), "--loader", "torchvision",
            "--workers", "0", "--width", "0.0625", "--batch-size", "6", "--epochs", "2", "--image-size-start", "32",
            "--image-size", "64", "--val-image-size", "32", "--val-resize", "40", "--threads", "1",
            "--out", str(run), "--no-progress", "--no-tensorboard", "--no-plot", "--device", "cpu"]
    assert main(argv) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [3, 6]
    # Progressive resizing: 32 px in the first epoch, 64 px in the last.
    assert sizes == [32, 32, 32, 64, 64, 64]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    assert json.loads((run / "teacher.json").read_text())["num_classes"] == 3


def test_the_report_names_a_best_after_epoch_n_only_when_the_run_has_epochs_after_n(capsys):
    from teskd_fast.train.report import print_summary

    final = {"top1_teacher": 50.0, "top5_teacher": 90.0}
    base = {"method": "teskd", "preset": "digits-demo", "final": final, "best_teacher_top1": 60.0, "best_epoch": 1}
    print_summary({**base, "epochs": 20, "best_teacher_top1_after_epoch_15": 55.0}, "run")
    assert "best teacher top-1 60.00% (epoch 1); best teacher top1 after epoch 15: 55.00%" in capsys.readouterr().out
    # 2 epochs, report_after 0.75: no epoch after epoch 2, so the figure would be the overall best mislabelled.
    print_summary({**base, "epochs": 2, "best_teacher_top1_after_epoch_2": 60.0}, "run")
    out = capsys.readouterr().out
    assert "best teacher top-1 60.00% (epoch 1)\n" in out and "after epoch" not in out
