"""The training loop's batches and checkpoint consistency: partial batches under torch.compile, a last training
batch of one image, best.pt after a kill between the two checkpoint writes, a resume with another process count."""

import copy
import functools
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp
from test_train_ddp import _free_port
from test_train_run import FAST, _same_rows, _same_state, _sigterm_at
from tolerances import assert_close

import teskd_fast
from teskd_fast.data.digits import DigitsLoader, load_digits_split
from teskd_fast.train import distributed as D
from teskd_fast.train import trainer
from teskd_fast.train.checkpoint import load_checkpoint
from teskd_fast.train.cli import main
from teskd_fast.train.config import resolve
from teskd_fast.train.metrics import read_metrics

# Digits in batches of 700: steps of 700, 700 and a tail of 37 (1437 images), evaluation in batches of 1400.
COMPILED = {"width": 0.0625, "batch_size": 700, "epochs": 1, "progress": False, "tensorboard": False, "plot": False,
            "device": "cpu"}


def _evaluations(run):
    x, y, x_test, y_test = load_digits_split()
    norm = {"mean": x.mean().item(), "std": x.std().item(), "shuffle": False, "augment": False}
    return [
        run.evaluate(),  # the 360 test images: one partial batch
        run.evaluate(DigitsLoader(x, y, 1400, **norm)),  # 1400 + 37
        run.evaluate(DigitsLoader(x_test[:201], y_test[:201], 200, **norm)),  # 200 + 1: a batch of one image
    ]


