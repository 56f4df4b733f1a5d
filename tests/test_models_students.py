"""Student width and student levels: both formulations exact against each other, the published network by default."""

import copy

import pytest
import torch
import torch.nn as nn
from test_models import check_pair, official_keys
from tolerances import assert_close

import teskd_fast

# arch, stem, input size, width factor (W = 512 x expansion x factor), student width, student levels.
CASES = [
    ("resnet18", "cifar", (32, 32), 0.25, 32, (3, 2, 1)),
    ("resnet18", "cifar", (32, 32), 0.25, 48, (3, 2)),
    ("resnet18", "cifar", (36, 36), 0.25, 16, (2,)),
    ("resnet18", "imagenet", (200, 200), 0.125, 24, (3, 1)),
    ("resnet50", "cifar", (32, 32), 0.0625, 40, (1,)),
    ("resnet18", "cifar", (32, 32), 0.125, 96, (3,)),
]


@pytest.mark.parametrize("arch,stem,size,width,student_width,levels", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fast_equals_faithful_at_student_widths_and_levels(arch, stem, size, width, student_width, levels):
    """Outputs, every parameter gradient and every BatchNorm buffer of both formulations, float64."""
    kw = dict(stem=stem, width=width, student_width=student_width, student_levels=levels)
    faithful = teskd_fast.create_model(arch, 7, formulation="faithful", **kw).double()
    fast = teskd_fast.create_model(arch, 7, formulation="fast", **kw).double()
    fast.load_state_dict(faithful.state_dict())
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    check_pair(faithful, fast, x, torch.float64)
    out = fast(x)
    w = faithful.width
    assert out.student_logits.shape == (len(levels), 2, 7) and out.student_features.shape == (len(levels), 2, w)
    assert len(faithful(x).student_logits) == len(levels)


timm = pytest.importorskip("timm", reason="timm is optional: pip install timm")

# Three timm families (tiny configurations: random weights, nothing downloaded), each at another width and level set.
TIMM_CASES = [
    ("test_convnext", 24, (3, 2, 1)),
    ("test_efficientnet", 40, (3, 1)),
    ("regnetx_002", 16, (2,)),
]


@pytest.mark.parametrize("name,student_width,levels", TIMM_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fast_equals_faithful_at_student_widths_and_levels_on_timm(name, student_width, levels):
    backbone = timm.create_model(name, num_classes=5, pretrained=False)
    kw = dict(student_width=student_width, student_levels=levels, check_cost=False)
    faithful = teskd_fast.wrap(copy.deepcopy(backbone), 5, formulation="faithful", **kw).double()
    fast = teskd_fast.wrap(copy.deepcopy(backbone), 5, formulation="fast", **kw).double()
    fast.load_state_dict(faithful.state_dict())
    assert fast.student_width == student_width and fast.width == backbone.head_hidden_size
    # As tests/test_models_timm.py: channels-last backbone, float64 rounding through a deep network.
    check_pair(faithful, fast, torch.randn(3, 3, 64, 64, dtype=torch.float64), torch.float64, scale=100.0)


def test_the_default_is_the_published_network():
    """student_width=W and the default give the same names, shapes and initial weights (same seed)."""
    torch.manual_seed(3)
    default = teskd_fast.create_model("resnet18", 10, width=0.125)
    torch.manual_seed(3)
    explicit = teskd_fast.create_model("resnet18", 10, width=0.125, student_width=64, student_levels=[1, 2, 3])
    assert default.student_width == default.width == 64 and default.student_levels == (3, 2, 1)
    a, b = default.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.device("meta"):
        published = teskd_fast.create_model("resnet18", 10, student_width=512)
    assert {k: tuple(v.shape) for k, v in published.state_dict().items()} == official_keys("resnet18", 10, "cifar")


def test_names_and_shapes_at_another_width_and_fewer_levels():
    with torch.device("meta"):
        model = teskd_fast.create_model("resnet18", 10, student_width=128, student_levels=(3, 2))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    published = official_keys("resnet18", 10, "cifar")
    # The finest level's modules do not exist; every other module keeps its published name.
    absent = ("laterals.0.", "upsample.0.", "fuse_1.", "downsample1.", "fc_b1.")
    assert set(got) == {k for k in published if not k.startswith(absent)}
    assert model.laterals[0] is None and model.upsample[0] is None and not hasattr(model, "fuse_1")
    assert got["laterals.1.0.weight"] == (128, 128, 1, 1) and got["fuse_2.0.weight"] == (128, 256, 1, 1)
    assert got["downsample3.0.weight"] == (128, 128, 2, 2)
    # Each head's last 1x1 conv maps the students' width back to W = 512, the teacher feature's.
    assert got["downsample2.3.weight"] == (512, 128, 1, 1) and got["fc_b2.weight"] == (10, 512)


def test_bad_widths_levels_and_class_counts_are_named():
    for levels in ((), (4,), (3, 3), (0, 1), ("3",), 3, (True,)):
        with pytest.raises(ValueError, match="student_levels must be a non-empty subset of"):
            teskd_fast.create_model("resnet18", 10, width=0.125, student_levels=levels)
    for width in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="student_width must be a positive int"):
            teskd_fast.create_model("resnet18", 10, width=0.125, student_width=width)
    for n in (1, 0, 2.0):
        with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
            teskd_fast.create_model("resnet18", n, width=0.125)
    backbone = timm.create_model("test_convnext", num_classes=4)
    classifier = backbone.get_classifier()
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        teskd_fast.wrap(backbone, 1)
    # Refused before the user's model is touched (its classifier is not reset).
    assert backbone.get_classifier() is classifier and backbone.num_classes == 4
    import torchvision

    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        teskd_fast.wrap(torchvision.models.resnet18(num_classes=1), 1)


@pytest.mark.parametrize("name,formulation", [("dla46_c", "fast"), ("dpn48b", "faithful")])
def test_conv_classifier_heads_give_the_models_own_logits(name, formulation):
    """DLA and DPN classify with a 1x1 conv: the teacher's logits are the timm model's own output (float64)."""
    backbone = timm.create_model(name, num_classes=4)
    assert isinstance(backbone.get_classifier(), nn.Conv2d)
    # Narrow students: the head is what is tested.
    model = teskd_fast.wrap(backbone, 4, formulation=formulation, student_width=8, check_cost=False).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(x)  # train mode: the first step runs
    loss = teskd_fast.teskd_loss(out.logits, out.student_logits, torch.tensor([0, 3]), out.feature,
                                 out.student_features)
    loss.backward()
    model.eval()
    with torch.no_grad():
        expected = model.backbone(x)
        assert_close(model(x).logits, expected, torch.float64, "logits")
        assert_close(model.teacher_forward(x), expected, torch.float64, "teacher_forward")


def test_a_classifier_that_is_not_linear_is_refused_by_name():
    backbone = timm.create_model("dla46_c", num_classes=4)
    backbone.fc = nn.Conv2d(backbone.num_features, 4, 3, padding=1)
    with pytest.raises(ValueError, match=r"dla46_c: its classifier \(Conv2d.*\) is not a linear map"):
        teskd_fast.wrap(backbone, 4)
