"""teskd-train configuration: presets, generated flags, YAML, validation, schedules, missing datasets."""

import math

import pytest
from folders import small_jpeg_folder

from teskd_fast.train.cli import main
from teskd_fast.train.config import PRESETS, ConfigError, TrainConfig, build_parser, resolve
from teskd_fast.train.schedule import LRSchedule, image_size_at


def test_cifar_presets_match_the_published_recipe():
    for arch in ("resnet18", "resnet34", "resnet50", "resnext50_32x4d"):
        cfg = resolve({"preset": f"cifar100-{arch}"})
        assert (cfg.arch, cfg.dataset, cfg.stem, cfg.method) == (arch, "cifar100", "cifar", "teskd")
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay) == (
            200, 128, 0.1, 0.9, True, 5e-4)
        assert cfg.bn_weight_decay and cfg.schedule == "multistep" and cfg.lr_gamma == 0.1
        assert (cfg.temperature, cfg.ce_weight, cfg.kd_weight, cfg.feat_weight, cfg.seed) == (4.0, 0.2, 0.8, 1e-7, 27)
        sched = LRSchedule(cfg, steps_per_epoch=391)
        # x0.1 at epochs 100 and 150 (0-based epoch 100 is the 101st).
        assert sched(99, 390) == pytest.approx(0.1) and sched(100, 0) == pytest.approx(0.01)
        assert sched(149, 0) == pytest.approx(0.01) and sched(150, 0) == pytest.approx(0.001)


def test_imagenet_presets_and_our_fast_recipe():
    for arch in ("resnet18", "resnet34", "resnet50"):
        cfg = resolve({"preset": f"imagenet-{arch}"})
        assert (cfg.stem, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == ("imagenet", 90, 256, 0.1, 1e-4)
        assert (cfg.image_size, cfg.val_resize, cfg.val_image_size) == (224, 256, 224)
        sched = LRSchedule(cfg, 5005)
        assert [sched(e, 0) for e in (29, 30, 59, 60, 89)] == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])
    fast = [name for name in PRESETS if name.startswith("imagenet") and "ours" in name]
    assert fast, "a fast ImageNet recipe of our own, named as ours"
    cfg = resolve({"preset": fast[0]})
    assert cfg.label_smoothing > 0 and not cfg.bn_weight_decay and cfg.epochs < 90
    sizes = [image_size_at(cfg, e) for e in range(cfg.epochs)]
    assert sizes[0] == 160 and sizes[-1] == 192 and sizes == sorted(sizes) and all(s % 32 == 0 for s in sizes)


