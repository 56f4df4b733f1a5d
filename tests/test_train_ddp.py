"""DDP on the CPU with gloo: 2 processes on half batches take the step 1 process takes on the whole batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from tolerances import assert_close

from teskd_fast.train import build, trainer
from teskd_fast.train import distributed as D
from teskd_fast.train.config import ConfigError, resolve
from teskd_fast.train.metrics import read_metrics

# Global batch 16, two steps (so momentum takes part), the demo's network; a feature weight large enough that a
# wrongly scaled feature sum (a sum over the batch, not a mean) shows in the parameters.
OVERRIDES = {"batch_size": 16, "steps_per_epoch": 2, "epochs": 1, "progress": False, "tensorboard": False,
             "plot": False, "device": "cpu", "warmup_epochs": 0.0, "feat_weight": 1e-4}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_statistics_aside(build):
    """BatchNorm normalises with its running statistics (eval mode) so that samples do not interact."""

    def patched(cfg, num_classes):
        model = build(cfg, num_classes)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
                m.train = lambda mode=True, m=m: m
        return model

    return patched


def _run(out_dir, world_size=1):
    # The trainer builds its model with the name it imported from build.
    trainer.build_model = _bn_statistics_aside(build.build_model)
    env = D.setup("cpu")
    assert env.world_size == world_size
    run = trainer.Trainer(resolve(OVERRIDES), out_dir, env)
    metrics = run.train_epoch()
    val = run.evaluate()
    state = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    del run  # its DDP wrapper holds the process group: cleanup() frees both (see D.cleanup)
    D.cleanup()
    return state, {**metrics, **val}


def _worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    state, metrics = _run(out_dir, world_size)
    if rank == 0:
        torch.save(state, os.path.join(out_dir, "ddp_state.pt"))
        with open(os.path.join(out_dir, "ddp_metrics.json"), "w") as f:
            json.dump({k: v for k, v in metrics.items() if isinstance(v, float)}, f)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path, monkeypatch):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ddp_state = torch.load(tmp_path / "ddp_state.pt")
    ddp = json.loads((tmp_path / "ddp_metrics.json").read_text())

    monkeypatch.setattr(trainer, "build_model", trainer.build_model)
    single_state, single = _run(tmp_path)
    moved = 0
    init = _bn_statistics_aside(build.build_model)(resolve(OVERRIDES), 10).state_dict()
    for k, v in single_state.items():
        if v.is_floating_point():
            assert_close(ddp_state[k], v, torch.float32, name=k, scale=4.0)
            moved += not torch.equal(v, init[k])
    assert moved > 50, "the step changed the parameters"
    for key in ("train_loss", "train_ce", "train_kd", "train_feat", "train_top1_teacher"):
        assert abs(ddp[key] - single[key]) <= 1e-4 * max(1.0, abs(single[key])), key
    # Validation shards are disjoint and complete: the same accuracies as one process.
    for key in ("val_top1_teacher", "val_top1_student1", "val_top5_ensemble"):
        assert abs(ddp[key] - single[key]) < 1e-6, key


@pytest.mark.slow
def test_torchrun_two_processes_through_the_cli(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "teskd_fast.train", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--device", "cpu",
           "--no-progress", "--no-tensorboard", "--no-plot", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 logs: one header line, one epoch row.
    assert proc.stdout.count("teskd-train: training") == 1
    assert "over 2 process(es)" in proc.stdout
    rows = read_metrics(out)
    assert len(rows) == 1 and rows[0]["step"] == 2
    assert (out / "last.pt").is_file() and (out / "teacher.pt").is_file()
    # A resume: only rank 0 locks the run folder (a second lock would refuse the other rank).
    resume = cmd[: cmd.index("--epochs")] + ["--resume", str(out), "--epochs", "2", "--no-progress"]
    proc = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("teskd-train: resuming") == 1
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


def _cli_worker(rank, world_size, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import gc

    from teskd_fast.train import cli

    torch.set_num_threads(1)
    gc.disable()  # only the collections the command makes itself
    status = cli.main(["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--device", "cpu",
                       "--no-progress", "--no-tensorboard", "--no-plot", "--out", os.path.join(out_dir, "run")])
    alive = [type(o).__name__ for o in gc.get_objects()
             if isinstance(o, (trainer.Trainer, torch.nn.parallel.DistributedDataParallel))]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"status": status, "alive": alive, "group": torch.distributed.is_initialized()}, f)


@pytest.mark.slow
def test_a_finished_rank_holds_no_process_group_when_the_command_returns(tmp_path):
    # Left to the interpreter's exit, the trainer (kept by a reference cycle) freed DDP and its gloo group there,
    # and a finished rank sometimes aborted: "terminate called without an active exception", exit -6.
    mp.start_processes(_cli_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"status": 0, "alive": [], "group": False}, (rank, result)


@pytest.mark.slow
def test_sync_bn_across_cpu_processes_is_refused_before_any_work(tmp_path):
    # SyncBatchNorm has no CPU path: without this check, step 1 ended in a traceback.
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "teskd_fast.train", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--device", "cpu",
           "--sync-bn", "--no-progress", "--no-tensorboard", "--no-plot", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "--sync-bn needs CUDA devices" in proc.stderr, proc.stderr[-3000:]
    # torchrun prints its own traceback when a rank fails; none of the frames is ours.
    frames = [line for line in proc.stderr.splitlines() if line.lstrip().startswith('File "')]
    assert not [f for f in frames if "teskd_fast" in f], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # torchrun's report of the failing rank's status
    assert not out.exists()


def test_sync_bn_decides_compilation_before_any_work():
    gpus = D.DistEnv(rank=0, world_size=2, device=torch.device("cuda", 0))
    assert build.use_compile(resolve({"sync_bn": True}), gpus) is False
    assert build.use_compile(resolve({}), gpus) is True
    assert build.use_compile(resolve({"sync_bn": True}), D.DistEnv(device=torch.device("cuda", 0))) is True
    build.check_device_options(resolve({"sync_bn": True, "compile": False}), gpus)
    with pytest.raises(ConfigError, match="--sync-bn cannot be combined with --compile"):
        build.check_device_options(resolve({"sync_bn": True, "compile": True}), gpus)
    # One process: its batch is the global batch, SyncBatchNorm is not used, compiling is fine.
    build.check_device_options(resolve({"sync_bn": True, "compile": True}), D.DistEnv(device=torch.device("cuda", 0)))