@pytest.mark.slow
def test_partial_batches_compile_no_graph_of_their_own(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    # aot_eager: Dynamo's graph capture and AOT autograd as with inductor, without the code generation.
    monkeypatch.setattr(teskd_fast, "compile_model", functools.partial(teskd_fast.compile_model, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    saved = {}

    def before_the_tail(run):
        if run.position == 2:
            saved["state"] = copy.deepcopy(run.state())

    env = D.setup("cpu")
    compiled = trainer.Trainer(resolve({**COMPILED, "compile": True}), tmp_path / "c", env, on_step=before_the_tail)
    compiled.train_epoch()
    compiled_evals = _evaluations(compiled)
    # One graph for train() at 700 images, one for eval() at 1400: the batches of 37, 360, 200 and 1 ran eagerly.
    assert counters["stats"]["unique_graphs"] == 2
    assert [e["_val_images"] for e in compiled_evals] == [360, 1437, 201]

    # The uncompiled network from the state before the tail: the same last step, the same evaluations.
    eager = trainer.Trainer(resolve({**COMPILED, "compile": False}), tmp_path / "e", env, resume=saved["state"])
    eager.train_epoch()
    expected = eager.raw_model.state_dict()
    for k, v in compiled.raw_model.state_dict().items():
        if v.is_floating_point():
            assert_close(v, expected[k].double(), torch.float32, name=k)
    eager.raw_model.load_state_dict(compiled.raw_model.state_dict())
    for got, want in zip(compiled_evals, _evaluations(eager), strict=True):
        for key, value in want.items():
            assert abs(got[key] - value) <= 1e-6 * max(1.0, abs(value)), key


@pytest.mark.parametrize("kind, n, batch, world_size, drop_last", [
    ("digits", 35, 8, 2, False),  # global batches of 16: a tail of 3, split 2 + 1
    ("digits", 33, 8, 2, False),  # a tail of 1 < 2 processes: the loader drops it
    ("digits", 33, 8, 1, True),
    ("cifar", 37, 4, 2, False),  # 18 images per process: 4 x 4 + 2
    ("cifar", 37, 6, 3, False),  # 12 per process: 2 x 6
    ("cifar", 37, 4, 1, True),
])
def test_last_batch_size_is_the_size_of_the_last_batch_each_process_gets(kind, n, batch, world_size, drop_last):
    from teskd_fast.data.cifar import CifarLoader
    from teskd_fast.train.batches import last_batch_size

    for rank in range(world_size):
        common = {"rank": rank, "world_size": world_size, "drop_last": drop_last}
        if kind == "digits":
            loader = DigitsLoader(torch.rand(n, 1, 8, 8), torch.arange(n) % 10, batch, **common)
        else:
            loader = CifarLoader(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), torch.arange(n) % 10,
                                 batch_size=batch, device="cpu", **common)
        sizes = [len(y) for _, y in loader]
        assert len(sizes) == len(loader) and last_batch_size(loader) == sizes[-1], (rank, sizes)


def test_a_batch_size_of_one_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--batch-size", "1", "--epochs", "1", "--out", str(out)] + FAST) == 2
    err = capsys.readouterr().err
    assert "--batch-size 1: a training step needs at least 2 images per process" in err
    assert "Traceback" not in err and not out.exists()


def test_a_last_training_batch_of_one_image_is_left_out_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    # 1437 digits = 718 + 718 + 1: two steps per epoch, every test image evaluated.
    argv = ["--epochs", "2", "--width", "0.0625", "--batch-size", "718", "--device", "cpu", "--no-progress",
            "--no-tensorboard", "--no-plot"]
    ref = tmp_path / "ref"
    assert main(argv + ["--out", str(ref)]) == 0
    rows = read_metrics(ref)
    assert [r["step"] for r in rows] == [2, 4]
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _sigterm_at(m, 3)  # batch 1 of epoch 2
        assert main(argv + ["--out", str(run)]) == 128 + signal.SIGTERM
    assert load_checkpoint(run / "last.pt")["position"] == 1
    assert main(["--resume", str(run), "--no-progress"]) == 0
    _same_state(load_checkpoint(ref / "last.pt")["model"], load_checkpoint(run / "last.pt")["model"])
    _same_rows(rows, read_metrics(run))


@pytest.mark.parametrize("killed_copy", [1, 2], ids=["first-best", "later-best"])
def test_best_pt_agrees_with_last_pt_after_a_kill_between_the_two_writes(killed_copy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--epochs", str(killed_copy), "--seed", "1", "--out", str(out)] + FAST
    real, calls = trainer.atomic_copy, {"n": 0}

    def copy(src, dst):
        calls["n"] += 1
        if calls["n"] == killed_copy:
            raise KeyboardInterrupt  # the process dies after last.pt, before best.pt
        real(src, dst)

    evaluate = trainer.Trainer.evaluate

    def improving(self, *args, **kwargs):
        # Every epoch a new best, whatever this CPU's numerics make of the near-chance digits run (under the AVX2
        # dispatch epoch 2 did not improve on epoch 1, and best.pt was not copied again).
        metrics = evaluate(self, *args, **kwargs)
        return {**metrics, "val_top1_teacher": metrics["val_top1_teacher"] + 100.0 * self.epoch}

    with monkeypatch.context() as m:
        m.setattr(trainer, "atomic_copy", copy)
        m.setattr(trainer.Trainer, "evaluate", improving)
        # 130: the kill happened (each epoch improves, so best.pt is copied at every epoch).
        assert main(argv) == 130
    last = load_checkpoint(out / "last.pt")
    assert last["best"]["epoch"] == killed_copy
    assert main(["--resume", str(out), "--no-progress"]) == 0
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == last["best"]["epoch"] and best["best"] == last["best"]
    _same_state(best["model"], last["model"])


def _sigterm_worker(rank, world_size, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import pytest

    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as m:
        if rank == 0:
            _sigterm_at(m, 2)
        status = main(["--epochs", "1", "--steps-per-epoch", "4", "--log-every", "1", "--batch-size", "16",
                       "--out", out] + FAST[2:])
    assert status == 128 + signal.SIGTERM, status


@pytest.mark.slow
def test_a_mid_epoch_resume_with_another_process_count_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    mp.start_processes(_sigterm_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    saved = load_checkpoint(out / "last.pt")
    assert (saved["epoch"], saved["position"]) == (0, 2)
    capsys.readouterr()
    assert main(["--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "inside epoch 1 (batch 2) by 2 process(es); this resume has 1" in err
    assert "torchrun --nproc_per_node 2" in err and "Traceback" not in err
    assert load_checkpoint(out / "last.pt")["position"] == 2  # nothing was trained


def test_repair_best_rewrites_only_what_last_pt_can_give(tmp_path):
    from teskd_fast.train.checkpoint import atomic_save, repair_best

    best = {"top1": 50.0, "epoch": 2}
    atomic_save({"epoch": 2, "position": 0, "best": best, "model": {"w": torch.ones(2)}}, tmp_path / "last.pt")
    assert repair_best(tmp_path, 2, 0, best)  # missing: last.pt is the best epoch's state
    assert load_checkpoint(tmp_path / "best.pt")["best"] == best
    assert not repair_best(tmp_path, 2, 0, best)  # agrees: left alone
    # Cut short, as a crash mid-write of a non-atomic copy would leave it (plain garbage starting with a pickle
    # opcode that names a global is refused instead: tests/test_train_files.py).
    (tmp_path / "best.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:200])
    assert repair_best(tmp_path, 2, 0, best)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2
    (tmp_path / "best.pt").unlink()
    with pytest.warns(UserWarning, match="does not hold epoch 2.*cannot be rebuilt"):
        assert not repair_best(tmp_path, 3, 0, best)  # the best epoch's state is gone
    assert not (tmp_path / "best.pt").exists()
    assert not repair_best(tmp_path, 0, 0, {"top1": -1.0, "epoch": 0})  # no finished epoch
