"""timm classifiers as TESKD teachers: students on the model's own features, its own head, exported unchanged."""

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from test_models import check_pair, flat_outputs
from tolerances import assert_close

import teskd_fast

timm = pytest.importorskip("timm", reason="timm is optional: pip install timm")

# One small model per family (name, timm keyword arguments): no weights are downloaded, all are built at random.
SWIN = dict(img_size=64, window_size=2, drop_path_rate=0.0, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
FAMILIES = {
    "convnext": ("test_convnext", {}),
    "efficientnet": ("test_efficientnet", {}),
    "regnet": ("regnetx_002", {}),
    "resnet-d": ("resnet10t", {}),
    "swin": ("swin_tiny_patch4_window7_224", SWIN),
    "edgenext": ("edgenext_xx_small", {}),
}
# The slowest float64 checks (deep float64 networks): the slow tier (docs/testing.md).
SLOW_FLOAT64 = {"edgenext", "efficientnet", "regnet", "resnet-d"}


def plain(family, num_classes=5):
    name, kwargs = FAMILIES[family]
    return timm.create_model(name, num_classes=num_classes, pretrained=False, **kwargs)


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FLOAT64 else f
                                    for f in sorted(FAMILIES)])
def test_fast_equals_faithful_float64_on_timm_backbones(family):
    """Outputs, every parameter gradient and every BatchNorm statistic of both formulations, in float64."""
    backbone = plain(family)
    faithful = teskd_fast.wrap(copy.deepcopy(backbone), 5, formulation="faithful").double()
    fast = teskd_fast.wrap(copy.deepcopy(backbone), 5, formulation="fast").double()
    fast.load_state_dict(faithful.state_dict())
    assert faithful.kind == fast.kind == "timm"
    # The backbone runs channels-last in the fast network: other summation orders, float64 rounding (1e-8 relative
    # here, through a deep network and its LayerNorms) where a formulation error would be of order one.
    # 64 px: stage 4 at 2x2, so that its train-mode BatchNorm is not over two values (ill-conditioned).
    check_pair(faithful, fast, torch.randn(3, 3, 64, 64, dtype=torch.float64), torch.float64, scale=100.0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_students_sit_on_the_models_own_levels_and_head(family):
    backbone = plain(family)
    model = teskd_fast.wrap(backbone, 5)
    info = backbone.feature_info[-4:]
    assert model.channels == [i["num_chs"] for i in info] and model.strides == [i["reduction"] for i in info]
    # The student width is the head's pre-logits width (the teacher feature's), not the last stage's channels.
    assert model.width == backbone.head_hidden_size
    assert model.backbone is backbone and not hasattr(model, "fc")
    x = torch.randn(3, 3, 64, 64)
    out = model(x)
    assert out.logits.shape == (3, 5) and out.student_logits.shape == (3, 3, 5)
    assert out.feature.shape == (3, model.width) and out.student_features.shape == (3, 3, model.width)
    # The teacher's logits and feature are the model's own head's (train mode: BatchNorm on the batch).
    final = backbone.forward_features(x.contiguous(memory_format=torch.channels_last))
    assert_close(out.feature, backbone.forward_head(final, pre_logits=True), torch.float32, "teacher feature")
    assert_close(out.logits, backbone.forward_head(final), torch.float32, "teacher logits")


@pytest.mark.parametrize("family", ["convnext", "efficientnet", "swin"])
def test_gradients_reach_the_backbone_from_every_student(family):
    model = teskd_fast.wrap(plain(family), 5)
    x = torch.randn(2, 3, 64, 64)
    classifier = model.backbone.get_classifier()
    for k in range(3):
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out.student_logits[k].square().sum() + out.student_features[k].square().sum()).backward()
        reached = [n for n, p in model.backbone.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert reached, f"student {k}: no gradient in the backbone"
        assert classifier.weight.grad is None, f"student {k} reached the teacher's classifier"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_is_the_timm_model_itself(family):
    """The exported teacher loads strictly into timm.create_model(NAME, num_classes=N); same eval logits (float64)."""
    model = teskd_fast.wrap(plain(family), 5).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model(x)  # a train-mode step moves the BatchNorm statistics away from their initial values
    model.eval()
    teacher = teskd_fast.export_teacher(model)
    fresh = plain(family).double().eval()
    assert type(teacher) is type(fresh) and not teacher.training
    assert all(type(m) is type(n) for m, n in zip(teacher.modules(), fresh.modules(), strict=True))
    fresh.load_state_dict(teacher.state_dict(), strict=True)
    with torch.no_grad():
        expected = model(x).logits
        assert_close(model.teacher_forward(x), expected, torch.float64, "teacher_forward")
        assert_close(teacher(x), expected, torch.float64, "exported teacher")
        assert_close(fresh(x), expected, torch.float64, "fresh timm model")


def test_a_classifier_of_another_class_count_is_replaced():
    backbone = plain("convnext", num_classes=1000)
    model = teskd_fast.wrap(backbone, 7)
    assert model.backbone.num_classes == 7 and model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 7)


def test_head_dropout_is_the_models_own():
    """With timm's head dropout (drop_rate > 0) the logits are the model's forward_head, dropout included."""
    backbone = timm.create_model("test_convnext", num_classes=5, drop_rate=0.5)
    model = teskd_fast.wrap(backbone, 5, formulation="faithful")
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    final, _ = backbone.forward_intermediates(x, indices=4)
    feature = backbone.forward_head(final, pre_logits=True)
    assert_close(out.logits, backbone.forward_head(final), torch.float32, "logits with dropout")
    assert_close(out.feature, feature, torch.float32, "pre-logits")


def test_unsupported_backbones_are_refused_naming_the_model():
    with pytest.raises(ValueError, match=r"vit_tiny_patch16_224: .*strides \[16, 16, 16, 16\].*Plain ViTs"):
        teskd_fast.wrap(timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=5), 5)
    few = plain("convnext")
    few.feature_info = few.feature_info[-3:]
    with pytest.raises(ValueError, match=r"test_convnext gives 3 feature level\(s\).*needs 4"):
        teskd_fast.wrap(few, 5)
    for tv, timm_name in ((torchvision.models.mobilenet_v3_small, "mobilenetv3_large_100"),
                          (torchvision.models.convnext_tiny, "convnext_tiny"),
                          (torchvision.models.efficientnet_b0, "efficientnet_b0")):
        with pytest.raises(ValueError, match=rf"torchvision {tv(num_classes=3).__class__.__name__}.*{timm_name}"):
            teskd_fast.wrap(tv(num_classes=3), 3)
    with pytest.raises(TypeError, match="forward_intermediates"):
        teskd_fast.wrap(nn.Conv2d(3, 3, 1), 3)


def test_features_only_models_keep_their_route():
    backbone = timm.create_model("test_convnext", features_only=True)
    model = teskd_fast.wrap(backbone, 4)
    assert model.kind == "features" and isinstance(model.fc, nn.Linear)
    assert [t.shape[0] for t in flat_outputs(model(torch.randn(2, 3, 32, 32)))] == [2] * 8
