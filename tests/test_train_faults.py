"""teskd-train under faults: a corrupt checkpoint, a full disk, bad flags and files, a process group that cannot
form, and torchrun restarting a failed worker group. Each gives one ``teskd-...:`` line and its exit status."""

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from teskd_fast.train.checkpoint import CheckpointError, load_checkpoint
from teskd_fast.train.cli import main
from teskd_fast.train.config import ConfigError, resolve
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.plot import main as plot_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
FAST = ["--device", "cpu", "--width", "0.0625", "--steps-per-epoch", "2", "--batch-size", "16", "--no-progress",
        "--no-tensorboard", "--no-plot", "--threads", "1"]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, tmpfs and torchrun's gloo")


def _train(*args, env=ENV, timeout=300):
    done = subprocess.run([sys.executable, "-m", "teskd_fast.train", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr


def _one_line(stderr, *phrases):
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("teskd-"), stderr
    for phrase in phrases:
        assert phrase in last, (phrase, stderr)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    status, _, err = _train(*FAST, "--epochs", "1", "--out", str(out))
    assert status == 0, err
    return out


# --- a corrupt checkpoint -------------------------------------------------------------------------------------


def test_every_bit_flip_in_a_checkpoint_is_refused_or_harmless(run, tmp_path):
    # torch.load checks no checksum: a flipped bit in a tensor loaded as a wrong weight, one in the pickle as a
    # TypeError, an AttributeError, an OverflowError... The zip members' CRC-32s are checked now.
    data = (run / "last.pt").read_bytes()
    original = load_checkpoint(run / "last.pt")
    rng = random.Random(0)
    refused = 0
    for trial in range(60):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{trial}.pt"
        path.write_bytes(bytes(flipped))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e)
            refused += 1
            continue
        # A flip the archive does not use (padding, a comment): the same checkpoint.
        assert loaded["config"] == original["config"] and loaded["epoch"] == original["epoch"]
        for key, value in original["model"].items():
            assert torch.equal(loaded["model"][key], value), key
    assert refused > 30  # most of the file is tensor data or pickle: most flips must be found


@pytest.mark.parametrize("how", ["--resume", "--eval-only"])
def test_a_bit_flipped_checkpoint_is_exit_1_with_one_line(run, tmp_path, how):
    folder = tmp_path / "copy"
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns(".lock"))
    data = bytearray((folder / "last.pt").read_bytes())
    at = data.find(b"OrderedDict")  # in the pickle: it loaded as "Can't get attribute 'OrderedDist'"
    assert at > 0
    data[at + 9] ^= 0x10
    (folder / "last.pt").write_bytes(bytes(data))
    target = folder if how == "--resume" else folder / "last.pt"
    status, _, err = _train(how, str(target), "--device", "cpu", "--no-progress")
    assert status == 1, err
    _one_line(err, "last.pt is corrupt", "CRC-32")


# --- a full disk -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(folder, size):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_exit_4_naming_it_and_last_pt_stays(run, tmp_path):
    with _tmpfs(tmp_path / "small", "8m") as disk:
        out = disk / "run"
        status, _, err = _train(*FAST, "--epochs", "1", "--out", str(out))
        assert status == 0, err
        saved = (out / "last.pt").read_bytes()
        # Fill the disk, then resume: epoch 2's checkpoint cannot be written.
        filler = disk / "filler"
        with open(filler, "wb") as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        # Not a byte left: the resume cannot even write its lock file, and stops before any work.
        status, _, err = _train("--resume", str(out), "--epochs", "2", "--device", "cpu", "--no-progress")
        assert status == 4, err
        _one_line(err, "No space left on device", "(the disk is full)")
        # Half a checkpoint left: epoch 2 runs, its last.pt cannot be written.
        os.truncate(filler, filler.stat().st_size - len(saved) // 2)
        status, _, err = _train("--resume", str(out), "--epochs", "2", "--device", "cpu", "--no-progress")
        assert status == 4, err
        _one_line(err, f"cannot write {out / 'last.pt'}: No space left on device", "(the disk is full)",
                  f"{out / 'last.pt'} holds the last saved state")
        assert (out / "last.pt").read_bytes() == saved  # the previous checkpoint, whole
        assert not list(out.glob(".*.tmp"))
        # With room again, the resume is the one an uninterrupted run makes.
        filler.unlink()
        status, _, err = _train("--resume", str(out), "--epochs", "2", "--device", "cpu", "--no-progress")
        assert status == 0, err
        assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


# --- bad flags and files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, phrase", [
    ({"seed": 1180591620717411303424}, "--seed: must be in [0, 2**64)"),
    ({"seed": -1}, "--seed: must be in [0, 2**64)"),
    ({"compile_mode": "nonsense"}, "--compile-mode: 'nonsense' is not one of default, reduce-overhead"),
])
def test_values_torch_would_refuse_late_are_refused_up_front(flags, phrase):
    with pytest.raises(ConfigError) as info:
        resolve(flags)
    assert phrase in str(info.value)


