"""A CIFAR-100 ResNet-18 TESKD training epoch: the reference's stack against teskd-train's.

Baseline ("reference-stack"): the faithful network, eager, NCHW, fp16 autocast with a grad scaler on CUDA
(fp32 on the CPU), the reference loss, and a torchvision DataLoader without workers applying RandomCrop(32, 4) +
RandomHorizontalFlip + Normalize on the CPU, as the published code does. Ours ("teskd-train"): the
``cifar100-resnet18`` preset through :class:`teskd_fast.train.trainer.Trainer`: the fast formulation, the
device-resident CIFAR loader, bf16 + channels_last + torch.compile on CUDA, the fused loss.

Data: synthetic CIFAR-shaped images (random pixels, 100 classes) written as the python-version archive. On CUDA a
full 50,000-image epoch at batch 128; on the CPU a smoke-sized one (a narrow network, 4 steps). The figure is the
time of one epoch (median over rounds, after one warm-up epoch that also compiles); ``projected_200_epochs_min``
in extra_info is 200 times the median.
"""

import pickle

import numpy as np
import pytest
import torch
from common import record, sync

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
N_TRAIN = 50_000 if HAS_CUDA else 256
BATCH = 128 if HAS_CUDA else 16
WIDTH = 1.0 if HAS_CUDA else 0.0625
STEPS = 0 if HAS_CUDA else 4
ROUNDS = 1


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", N_TRAIN), ("test", 1000)):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": rng.integers(0, 100, n).tolist(),
                },
                f,
            )
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return root


def _ours(root):
    from teskd_fast.train import distributed as D
    from teskd_fast.train.config import resolve
    from teskd_fast.train.trainer import Trainer

    cfg = resolve(
        {
            "preset": "cifar100-resnet18",
            "data_dir": str(root),
            "width": WIDTH,
            "batch_size": BATCH,
            "steps_per_epoch": STEPS,
            "progress": False,
            "tensorboard": False,
            "plot": False,
            "device": DEVICE,
        }
    )
    trainer = Trainer(cfg, root / "run", D.DistEnv(device=torch.device(DEVICE)))

    def epoch():
        trainer.position = 0
        trainer.train_epoch()
        trainer.epoch += 1
        sync(DEVICE)

    return epoch


def _reference(root):
    import torchvision.transforms as T

    import teskd_fast
    from teskd_fast import teskd_loss
    from teskd_fast.data import CIFAR_MEAN, CIFAR_STD, load_cifar

    images, labels = load_cifar(str(root), "cifar100")["train"]

    class Dataset(torch.utils.data.Dataset):
        transform = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ConvertImageDtype(torch.float32),
                T.Normalize(CIFAR_MEAN, CIFAR_STD),
            ]
        )

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return self.transform(images[i]), labels[i]

    loader = torch.utils.data.DataLoader(Dataset(), batch_size=BATCH, shuffle=True, num_workers=0)
    torch.manual_seed(27)
    model = teskd_fast.create_model("resnet18", 100, stem="cifar", formulation="faithful", width=WIDTH).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda") if HAS_CUDA else None

    def epoch():
        model.train()
        for step, (x, y) in enumerate(loader):
            if STEPS and step == STEPS:
                break
            x, y = x.to(DEVICE), y.to(DEVICE)
            with torch.autocast(DEVICE, dtype=torch.float16, enabled=HAS_CUDA):
                out = model(x)
                loss = teskd_loss(
                    out.logits, out.student_logits, y, out.feature, out.student_features, backend="reference"
                )
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
        sync(DEVICE)

    return epoch


@pytest.mark.smoke
@pytest.mark.parametrize("provider", ["reference-stack", "teskd-train"])
def test_cifar100_resnet18_epoch(benchmark, cifar_root, provider):
    epoch = _reference(cifar_root) if provider == "reference-stack" else _ours(cifar_root)
    record(
        benchmark,
        f"train-epoch-cifar100-resnet18-{N_TRAIN}img-b{BATCH}-w{WIDTH}-{DEVICE}",
        provider,
        DEVICE,
        baseline=provider == "reference-stack",
        images=N_TRAIN if not STEPS else STEPS * BATCH,
        shape=[BATCH, 3, 32, 32],
    )
    benchmark.pedantic(epoch, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info["projected_200_epochs_min"] = 200 * benchmark.stats.stats.median / 60
