"""One registry per fact: the teskd-train / teskd-compare choices are the registries' names, the builders look the
names up there, and each check has one home (the loss options', the device's, the loader backends')."""

import dataclasses

import pytest
import torch

from teskd_fast.data.catalog import DATASETS, DatasetSpec, LoaderRequest
from teskd_fast.data.imagenet import LOADER_BACKENDS, backend_problem
from teskd_fast.models.factory import FORMULATIONS
from teskd_fast.models.resnet import ARCHS, STEMS
from teskd_fast.train import build
from teskd_fast.train import distributed as D
from teskd_fast.train.compare import build_compare_parser
from teskd_fast.train.config import PRESETS, ConfigError, build_parser, choices, resolve
from teskd_fast.train.schedule import SCHEDULES, LRSchedule

REGISTRIES = {
    "dataset": tuple(DATASETS),
    "arch": tuple(ARCHS),
    "stem": tuple(STEMS),
    "formulation": tuple(FORMULATIONS),
    "schedule": tuple(SCHEDULES),
    "loader": ("auto", *LOADER_BACKENDS),
}


def _choices(parser):
    return {a.dest: tuple(a.choices) for a in parser._actions if a.choices is not None}


@pytest.mark.parametrize("make_parser", [build_parser, build_compare_parser], ids=["teskd-train", "teskd-compare"])
def test_the_command_line_choices_are_the_registries(make_parser):
    parsed = _choices(make_parser())
    for field, names in REGISTRIES.items():
        assert parsed[field] == names, field
    assert parsed["preset"] == tuple(sorted(PRESETS))
    assert set(parsed) - {"preset"} == set(choices())


def test_every_registered_name_passes_the_config_check():
    for field, names in REGISTRIES.items():
        for name in names:
            assert getattr(resolve({field: name}), field) == name
    with pytest.raises(ConfigError, match=r"--arch: 'resnet9' is not one of resnet18, resnet34"):
        resolve({"arch": "resnet9"})


def test_every_schedule_gives_the_peak_then_decays():
    for name in SCHEDULES:
        lr = LRSchedule(resolve({"schedule": name, "epochs": 4, "warmup_epochs": 0.0, "lr": 0.5}), 10)
        assert lr(0, 0) == 0.5 and 0.0 <= lr(3, 9) < 0.5, name


def test_a_new_dataset_is_one_registry_entry(monkeypatch, tmp_path):
    """build_data looks the dataset up in DATASETS (no list of names of its own): a new entry is built."""
    seen = {}

    def loaders(request):
        seen["request"] = request
        return DATASETS["digits"].loaders(request)

    monkeypatch.setitem(DATASETS, "tiny", DatasetSpec(lambda root, download: None, loaders))
    assert "tiny" in choices()["dataset"]
    cfg = dataclasses.replace(resolve({"data_dir": str(tmp_path)}), dataset="tiny")
    build.check_dataset(cfg)
    train, val, num_classes = build.build_data(cfg, D.DistEnv(device=torch.device("cpu")), channels_last=False)
    assert num_classes == 10 and len(train) > 0
    request = seen["request"]
    assert isinstance(request, LoaderRequest) and request.root == tmp_path and request.batch_size == cfg.batch_size


def test_list_presets_is_one_action_of_both_commands(capsys):
    for make_parser in (build_parser, build_compare_parser):
        with pytest.raises(SystemExit) as stop:
            make_parser().parse_args(["--list-presets"])
        assert stop.value.code == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split()[0] for line in lines] == sorted(PRESETS)
        assert "built-in demo" in lines[sorted(PRESETS).index("digits-demo")]


def test_the_loss_options_are_checked_by_the_loss():
    # LossOptions allows label smoothing 1 (the cross-entropy's own range, [0, 1]); the config does too.
    assert resolve({"label_smoothing": 1.0}).label_smoothing == 1.0
    with pytest.raises(ConfigError, match=r"^--label-smoothing: must lie in \[0, 1\], got 1.5$"):
        resolve({"label_smoothing": 1.5})
    with pytest.raises(ConfigError, match=r"^--temperature: must be a finite number > 0, got 0.0$"):
        resolve({"temperature": 0.0})
    # The weights' range (>= 0) is the loss's own (kernels/options.py): one check for the library and the command.
    with pytest.raises(ConfigError, match=r"^--kd-weight: must be >= 0"):
        resolve({"kd_weight": -1.0})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_and_loaders_are_checked_against_the_device_once():
    cpu = D.DistEnv(device=torch.device("cpu"))
    # The config itself does not know the device: --precision fp16 --device cpu passes it, and the device check,
    # which the Trainer runs, refuses it (as it refuses fp16 on an "auto" device that resolved to the CPU).
    cfg = resolve({"precision": "fp16", "device": "cpu"})
    with pytest.raises(ConfigError, match=r"--precision fp16 needs a CUDA device"):
        build.check_device_options(cfg, cpu)
    cfg = resolve({"preset": "imagenet-resnet18", "loader": "nvjpeg"})
    refused = r"^--loader nvjpeg .*\(no CUDA device on this machine\).*--loader torchvision"
    with pytest.raises(ConfigError, match=refused):
        build.check_device_options(cfg, cpu)
    # The same reason, worded for the library's callers.
    assert backend_problem("nvjpeg", torch.device("cpu")).startswith("backend='nvjpeg' decodes JPEGs on the GPU")
    assert backend_problem("torchvision", torch.device("cpu")) is None
    # A dataset without loader backends ignores --loader.
    build.check_device_options(resolve({"loader": "nvjpeg"}), cpu)