def test_a_bad_seed_or_compile_mode_is_exit_2_before_any_work(tmp_path, capsys):
    for argv in (["--seed", "1180591620717411303424"], ["--compile", "--compile-mode", "nonsense"]):
        with pytest.raises(SystemExit) as info:
            main([*argv, "--out", str(tmp_path / "run")])
        assert info.value.code == 2
        assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_binary_or_unreadable_config_is_exit_2_naming_it(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(SystemExit) as info:
        main(["--config", str(binary)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {binary}: not a text file" in err and "Traceback" not in err
    unreadable = tmp_path / "secret.yaml"
    unreadable.write_text("epochs: 1\n")
    unreadable.chmod(0)
    try:
        with open(unreadable):
            pytest.skip("permissions do not stop this process's reads (root)")
    except PermissionError:
        pass
    with pytest.raises(SystemExit) as info:
        main(["--config", str(unreadable)])
    assert info.value.code == 2
    assert f"--config {unreadable}: cannot be read" in capsys.readouterr().err


def test_teskd_plot_names_a_metrics_file_cut_mid_line(run, tmp_path, capsys):
    folder = tmp_path / "cut"
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns(".lock"))
    metrics = folder / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "val_top1_tea')
    assert plot_main([str(folder)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"teskd-plot: {metrics}: line 2 is not a JSON row") and "--resume" in err


# --- processes that cannot form a group ------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_rank_that_cannot_join_its_group_is_exit_4_not_a_configuration_error(tmp_path):
    # Rank 1 of 2 with nobody listening at MASTER_ADDR:MASTER_PORT: was exit 2, the status of a bad flag.
    port = _free_port()
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TESKD_FAST_DIST_TIMEOUT": "3"}
    status, _, err = _train(*FAST, "--epochs", "1", "--out", str(tmp_path / "run"), env=env)
    assert status == 4, err
    _one_line(err, "rank 1 of 2 could not join the gloo process group", f"127.0.0.1:{port}")
    assert not (tmp_path / "run").exists()


# --- torchrun restarting a failed worker group -----------------------------------------------------------------


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.slow
def test_torchrun_restart_resumes_from_last_pt(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts",
           "1", "-m", "teskd_fast.train", *FAST, "--epochs", "3", "--steps-per-epoch", "6", "--out", str(out)]
    # Without a store prefix per attempt (distributed._restart_store), about half the restarted gloo groups failed
    # to connect, or hung: a bounded timeout makes a hang a failure with a message.
    env = {**ENV, "TESKD_FAST_DIST_TIMEOUT": "120"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)  # one rank dies inside epoch 2
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-4000:]
    # The restarted group resumed (was: "already holds a run", exit 2 on every rank).
    assert stderr.count("under torchrun (restart 1 of this node), ") == 1, stderr[-4000:]
    assert stdout.count("teskd-train: resuming") == 1, stdout
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    assert load_checkpoint(out / "last.pt")["epoch"] == 3


def test_a_restarted_group_without_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["--epochs", "1"])
    assert info.value.code == 2
    assert "without --out the first attempt's run folder cannot be found" in capsys.readouterr().err


def test_a_summed_part_is_scaled_back_to_the_global_batch():
    """Over processes the per-batch means of a part are averaged, except a part that is a sum over the batch
    (SUMMED_PARTS: the feature loss), whose global-batch value is the processes' sum."""
    from teskd_fast.loss.options import PARTS, SUMMED_PARTS
    from teskd_fast.train.metrics import TrainAccumulator

    acc = TrainAccumulator(list(PARTS), torch.device("cpu"))
    parts = {p: torch.tensor(float(i + 1)) for i, p in enumerate(PARTS)}
    acc.update(torch.tensor(0), torch.tensor(10.0), parts, torch.eye(2), torch.tensor([0, 1]))
    out = acc.unpack(acc.packed().tolist(), world_size=4)
    assert SUMMED_PARTS == {"feat"}
    assert {p: out[f"train_{p}"] for p in PARTS} == {p: (i + 1) * (4 if p in SUMMED_PARTS else 1)
                                                     for i, p in enumerate(PARTS)}


# --- a run told to stop while it waits on its data ------------------------------------------------------------

_BLOCKING_RUN = """
import sys, time
from teskd_fast.train import cli, trainer

real = trainer.build_data


class Blocking:
    # The real loader for its first batch, then a wait for data that never comes (a hung file system).
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        batches = iter(self.inner)
        yield next(batches)
        print("waiting", flush=True)
        while True:
            time.sleep(0.05)


def build_data(*args, **kwargs):
    train, val, classes = real(*args, **kwargs)
    return Blocking(train), val, classes


trainer.build_data = build_data
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_second_sigterm_stops_a_run_that_waits_on_its_data(tmp_path):
    """The first SIGTERM asks the run to stop after its step, which waits on a loader that never gives its batch;
    the second abandons the wait: exit status 143, one line, within a bound, the previous last.pt kept."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_RUN, *FAST, "--epochs", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        for line in proc.stdout:  # the start line, then the first step's wait for its second batch
            if line.strip() == "waiting":
                break
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)  # the first SIGTERM only asks: the wait goes on
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        status = proc.wait(timeout=30)
        waited = time.monotonic() - t0
    finally:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert status == 128 + signal.SIGTERM and waited < 10, (status, waited, stderr[-2000:])
    _one_line(stderr, "teskd-train: abandoned")
    assert "Traceback" not in stderr and "SIGTERM received" in stdout