def test_every_field_has_a_flag_and_precedence_is_preset_yaml_flags(tmp_path):
    parser = build_parser()
    flags = {a.dest for a in parser._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= flags
    ns = vars(parser.parse_args(["--no-compile", "--lr-milestones", "0.3", "0.6", "--precision", "bf16"]))
    assert ns == {"compile": False, "lr_milestones": [0.3, 0.6], "precision": "bf16"}
    yml = tmp_path / "c.yaml"
    yml.write_text("preset: cifar100-resnet50\nlr: 0.05\nbatch-size: 64\n")
    from teskd_fast.train.config import load_yaml

    cfg = resolve({**load_yaml(str(yml)), "batch_size": 32})
    assert (cfg.arch, cfg.lr, cfg.batch_size, cfg.epochs) == ("resnet50", 0.05, 32, 200)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "inf"], "--lr: must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay: must be a finite number"),
        (["--momentum", "2"], "--momentum: must be in [0, 1)"),
        (["--batch-size", "abc"], "--batch-size"),
        (["--precision", "fp8"], "--precision"),
        (["--lr-milestones", "0.8", "0.5"], "--lr-milestones"),
        (["--label-smoothing", "1.5"], "--label-smoothing"),
        (["--device", "gpu0"], "--device"),
        (["--preset", "cifar1000-resnet18"], "--preset"),
        (["--method", "byot"], "--method"),
        (["--resume", "x", "--eval-only", "y"], "--resume"),
    ],
)
def test_bad_flag_values_are_rejected_with_the_flag_named(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_unknown_yaml_field_is_named(tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text("learning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        main(["--config", str(yml)])
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no such file"):
        resolve({**__import__("teskd_fast.train.config", fromlist=["x"]).load_yaml(str(tmp_path / "nope.yaml"))})


def test_schedules_warmup_cosine_linear_and_extension():
    cfg = resolve({"epochs": 10, "schedule": "cosine", "warmup_epochs": 1.0, "lr": 0.4})
    s = LRSchedule(cfg, 10)
    assert s(0, 0) == pytest.approx(0.04) and s(0, 9) == pytest.approx(0.4)
    assert s(1, 0) == pytest.approx(0.4) and s(5, 5) == pytest.approx(0.2)
    assert s(9, 9) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    lin = LRSchedule(resolve({"epochs": 4, "schedule": "linear", "lr": 1.0, "warmup_epochs": 0}), 4)
    assert [lin(e, 0) for e in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    # A larger --epochs at resume: the multistep milestones follow the new total.
    assert LRSchedule(resolve({"preset": "cifar100-resnet18", "epochs": 300}), 1)(160, 0) == pytest.approx(0.01)


@pytest.mark.parametrize("preset", ["cifar100-resnet18", "imagenet-resnet18"])
def test_missing_dataset_says_where_it_looked_and_how_to_get_it(preset, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--preset", preset, "--data-dir", str(tmp_path / "nowhere"), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert str(tmp_path / "nowhere") in err
    assert ("download" in err) if preset.startswith("cifar") else ("image-net.org" in err and "train" in err)
    # Before any work: no run folder, no model built.
    assert not out.exists()


def test_yaml_syntax_error_is_a_configuration_error(tmp_path, capsys):
    yml = tmp_path / "broken.yaml"
    yml.write_text("lr: [0.1\nepochs: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(yml)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and str(yml) in err and "Traceback" not in err



@pytest.mark.parametrize("yaml_text, phrases", [
    # A YAML boolean is not a number (it trained at lr 1.0).
    ("lr: true\n", ["key 'lr'", "expected a number", "True (a boolean)"]),
    ("lr_milestones: []\n", ["key 'lr_milestones'", "one or more numbers", "empty list"]),
    ("lr-milestones: [0.5, yes]\n", ["key 'lr-milestones'", "expected a list of numbers"]),
    ("epochs: 2.5\n", ["key 'epochs'", "expected an integer"]),
    ("nesterov: 1\n", ["key 'nesterov'", "expected true or false"]),
    ("arch: 18\n", ["key 'arch'", "expected a string"]),
    # A bad value is named as the file's key, not as a flag.
    ("momentum: 2\n", ["key 'momentum'", "must be in [0, 1)"]),
    ("batch-size: 0\n", ["key 'batch-size'", "must be > 0"]),
    # A typo gets a suggestion.
    ("weight_decy: 0.1\n", ["unknown field 'weight_decy'", "did you mean weight_decay?"]),
    ("learning-rate: 0.1\n", ["unknown field 'learning-rate'", "did you mean lr?"]),
    ("off: 1\n", ["key False (a boolean) is not a field name"]),
    # PyYAML would take the last of two values silently.
    ("lr: 0.1\nepochs: 3\nlr: 0.2\n", ["not valid YAML", "key 'lr' is given twice", "line 3"]),
])
def test_yaml_values_are_type_checked_and_named_by_the_files_key(tmp_path, capsys, yaml_text, phrases):
    yml = tmp_path / "c.yaml"
    yml.write_text(yaml_text)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(yml)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line: not argparse's usage text above it
    line = err.strip()
    assert f"{yml}: " in line and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in line, (phrase, line)
    # Not named as a flag.
    assert "argument --" not in line and " --" + yaml_text.split(":")[0] + ":" not in line


def test_a_flag_given_beside_the_yaml_is_named_as_the_flag(tmp_path, capsys):
    yml = tmp_path / "c.yaml"
    yml.write_text("momentum: 0.5\nlr: 0.2\n")
    with pytest.raises(SystemExit):
        main(["--config", str(yml), "--momentum", "2"])
    assert "--momentum: must be in [0, 1)" in capsys.readouterr().err
    # Numbers YAML reads as text (1e-4, without a dot) are numbers.
    yml.write_text("weight_decay: 1e-4\nepochs: 3\n")
    from teskd_fast.train.config import load_yaml

    cfg = resolve(load_yaml(str(yml)))
    assert (cfg.weight_decay, cfg.epochs) == (1e-4, 3)


def test_check_config_validates_a_whole_configuration_without_training(tmp_path):
    from teskd_fast.train.config import check_config

    cfg = check_config({"lr": 0.2, "epochs": 3, "lr-milestones": [0.5]})
    assert isinstance(cfg, TrainConfig) and (cfg.lr, cfg.epochs, cfg.lr_milestones) == (0.2, 3, (0.5,))
    where = "arms.yaml: arm 'x'"
    for mapping, phrase in [({"lr": True}, f"{where}: key 'lr': expected a number"),
                            ({"lr_milestones": []}, f"{where}: key 'lr_milestones': expected a list of one or more"),
                            ({"init": str(tmp_path / "nonexistent.pt")}, f"{where}: key 'init': no such file"),
                            ({"init": str(tmp_path)}, f"{where}: key 'init': {tmp_path} is not a file"),
                            ({"temperature": 0}, f"{where}: key 'temperature'"),
                            ({"sched": "cosine"}, "did you mean schedule?")]:
        with pytest.raises(ConfigError) as e:
            check_config(mapping, source=where)
        assert phrase in str(e.value), (mapping, str(e.value))
    with pytest.raises(ConfigError, match="--init: no such file"):
        check_config({"init": str(tmp_path / "nonexistent.pt")})


def test_a_datasets_defaults_apply_to_that_dataset_only(tmp_path):
    from teskd_fast.train.config import DATASET_DEFAULTS, DATASET_FIELDS

    demo = resolve({})
    assert (demo.preset, demo.dataset, demo.image_size, demo.threads, demo.width, demo.lr) == (
        "digits-demo", "digits", 8, 1, 0.25, 0.05)
    # The default preset is the digits demo's recipe: another dataset gets none of it.
    cifar = resolve({"dataset": "cifar100"})
    default = TrainConfig()
    assert cifar.preset == "none"
    assert (cifar.image_size, cifar.threads, cifar.width, cifar.lr, cifar.epochs) == (
        32, 0, 1.0, default.lr, default.epochs)
    # A preset asked for by name keeps its recipe on another dataset, not its dataset's values.
    asked = resolve({"preset": "digits-demo", "dataset": "cifar100"})
    assert (asked.width, asked.lr, asked.epochs) == (0.25, 0.05, 20)
    assert (asked.image_size, asked.threads) == (32, 0)
    assert set(DATASET_DEFAULTS["digits"]) <= DATASET_FIELDS
    # On its own dataset a preset applies whole; imagenet is the folder dataset's other name.
    assert resolve({"preset": "imagenet-resnet18", "dataset": "folder"}).image_size == 224


def test_a_folder_of_small_images_gets_its_size_from_the_images(tmp_path):
    root = small_jpeg_folder(tmp_path / "f")
    for name in ("folder", "imagenet"):
        cfg = resolve({"dataset": name, "data_dir": str(root)})
        assert 40 <= cfg.image_size <= 64 and cfg.image_size % 8 == 0, cfg.image_size
        assert cfg.val_image_size == cfg.image_size and cfg.val_resize >= cfg.val_image_size
        assert (cfg.stem, cfg.width, cfg.threads, cfg.preset) == ("cifar", 1.0, 0, "none")
        assert any("image size" in note and "median" in note for note in cfg.notes)
    # Given sizes and stem are kept.
    cfg = resolve({"dataset": "folder", "data_dir": str(root), "image_size": 32, "stem": "imagenet"})
    assert (cfg.image_size, cfg.val_image_size, cfg.stem) == (32, 32, "imagenet")
    # A missing folder: its sizes stay 0 in the configuration, and the run says so (exit status 1, no run folder).
    nowhere = resolve({"dataset": "folder", "data_dir": str(tmp_path / "nowhere")})
    assert (nowhere.image_size, nowhere.notes) == (0, [])
    out = tmp_path / "run"
    assert main(["--dataset", "folder", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert not out.exists()


@pytest.mark.parametrize("preset", ["cifar100-resnet18", "imagenet-resnet18", "none"])
def test_the_published_recipes_loss_is_the_specifications_defaults(preset):
    """The paper's loss (T 4, alpha 0.2, beta 0.8, gamma 1e-7, no label smoothing) is written once, as the
    defaults of kernels/options.py's SPEC, and the published presets resolve to it."""
    from teskd_fast.kernels.options import SPEC

    cfg = resolve({"preset": preset})
    paper = dict(temperature=4.0, ce_weight=0.2, kd_weight=0.8, feat_weight=1e-7, label_smoothing=0.0)
    assert {name: getattr(cfg, name) for name in paper} == paper
    assert {o.name: o.default for o in SPEC if o.name in paper} == paper
    assert not set(paper) & set(PRESETS[preset]), "a preset spells the loss's defaults again"


def test_a_warm_up_shorter_than_a_step_never_overshoots_the_peak_lr():
    from teskd_fast.train.schedule import LRSchedule

    cfg = resolve({"lr": 0.1, "epochs": 4, "warmup_epochs": 0.1, "schedule": "cosine"})
    sched = LRSchedule(cfg, steps_per_epoch=5)  # the warm-up is half a step
    lrs = [sched(e, s) for e in range(4) for s in range(5)]
    assert max(lrs) <= 0.1 and lrs[0] == 0.1
