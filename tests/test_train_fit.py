"""teskd_fast.train.fit: the docs example as written, exact resume with a user's DataLoader (shuffled, randomly
augmented, with and without workers), the run folder that teskd-compare reads."""

import re
from pathlib import Path

import pytest
import torch
from test_train_run import _same_rows, _same_state, _sigterm_at
from torch.utils.data import DataLoader, Dataset

import teskd_fast.train
from teskd_fast.models.resnet import build_resnet
from teskd_fast.train.checkpoint import load_checkpoint
from teskd_fast.train.config import resolve
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.runfolder import RunFolderRefused
from teskd_fast.train.trainer import Interrupted

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_docs_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = (ROOT / "docs" / "your-own-data.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    # The page's block, as a script would run it (in this process: the imports are loaded already).
    exec(compile(code, "your-own-data.md", "exec"), {"__name__": "__main__"})
    assert "EMA teacher top-1" in capsys.readouterr().out
    run = tmp_path / "runs" / "stripes"
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "teacher.pt", "teacher.json",
                 "summary.json"):
        assert (run / name).is_file(), name
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]


class Noisy(Dataset):
    """Random images whose class is the brightest channel; a random flip drawn from torch's generator."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 8, 8, generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.images[torch.arange(n), self.labels] += 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, int(self.labels[i])


CONFIG = {"epochs": 2, "opt": "adamw", "lr": 3e-3, "ema_decay": 0.9, "accum_steps": 2, "device": "cpu",
          "progress": False, "tensorboard": False, "plot": False, "threads": 1}


def _loaders(workers):
    kw = {"num_workers": workers, "persistent_workers": False} if workers else {}
    train = DataLoader(Noisy(80, 0), batch_size=8, shuffle=True, drop_last=True, **kw)
    return train, DataLoader(Noisy(24, 1), batch_size=12)


def _model():
    torch.manual_seed(0)
    return build_resnet("resnet18", 3, "cifar", 0.0625)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_fit_resumes_a_shuffled_augmented_dataloader_exactly(tmp_path, monkeypatch, workers):
    ref = tmp_path / "ref"
    summary = teskd_fast.train.fit(_model(), *_loaders(workers), CONFIG, out=ref)
    assert summary["epochs"] == 2 and "top1_teacher_ema" in summary["final"]

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        # Batch 7 of epoch 1 (10 per epoch): inside the epoch and inside an accumulation of 2.
        _sigterm_at(m, 7)
        with pytest.raises(Interrupted):
            teskd_fast.train.fit(_model(), *_loaders(workers), CONFIG, out=run)
    assert load_checkpoint(run / "last.pt")["position"] == 7
    with pytest.raises(RunFolderRefused):
        teskd_fast.train.fit(_model(), *_loaders(workers), CONFIG, out=run)
    teskd_fast.train.fit(_model(), *_loaders(workers), CONFIG, out=run, resume=True)

    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    _same_state(a["model"], b["model"])
    _same_state(a["ema"]["teacher"], b["ema"]["teacher"])
    _same_rows(read_metrics(ref), read_metrics(run))


def test_a_fit_run_folder_is_read_by_teskd_compare(tmp_path):
    from teskd_fast.train.compare.options import Run
    from teskd_fast.train.compare.report import read_run

    out = tmp_path / "run"
    teskd_fast.train.fit(_model(), *_loaders(0), {**CONFIG, "epochs": 1, "method": "baseline"}, out=out)
    cfg = resolve({**CONFIG, "epochs": 1, "method": "baseline"})
    result = read_run(Run(seed=cfg.seed, arm="baseline", folder=out, cfg=cfg))
    assert result["epochs"] == 1 and 0 <= result["teacher_top1_last"] <= 100
    # The baseline's teacher.pt loads into the plain model.
    _model().load_state_dict(torch.load(out / "teacher.pt", weights_only=True))


def test_a_plain_list_of_batches_trains_and_warns_at_a_resume_inside_an_epoch(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    config = {**CONFIG, "accum_steps": 1, "ema_decay": 0.0}
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _sigterm_at(m, 2)
        with pytest.raises(Interrupted):
            teskd_fast.train.fit(_model(), batches, batches[:1], config, out=run, num_classes=3)
    with pytest.warns(UserWarning, match="cannot say where they were"):
        teskd_fast.train.fit(_model(), batches, batches[:1], config, out=run, num_classes=3, resume=True)
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]


def test_a_features_only_backbone_exports_the_teachers_entries(tmp_path):
    timm = pytest.importorskip("timm")
    import teskd_fast

    torch.manual_seed(0)
    backbone = timm.create_model("test_convnext", features_only=True)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    config = {**CONFIG, "epochs": 1, "accum_steps": 1, "ema_decay": 0.0}
    teskd_fast.train.fit(backbone, batches, batches[:1], config, out=tmp_path / "run", num_classes=3)
    state = torch.load(tmp_path / "run" / "teacher.pt", weights_only=True)
    rebuilt = teskd_fast.wrap(timm.create_model("test_convnext", features_only=True), 3)
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and "fc.weight" in state
    assert all(k.split(".")[0] in {"laterals", "upsample", "fuse_1", "fuse_2", "fuse_3", "downsample1",
                                   "downsample2", "downsample3", "fc_b1", "fc_b2", "fc_b3"} for k in missing)
