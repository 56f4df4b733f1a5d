"""The files teskd_fast loads: none runs code (a pickle that would write a marker file is refused at every entry
point, naming the file and the type, with the documented exit status), safetensors in and out, load_teacher, the
--init and --eval-only file and folder cases, checkpoints that load under the restricted unpickler and resume."""

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

import teskd_fast
from teskd_fast.serialization import UnsafeFileError, load_plain_pickle, load_torch
from teskd_fast.train import build
from teskd_fast.train.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from teskd_fast.train.cli import main
from teskd_fast.train.config import ConfigError, resolve

FAST = ["--steps-per-epoch", "3", "--no-progress", "--no-tensorboard", "--no-plot", "--device", "cpu"]


class Payload:
    """Unpickled by the full unpickler, it creates the file ``marker``: code a file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _malicious(path, marker, kind="torch"):
    """Write to ``path`` a state_dict-looking file holding the payload (a torch zip file, or a bare pickle)."""
    if kind == "torch":
        torch.save({"conv1.weight": torch.zeros(1), "epoch": Payload(marker)}, path)
    else:  # (a tensor in a bare pickle is itself refused: its storage unpickles through torch.load)
        path.write_bytes(pickle.dumps({"conv1.weight": [0.0], "epoch": Payload(marker)}, protocol=4))
    return path


def test_the_payload_runs_under_the_full_unpickler(tmp_path):
    # What the refusals below prevent: the same file loaded as torch.load(weights_only=False) would.
    marker = tmp_path / "marker"
    torch.load(_malicious(tmp_path / "bad.pt", marker), weights_only=False)
    assert marker.exists()


def _status(command, argv):
    """The exit status of ``command(argv)``, returned or raised as SystemExit (the refusals before any run)."""
    try:
        return command(argv)
    except SystemExit as e:
        return e.code


def _refused(capsys, marker, path, status, got):
    err = capsys.readouterr().err
    assert got == status, err
    assert not marker.exists()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "refused" in line]
    assert len(lines) == 1 and f"{path}: refused: it holds builtins.exec," in lines[0], err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("files") / "run"
    assert main([*FAST, "--epochs", "1", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_init_refuses_a_file_that_would_run_code(tmp_path, capsys, kind):
    marker = tmp_path / "marker"
    bad = _malicious(tmp_path / "weights.pth", marker, kind)
    status = main([*FAST, "--epochs", "1", "--init", str(bad), "--out", str(tmp_path / "run")])
    _refused(capsys, marker, bad, 2, status)


def test_eval_only_and_resume_refuse_a_file_that_would_run_code(tmp_path, capsys):
    marker = tmp_path / "marker"
    bad = _malicious(tmp_path / "best.pt", marker)
    _refused(capsys, marker, bad, 1, _status(main, ["--eval-only", str(bad), "--device", "cpu"]))
    run = tmp_path / "run"
    run.mkdir()
    _malicious(run / "last.pt", marker)
    _refused(capsys, marker, run / "last.pt", 1, _status(main, ["--resume", str(run)]))


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_the_best_pt_check_refuses_a_file_that_would_run_code(tmp_path, capsys, finished_run, kind):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "marker"
    _malicious(run / "best.pt", marker, kind)
    _refused(capsys, marker, run / "best.pt", 1, _status(main, ["--resume", str(run), "--epochs", "2"]))


def test_compare_refuses_a_run_file_that_would_run_code(tmp_path, capsys):
    from teskd_fast.train.compare import main as compare_main

    out, marker = tmp_path / "cmp", tmp_path / "marker"
    (out / "teskd-seed27").mkdir(parents=True)
    _malicious(out / "teskd-seed27" / "last.pt", marker)
    status = _status(compare_main, [*FAST, "--epochs", "1", "--seeds", "27", "--out", str(out)])
    _refused(capsys, marker, out / "teskd-seed27" / "last.pt", 1, status)


def test_load_teacher_and_the_readers_refuse_a_file_that_would_run_code(tmp_path):
    marker = tmp_path / "marker"
    for kind in ("torch", "pickle"):
        bad = _malicious(tmp_path / f"teacher-{kind}.pt", marker, kind)
        with pytest.raises(ValueError, match=r"teacher-.*\.pt: refused: it holds builtins.exec,"):
            teskd_fast.load_teacher(bad)
        with pytest.raises(UnsafeFileError, match="builtins.exec"):
            load_torch(bad)
        with pytest.raises(CheckpointError, match="builtins.exec"):
            load_checkpoint(bad)
    with pytest.raises(UnsafeFileError, match="batch: refused: it holds builtins.exec,"):
        load_plain_pickle(io.BytesIO(pickle.dumps({"data": Payload(marker)}, protocol=2)), "batch")
    assert not marker.exists()


def test_cifar_refuses_a_batch_file_that_would_run_code_and_reads_plain_ones(tmp_path, capsys):
    from teskd_fast.data.cifar import load_cifar
    from teskd_fast.data.common import CorruptDatasetError

    folder, marker = tmp_path / "cifar-100-python", tmp_path / "marker"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "fine_labels": [0, 1, 2, 3]}
    for protocol, name in ((2, "train"), (5, "test")):  # _codecs.encode for bytes; numpy's _frombuffer
        (folder / name).write_bytes(pickle.dumps({**batch, "filenames": [b"a", b"b", b"c", b"d"]},
                                                 protocol=protocol))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    data = load_cifar(tmp_path, "cifar100")
    assert torch.equal(torch.as_tensor(data["test"][0].reshape(4, -1)), torch.as_tensor(batch["data"]))
    (folder / "test").write_bytes(pickle.dumps({**batch, "x": Payload(marker)}))
    with pytest.raises(CorruptDatasetError, match=r"test: refused: it holds builtins.exec,"):
        load_cifar(tmp_path, "cifar100")
    status = main(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--width", "0.125", *FAST,
                   "--out", str(tmp_path / "run")])
    _refused(capsys, marker, folder / "test", 1, status)


def test_checkpoints_load_under_the_plain_restricted_unpickler_and_old_ones_resume_exactly(tmp_path, finished_run):
    # Without any allow-list: tensors, numbers, strings, lists and dicts only.
    ckpt = torch.load(finished_run / "last.pt", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and isinstance(ckpt["rng"]["numpy"]["key"], torch.Tensor)
    # A checkpoint of teskd_fast 0.1 held NumPy's RNG state as NumPy's tuple: it loads through the allow-list and
    # resumes to the run never stopped.
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert main([*FAST, "--epochs", "2", "--out", str(straight)]) == 0
    shutil.copytree(finished_run, old)
    ckpt = load_checkpoint(old / "last.pt")
    state = ckpt["rng"]["numpy"]
    ckpt["rng"]["numpy"] = (state["algorithm"], state["key"].numpy().astype(np.uint32), state["pos"],
                            state["has_gauss"], state["cached_gaussian"])
    torch.save(ckpt, old / "last.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(old / "last.pt", weights_only=True)
    assert main(["--resume", str(old), "--epochs", "2", "--no-progress"]) == 0
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(old / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_safetensors_and_load_teacher_give_the_runs_teacher(tmp_path, finished_run, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from teskd_fast.models.resnet import build_resnet

    with safe_open(str(finished_run / "teacher.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["arch"], meta["num_classes"], meta["stem"], float(meta["width"])) == ("resnet18", "10", "cifar", 0.25)
    plain = build_resnet("resnet18", 10, stem="cifar", width=0.25).double().eval()
    plain.load_state_dict(load_file(finished_run / "teacher.safetensors"), strict=True)
    network = build.build_model(resolve({"init": str(finished_run / "last.pt")}), 10)  # the TESKD network
    trained = load_checkpoint(finished_run / "last.pt")["model"]
    network.load_state_dict(trained)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = network.double().eval().teacher_forward(x)
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-12)
        # load_teacher: from the folder, teacher.safetensors, teacher.pt (with teacher.json) and last.pt.
        for source in (finished_run, finished_run / "teacher.pt", finished_run / "last.pt"):
            teacher = teskd_fast.load_teacher(source).double()
            assert type(teacher) is type(plain)
            torch.testing.assert_close(teacher(x), expected, rtol=0, atol=1e-12)
    assert "teskd_fast.load_teacher(RUN_DIR)" in json.loads((finished_run / "teacher.json").read_text())["build"]
    # --eval-only takes the safetensors file (its metadata say which network) and the folder (its best.pt).
    assert main(["--eval-only", str(finished_run / "teacher.safetensors"), "--device", "cpu", "--no-progress"]) == 0
    assert "Evaluation of" in capsys.readouterr().out
    assert main(["--eval-only", str(finished_run), "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "a run folder: its best.pt" in captured.err and f"Evaluation of {finished_run / 'best.pt'}" in captured.out
    assert _status(main, ["--eval-only", str(tmp_path), "--device", "cpu"]) == 1
    assert "a folder that holds none of best.pt, last.pt" in capsys.readouterr().err


def test_init_says_what_is_wrong_with_the_file_or_folder(tmp_path, finished_run, capsys):
    def init(path):
        return build.build_model(resolve({"init": str(path)}), 10)

    torch.save({0: torch.zeros(1)}, tmp_path / "ints.pt")
    with pytest.raises(ConfigError, match=r"ints.pt: its keys are not parameter names \(e.g. 0, a int\)"):
        init(tmp_path / "ints.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"--init: .*empty.pt is empty \(0 bytes\)"):
        init(tmp_path / "empty.pt")
    torch.save({"epoch": 3, "conv1.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"other.pt: expected a state_dict .*; its entry 'epoch' is a int"):
        init(tmp_path / "other.pt")
    torch.save({}, tmp_path / "nothing.pt")
    with pytest.raises(ConfigError, match=r"nothing.pt: holds an empty dict \(no weights\)"):
        init(tmp_path / "nothing.pt")
    with pytest.raises(ConfigError, match=r"--init .*: a folder that holds none of teacher.safetensors, teacher.pt"):
        init(tmp_path)
    # A run folder: its teacher, said so, loaded as that file is.
    model = init(finished_run)
    assert "a run folder: its teacher.safetensors" in capsys.readouterr().err
    from safetensors.torch import load_file

    for key, value in load_file(finished_run / "teacher.safetensors").items():
        assert torch.equal(model.state_dict()[key], value), key
    # A safetensors file with a prefix on every key (DDP's module., a hub wrapper's model.).
    from safetensors.torch import save_file

    save_file({f"model.{k}": v for k, v in load_file(finished_run / "teacher.safetensors").items()},
              tmp_path / "prefixed.safetensors")
    model = init(tmp_path / "prefixed.safetensors")
    assert torch.equal(model.state_dict()["fc.weight"], load_file(finished_run / "teacher.safetensors")["fc.weight"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ConfigError, match=r"bad.safetensors: not a readable safetensors file"):
        init(tmp_path / "bad.safetensors")


def test_export_teacher_unwraps_distributed_data_parallel(tmp_path):
    import torch.distributed as dist

    model = teskd_fast.create_model("resnet18", 10, stem="cifar", width=0.25).double().eval()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        plain = teskd_fast.export_teacher(wrapped)
    finally:
        dist.destroy_process_group()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.teacher_forward(x), rtol=0, atol=1e-12)
