"""teskd_fast.cost: the backbone's and each student's multiply-accumulates and parameters; the cost warning; the cost
line of teskd-train and its --dry-run."""

import json
import re
import warnings

import pytest
import torch

import teskd_fast
from teskd_fast.models.cost import COST_LIMIT, StudentCostWarning, cost_warning, count_macs, width_within


@pytest.mark.parametrize("formulation,students_32,students_224", [("faithful", 1.48, 4.55), ("fast", 1.22, 3.74)])
def test_the_published_resnet18_costs_what_docs_method_says(formulation, students_32, students_224):
    """docs/method.md: backbone 0.555 GMAC (32 px) and 1.81 (224 px); with students 2.04 and 6.36 (faithful)."""
    # On the meta device: shapes only, no memory, no arithmetic.
    with torch.device("meta"):
        cifar = teskd_fast.create_model("resnet18", 100, formulation=formulation)
        imagenet = teskd_fast.create_model("resnet18", 1000, stem="imagenet", formulation=formulation)
    c = teskd_fast.cost(cifar, 32)
    assert round(c.backbone_macs / 1e9, 3) == 0.555 and round(c.student_macs / 1e9, 2) == students_32
    assert round(c.backbone_params / 1e6, 2) == 11.22
    assert round((c.backbone_params + c.student_params) / 1e6, 2) == 37.05
    assert [s.level for s in c.students] == [3, 2, 1]
    c224 = teskd_fast.cost(imagenet, (224, 224))
    assert round(c224.backbone_macs / 1e9, 2) == 1.81 and round(c224.student_macs / 1e9, 2) == students_224
    assert round((c224.backbone_params + c224.student_params) / 1e6, 2) == 38.91
    if formulation == "faithful":
        assert round((c.backbone_macs + c.student_macs) / 1e9, 2) == 2.04
        assert round((c224.backbone_macs + c224.student_macs) / 1e9, 2) == 6.36
    assert re.fullmatch(rf"students: {students_32:.3g} GMAC per image = {c.ratio:.1f}x the backbone's 0.555 at "
                        r"32x32 px; width 512, levels 3,2,1", c.line()), c.line()


def test_the_parts_add_up_to_the_whole_network():
    """Real weights: backbone plus students is the forward's count and the network's parameters; the backbone's
    parameters are the exported teacher's; the model's training mode is kept."""
    model = teskd_fast.create_model("resnet18", 10, width=0.25, student_width=48, student_levels=(3, 1)).train()
    c = teskd_fast.cost(teskd_fast.compile_model(model), 16)
    assert model.training and [s.level for s in c.students] == [3, 1] and c.student_width == 48
    with torch.no_grad():
        whole = count_macs(model.eval(), torch.zeros(1, 3, 16, 16))
    assert c.backbone_macs + c.student_macs == whole
    assert c.backbone_params == sum(p.numel() for p in teskd_fast.export_teacher(model).parameters())
    assert c.backbone_params + c.student_params == sum(p.numel() for p in model.parameters())
    # The students' share: the finest costs the most; a narrower width costs less.
    assert c.students[1].macs > c.students[0].macs > 0
    narrower = teskd_fast.cost(teskd_fast.create_model("resnet18", 10, width=0.25, student_width=16,
                                                       student_levels=(3, 1)), 16)
    assert narrower.backbone_macs == c.backbone_macs and narrower.student_macs < c.student_macs


def test_a_narrower_width_is_named_where_the_students_cost_too_much():
    """ResNet-50's students (W = 2048) cost 15x its backbone: the warning names the ratio and a width within the
    limit, and that width is within it; the published ResNet-18 is not warned about."""
    with torch.device("meta"):
        r50 = teskd_fast.create_model("resnet50", 100, stem="imagenet")
        r18 = teskd_fast.create_model("resnet18", 100, stem="imagenet")
    width, ratio = width_within(r50, 224)
    assert width % 8 == 0 and ratio <= COST_LIMIT
    with torch.device("meta"):
        at = teskd_fast.cost(teskd_fast.create_model("resnet50", 100, stem="imagenet", student_width=width), 224)
        above = teskd_fast.cost(teskd_fast.create_model("resnet50", 100, stem="imagenet", student_width=width + 8),
                                224)
    assert at.ratio == pytest.approx(ratio) and above.ratio > COST_LIMIT
    message = cost_warning(r50, 224)
    assert re.search(rf"the students cost 15x the backbone's .* at 224x224 px \(more than 4x; width 2048, levels "
                     rf"3,2,1\): student_width {width} \(--student-width {width}\) brings them to 4.0x", message)
    assert cost_warning(r18, 224) is None


@pytest.mark.slow
def test_wrap_warns_once_for_a_light_timm_backbone():
    timm = pytest.importorskip("timm", reason="timm is optional: pip install timm")
    with torch.device("meta"):
        backbone = timm.create_model("mobilenetv3_small_100", num_classes=10)
        with pytest.warns(StudentCostWarning, match=r"mobilenetv3_small_100: the students cost 257x .* 224x224 px.*"
                                                    r"student_width (\d+)") as record:
            teskd_fast.wrap(backbone, 10)
        width = int(re.search(r"student_width (\d+)", str(record[0].message)).group(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error", StudentCostWarning)
            model = teskd_fast.wrap(timm.create_model("mobilenetv3_small_100", num_classes=10), 10,
                                    student_width=width)
    assert teskd_fast.cost(model, 224).ratio <= COST_LIMIT


def test_teskd_train_prints_the_cost_line_and_dry_run_trains_nothing(tmp_path, capsys):
    from teskd_fast.train.cli import main

    out = tmp_path / "run"
    flags = ["--student-width", "16", "--student-levels", "3,2", "--out", str(out), "--no-progress", "--no-plot",
             "--no-tensorboard"]
    assert main([*flags, "--dry-run"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"teskd-train: students: [\d.]+ MMAC per image = [\d.]+x the backbone's [\d.]+ at 8x8 px; "
                        r"width 16, levels 3,2", line), line
    assert not out.exists()
    assert main([*flags, "--epochs", "1", "--steps-per-epoch", "2"]) == 0
    assert line in capsys.readouterr().out
    cost = json.loads((out / "cost.json").read_text())
    assert "teskd-train: " + cost["line"] == line and cost["student_levels"] == [3, 2]
    # The heads are named by their levels (student3, student2), not by their count.
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_top1_student3" in row and "val_top1_student2" in row and "val_top1_student1" not in row


@pytest.mark.parametrize("flag,value", [("--student-levels", "4"), ("--student-levels", "3,3"),
                                        ("--student-levels", "[3, 2]"), ("--student-width", "-1")])
def test_bad_student_flags_are_refused_by_name(flag, value, capsys):
    from teskd_fast.train.cli import main

    with pytest.raises(SystemExit) as info:
        main([flag, value, "--dry-run"])
    assert info.value.code == 2
    assert flag in capsys.readouterr().err
