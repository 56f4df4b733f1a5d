"""TESKD networks: the fast formulation against the faithful one, parameter names and counts, loading, export, wrap."""

import pytest
import torch
import torch.nn as nn
import torchvision
from tolerances import assert_close, assert_rms_close

import teskd_fast
from teskd_fast.models import ARCHS, patch_conv
from teskd_fast.models.fast import resize_bn_relu
from teskd_fast.models.teskd import ResizeTo, fit

STUDENT_PARTS = {"laterals": 4, "upsample": 3}


def official_keys(arch, num_classes, stem):
    """The reference's state_dict keys and shapes, assembled from docs/method.md: torchvision backbone + students."""
    with torch.device("meta"):
        net = getattr(torchvision.models, arch)(num_classes=num_classes)
        if stem == "cifar":
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expansion = 4 if arch not in ("resnet18", "resnet34") else 1
    w = 512 * expansion
    chans = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]

    def bn(prefix):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (w,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    for i, c in enumerate(chans):
        shapes[f"laterals.{i}.0.weight"] = (w, c, 1, 1)
        bn(f"laterals.{i}.1")
    for j in range(3):
        shapes[f"upsample.{j}.1.weight"] = (w, w, 1, 1)
        bn(f"upsample.{j}.2")
    for level, k in ((1, 8), (2, 4), (3, 2)):
        shapes[f"fuse_{level}.0.weight"] = (w, 2 * w, 1, 1)
        bn(f"fuse_{level}.1")
        shapes[f"downsample{level}.0.weight"] = (w, w, k, k)
        shapes[f"downsample{level}.0.bias"] = (w,)
        bn(f"downsample{level}.1")
        shapes[f"downsample{level}.3.weight"] = (w, w, 1, 1)
        shapes[f"downsample{level}.3.bias"] = (w,)
        bn(f"downsample{level}.4")
        shapes[f"fc_b{level}.weight"] = (num_classes, w)
        shapes[f"fc_b{level}.bias"] = (num_classes,)
    return shapes


def pair(arch, num_classes, stem, width, dtype=torch.float64):
    faithful = teskd_fast.create_model(arch, num_classes, stem=stem, formulation="faithful", width=width).to(dtype)
    fast = teskd_fast.create_model(arch, num_classes, stem=stem, formulation="fast", width=width).to(dtype)
    fast.load_state_dict(faithful.state_dict())
    return faithful, fast


def flat_outputs(out):
    """Teacher logits, the 3 student logits, teacher feature, the 3 student features, as a list of tensors."""
    return [out.logits, *out.student_logits, out.feature, *out.student_features]


def output_names(model):
    """The names of :func:`flat_outputs`, for the network's students (``student_levels``, deepest first)."""
    levels = getattr(model, "student_levels", (3, 2, 1))
    return ["logits", *(f"student{k}" for k in levels), "feature", *(f"feature{k}" for k in levels)]


def check_pair(faithful, fast, x, dtype, scale=1.0):
    """Outputs and parameter gradients in train mode, running statistics after the step, outputs in eval mode."""
    names = output_names(faithful)
    for model in (faithful, fast):
        model.train()
        model.zero_grad(set_to_none=True)
    outs_a, outs_b = flat_outputs(faithful(x)), flat_outputs(fast(x))
    upstream = [torch.randn_like(o) for o in outs_a]
    sum((o * g).sum() for o, g in zip(outs_a, upstream, strict=True)).backward()
    sum((o * g).sum() for o, g in zip(outs_b, upstream, strict=True)).backward()
    for name, a, b in zip(names, outs_b, outs_a, strict=True):
        assert_close(a, b, dtype, f"train {name}", scale)
    params_b = dict(fast.named_parameters())
    for name, p in faithful.named_parameters():
        assert p.grad is not None, f"{name}: no gradient in the faithful network"
        assert_close(params_b[name].grad, p.grad, dtype, f"grad {name}", scale)
    buffers_b = dict(fast.named_buffers())
    for name, buf in faithful.named_buffers():
        if buf.dtype == torch.long:
            assert torch.equal(buffers_b[name], buf), f"{name}: {buffers_b[name]} != {buf}"
        else:
            assert_close(buffers_b[name], buf, dtype, f"buffer {name}", scale)
    faithful.eval()
    fast.eval()
    with torch.no_grad():
        for name, a, b in zip(names, flat_outputs(fast(x)), flat_outputs(faithful(x)), strict=True):
            assert_close(a, b, dtype, f"eval {name}", scale)


# arch, stem, input size, width: resnet18 (BasicBlock) and resnet50 (Bottleneck), both stems, the published sizes
# and odd sizes where stages do not halve exactly (36 -> 36, 18, 9, 5; 200 -> 50, 25, 13, 7).
CASES = [
    ("resnet18", "cifar", (32, 32), 0.25),
    ("resnet18", "cifar", (40, 56), 0.25),
    ("resnet18", "cifar", (36, 36), 0.25),
    ("resnet18", "imagenet", (224, 224), 0.125),
    ("resnet18", "imagenet", (200, 200), 0.125),
    ("resnet50", "cifar", (32, 32), 0.125),
    pytest.param("resnet50", "cifar", (40, 56), 0.125, marks=pytest.mark.slow),
    pytest.param("resnet50", "imagenet", (224, 224), 0.0625, marks=pytest.mark.slow),
    ("resnet50", "imagenet", (200, 200), 0.0625),
]


@pytest.mark.parametrize("arch,stem,size,width", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_fast_equals_faithful_float64(arch, stem, size, width):
    faithful, fast = pair(arch, 7, stem, width)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    check_pair(faithful, fast, x, torch.float64)


def test_fast_float32_against_float64_oracle():
    oracle, fast = pair("resnet18", 5, "cifar", 0.25, torch.float64)
    fast = fast.float()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    names = output_names(oracle)
    oracle.train(), fast.train()
    outs_a, outs_b = flat_outputs(oracle(x)), flat_outputs(fast(x.float()))
    upstream = [torch.randn_like(o) for o in outs_a]
    sum((o * g).sum() for o, g in zip(outs_a, upstream, strict=True)).backward()
    sum((o * g.float()).sum() for o, g in zip(outs_b, upstream, strict=True)).backward()
    for name, a, b in zip(names, outs_b, outs_a, strict=True):
        # Sums of 64-1024 products, rounded in float32.
        assert_close(a, b, torch.float32, f"train {name}", scale=10.0)
    # Gradients as one vector: BatchNorm backward over 4 images amplifies float32 rounding, and a ReLU input
    # within an ulp of 0 flips its mask; the faithful network's own float32 gradients are ~5e-3 (relative RMS)
    # from float64 at this size, so the bound only catches a real difference (which gives errors of order 1).
    grads_a = torch.cat([p.grad.flatten() for p in oracle.parameters()])
    grads_b = torch.cat([p.grad.flatten() for p in fast.parameters()])
    assert_rms_close(grads_b, grads_a, torch.float32, "gradients", scale=3000.0)
    for (name, a), b in zip(oracle.named_buffers(), fast.buffers(), strict=True):
        assert_close(b, a, torch.float32, f"buffer {name}", scale=10.0)
    oracle.eval(), fast.eval()
    with torch.no_grad():
        for name, a, b in zip(names, flat_outputs(fast(x.float())), flat_outputs(oracle(x)), strict=True):
            assert_close(a, b, torch.float32, f"eval {name}", scale=10.0)


def test_fast_student_outputs_are_stacked():
    _, fast = pair("resnet18", 5, "cifar", 0.125, torch.float32)
    out = fast(torch.randn(2, 3, 32, 32))
    assert out.student_logits.shape == (3, 2, 5)
    assert out.student_features.shape == (3, 2, 64)
    assert out.feature.shape == (2, 64)


@pytest.mark.parametrize("stem,size,stages", [("cifar", 32, (32, 16, 8, 4)), ("imagenet", 224, (56, 28, 14, 7))])
def test_reference_shapes(stem, size, stages):
    model = teskd_fast.create_model("resnet18", 10, stem=stem, formulation="faithful", width=0.125).eval()
    with torch.no_grad():
        s = model.stages(torch.randn(1, 3, size, size))
        out = model(torch.randn(1, 3, size, size))
    assert [t.shape[-1] for t in s] == list(stages)
    assert out.logits.shape == (1, 10) and len(out.student_logits) == 3
    assert all(z.shape == (1, 10) for z in out.student_logits)
    assert out.feature.shape == (1, 64) and all(f.shape == (1, 64) for f in out.student_features)


def test_resize_equals_reference_upsample_on_halving_sizes():
    # On stages that halve exactly, the resize to the lateral's size is the reference's x2 nn.Upsample.
    x = torch.randn(2, 5, 7, 4, dtype=torch.float64)
    ref = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)(x)
    assert_close(ResizeTo()(x, (14, 8)), ref, torch.float64, "resize")


def test_fit_pads_evenly_and_crops():
    x = torch.arange(1.0, 1.0 + 2 * 3 * 5).view(1, 2, 3, 5)
    padded = fit(x, (6, 8))
    assert padded.shape == (1, 2, 6, 8)
    # 3 extra rows: 1 on top, 2 at the bottom; 3 extra columns: 1 left, 2 right.
    assert torch.equal(padded[:, :, 1:4, 1:6], x)
    assert padded.sum() == x.sum()
    assert torch.equal(fit(x, (1, 3)), x[:, :, 1:2, 1:4])
    assert fit(x, (3, 5)) is x


def test_wrap_replaces_a_head_of_another_size():
    model = teskd_fast.wrap(torchvision.models.resnet18(num_classes=1000), 7, formulation="faithful")
    assert model.fc.out_features == 7 and model.fc_b1.out_features == 7
    assert model.eval()(torch.randn(1, 3, 32, 32)).logits.shape == (1, 7)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("low,high", [((4, 4), (8, 8)), ((7, 13), (13, 25)), ((1, 1), (2, 2))])
def test_resize_bn_relu_equals_modules(momentum, low, high):
    bn_ref = nn.BatchNorm2d(6, momentum=momentum).double()
    nn.init.uniform_(bn_ref.weight, 0.5, 1.5)
    nn.init.uniform_(bn_ref.bias, -0.5, 0.5)
    bn = nn.BatchNorm2d(6, momentum=momentum).double()
    bn.load_state_dict(bn_ref.state_dict())
    for step in range(2):
        y = (torch.randn(3, 6, *low, dtype=torch.float64) * 2 + 1).requires_grad_()
        g = torch.randn(3, 6, *high, dtype=torch.float64)
        ref = torch.relu(bn_ref(ResizeTo()(y, high)))
        out = resize_bn_relu(y, bn, high)
        assert_close(out, ref, torch.float64, f"train output, step {step}")
        assert_close(
            torch.autograd.grad((out * g).sum(), y)[0],
            torch.autograd.grad((ref * g).sum(), y)[0],
            torch.float64,
            "grad",
        )
        for name, buf in bn_ref.named_buffers():
            assert_close(dict(bn.named_buffers())[name].double(), buf.double(), torch.float64, name)
    bn.eval(), bn_ref.eval()
    assert_close(resize_bn_relu(y, bn, high), torch.relu(bn_ref(ResizeTo()(y, high))), torch.float64, "eval")


@pytest.mark.parametrize("k,size", [(2, (4, 6)), (8, (16, 8)), (3, (9, 3))])
def test_patch_conv_equals_strided_conv(k, size):
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    w = torch.randn(4, 5, k, k, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    assert_close(patch_conv(x, w, b), nn.functional.conv2d(x, w, b, stride=k), torch.float64, "patch_conv")


def test_parameter_counts_match_spec():
    cifar = teskd_fast.create_model("resnet18", 100, stem="cifar", formulation="faithful")
    with torch.device("meta"):
        imagenet = teskd_fast.create_model("resnet18", 1000, stem="imagenet")
    teacher = teskd_fast.export_teacher(cifar)
    assert round(sum(p.numel() for p in cifar.parameters()) / 1e6, 2) == 37.05
    assert round(sum(p.numel() for p in imagenet.parameters()) / 1e6, 2) == 38.91
    assert round(sum(p.numel() for p in teacher.parameters()) / 1e6, 1) == 11.2


@pytest.mark.parametrize("arch,stem", [("resnet18", "cifar"), ("resnet50", "imagenet")])
def test_state_dict_names_are_the_reference_ones(arch, stem):
    expected = official_keys(arch, 10, stem)
    for formulation in ("faithful", "fast"):
        # Built on the meta device: names and shapes without the cost of initialising 25M parameters.
        with torch.device("meta"):
            model = teskd_fast.create_model(arch, 10, stem=stem, formulation=formulation)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert sorted(got) == sorted(expected), f"{formulation}: {sorted(set(got) ^ set(expected))}"
        assert got == expected


def test_state_dict_crosses_formulations_and_official_load():
    faithful, _ = pair("resnet18", 10, "cifar", 0.125, torch.float32)
    fast = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation="fast", width=0.125)
    # Reference checkpoints come from DataParallel: "module." prefixes.
    checkpoint = {f"module.{k}": v.clone() for k, v in faithful.state_dict().items()}
    fast.load_official_state_dict(checkpoint)
    for k, v in fast.state_dict().items():
        assert torch.equal(v, faithful.state_dict()[k]), k
    back = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation="faithful", width=0.125)
    back.load_state_dict(fast.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    faithful.eval(), back.eval()
    with torch.no_grad():
        assert torch.equal(back(x).logits, faithful(x).logits)


def test_official_load_rejects_wrong_keys_and_shapes():
    model = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation="fast", width=0.125)
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    bad = dict(sd)
    bad["fuse_4.0.weight"] = bad.pop("fuse_3.0.weight")
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \['fuse_3.0.weight'\]; 1 unexpected key\(s\) "
                                         r"\['fuse_4.0.weight'\]"):
        model.load_official_state_dict(bad)
    # Many missing keys: the first five, sorted, and the count; not the whole list.
    bad = {k: v for k, v in sd.items() if not k.startswith("layer4.")}
    n = len(sd) - len(bad)
    with pytest.raises(ValueError, match=rf"{n} missing key\(s\) \['layer4.0.bn1.bias', .*\({n} in all\)\]$") as info:
        model.load_official_state_dict(bad)
    assert str(info.value).count("layer4.") == 5
    bad = dict(sd)
    bad["fc_b1.weight"] = torch.zeros(11, 64)
    with pytest.raises(ValueError, match=r"1 entry\(ies\): fc_b1.weight: \(11, 64\) given, \(10, 64\) expected"):
        model.load_official_state_dict(bad)
    bad = dict(sd)
    bad["fc_b1.bias"] = [0.0] * 10
    with pytest.raises(TypeError, match=r"entry 'fc_b1.bias' is a list, not a tensor"):
        model.load_official_state_dict(bad)
    with pytest.raises(TypeError, match="state_dict"):
        model.load_official_state_dict([1, 2])
    # A refused checkpoint changes nothing.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("formulation", ["faithful", "fast"])
def test_teacher_forward_equals_logits_and_skips_students(formulation):
    model = teskd_fast.create_model("resnet18", 10, stem="imagenet", formulation=formulation, width=0.125).eval()
    x = torch.randn(2, 3, 64, 64)
    called = []
    student_modules = [
        model.laterals,
        model.upsample,
        model.fuse_1,
        model.fuse_2,
        model.fuse_3,
        model.downsample1,
        model.downsample2,
        model.downsample3,
        model.fc_b1,
        model.fc_b2,
        model.fc_b3,
    ]
    with torch.no_grad():
        logits = model(x).logits
        hooks = [m.register_forward_hook(lambda *a: called.append(1)) for s in student_modules for m in s.modules()]
        teacher = model.teacher_forward(x)
    for h in hooks:
        h.remove()
    assert not called, "teacher_forward ran student modules"
    assert_close(teacher, logits, torch.float32, "teacher_forward")


def _torchvision_build(arch, num_classes, stem):
    net = getattr(torchvision.models, arch)(num_classes=num_classes)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


@pytest.mark.parametrize("stem,formulation", [("imagenet", "fast"), ("cifar", "faithful"), ("cifar", "fast")])
def test_export_teacher_round_trip(stem, formulation):
    model = teskd_fast.create_model("resnet18", 10, stem=stem, formulation=formulation)
    # Train one forward so that running statistics are not the initial ones.
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    model.eval()
    teacher = teskd_fast.export_teacher(model)
    assert type(teacher) is torchvision.models.ResNet
    fresh = _torchvision_build("resnet18", 10, stem)
    fresh.load_state_dict(teacher.state_dict(), strict=True)
    fresh.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.teacher_forward(x)
        assert_close(teacher(x), expected, torch.float32, "exported teacher")
        assert_close(fresh(x), expected, torch.float32, "fresh torchvision")


@pytest.mark.parametrize("formulation", ["faithful", "fast"])
def test_wrap_torchvision_reproduces_create_model(formulation):
    reference = teskd_fast.create_model("resnet18", 10, stem="imagenet", formulation=formulation)
    wrapped = teskd_fast.wrap(torchvision.models.resnet18(num_classes=10), 10, formulation=formulation)
    assert type(wrapped) is type(reference)
    wrapped.load_official_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    reference.train(), wrapped.train()
    for a, b in zip(flat_outputs(wrapped(x)), flat_outputs(reference(x)), strict=True):
        assert torch.equal(a, b)
    wrapped.eval()
    teacher = teskd_fast.export_teacher(wrapped)
    with torch.no_grad():
        assert_close(teacher(x), wrapped.teacher_forward(x), torch.float32, "exported wrapped teacher")


def test_wrap_timm_features_model_trains_one_step():
    timm = pytest.importorskip("timm", reason="timm is optional: pip install timm")
    backbone = timm.create_model("mobilenetv3_small_050", features_only=True, pretrained=False)
    model = teskd_fast.wrap(backbone, 6)
    assert model.kind == "features" and model.width == backbone.feature_info.channels()[-1]
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 6, (4,))
    out = model(x)
    width = model.width
    assert out.logits.shape == (4, 6) and out.student_logits.shape == (3, 4, 6)
    assert out.feature.shape == (4, width) and out.student_features.shape == (3, 4, width)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = teskd_fast.teskd_loss(out.logits, out.student_logits, y, out.feature, out.student_features)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("fc_b1") for k in changed)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in ("resnet101", "wide_resnet50_2")
                                  else a for a in sorted(ARCHS)])
def test_every_arch_builds_and_runs(arch):
    width = 0.25 if arch == "resnext50_32x4d" else 0.125
    for formulation in ("faithful", "fast"):
        model = teskd_fast.create_model(arch, 3, stem="cifar", formulation=formulation, width=width)
        out = model(torch.randn(2, 3, 16, 16))
        assert out.logits.shape == (2, 3) and len(out.student_logits) == 3
        assert out.feature.shape == (2, model.width)


def test_initialisation_follows_the_reference():
    imagenet = teskd_fast.create_model("resnet18", 10, stem="imagenet", formulation="faithful")
    cifar = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation="faithful")
    # kaiming-normal, fan_out: std sqrt(2 / (out * k * k)); PyTorch's default: uniform in +-1/sqrt(fan_in).
    w = imagenet.layer3[0].conv2.weight
    assert abs(w.std().item() / (2 / (256 * 9)) ** 0.5 - 1) < 0.05
    assert w.abs().max() > 1 / (256 * 9) ** 0.5
    assert cifar.layer3[0].conv2.weight.abs().max() <= 1 / (256 * 9) ** 0.5
    assert torch.equal(imagenet.layer1[0].bn1.weight, torch.ones(64))
    for model in (imagenet, cifar):
        lateral = model.laterals[0][0].weight
        assert lateral.abs().max() <= 1 / 64**0.5
        assert model.downsample1[0].weight.abs().max() <= 1 / (512 * 64) ** 0.5


def test_build_resnet_is_torchvisions_network_where_torchvision_builds_it():
    """Width 1 with the ImageNet stem: torchvision's own constructor, so the same weights for the same seed."""
    from teskd_fast.models.resnet import build_resnet

    torch.manual_seed(3)
    ours = build_resnet("resnet18", 10)
    torch.manual_seed(3)
    theirs = torchvision.models.resnet18(num_classes=10)
    assert type(ours) is torchvision.models.ResNet
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("arch,stem,width", [("resnet18", "cifar", 1.0), ("resnext50_32x4d", "imagenet", 0.25)])
def test_resnets_torchvision_cannot_build_hold_no_placeholder(arch, stem, width):
    """A CIFAR stem or a width factor: torchvision's ResNet with our modules in place of its placeholders, every
    parameter and buffer real (none left on the meta device), on its export as on the build."""
    from teskd_fast.models.resnet import build_resnet

    net = build_resnet(arch, 10, stem, width)
    model = teskd_fast.wrap(build_resnet(arch, 10, stem, width), 10)
    for module in (net, teskd_fast.export_teacher(model)):
        assert type(module) is torchvision.models.ResNet
        assert all(t.device.type == "cpu" for t in module.state_dict().values())
        assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown arch 'resnet19'"):
        teskd_fast.create_model("resnet19", 10)
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        teskd_fast.create_model("resnet18", 10, stem="tiny")
    with pytest.raises(ValueError, match="unknown formulation 'quick'"):
        teskd_fast.create_model("resnet18", 10, formulation="quick", width=0.125)
    with pytest.raises(ValueError, match="width"):
        teskd_fast.create_model("resnet18", 10, width=0)
    with pytest.raises(ValueError, match="too small"):
        teskd_fast.create_model("resnext50_32x4d", 10, width=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        teskd_fast.create_model("resnet18", 0, width=0.125)
    with pytest.raises(TypeError, match="features_only"):
        teskd_fast.wrap(nn.Linear(3, 3), 10)
    with pytest.raises(TypeError, match="export_teacher"):
        teskd_fast.export_teacher(nn.Linear(3, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stem,size", [("imagenet", 224), ("cifar", 32), ("imagenet", 200)])
def test_fast_equals_faithful_float64_on_cuda(stem, size):
    """The same exactness check on the GPU (cuDNN convolutions, the GPU's bilinear and matmul kernels)."""
    faithful, fast = pair("resnet18", 10, stem, 0.25)
    faithful, fast = faithful.cuda(), fast.cuda()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, device="cuda")
    check_pair(faithful, fast, x, torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_bf16_autocast_channels_last_step_on_cuda():
    """A bf16 training step of the fast network with the fused loss: finite, and close to the float32 step."""
    faithful, fast = pair("resnet18", 100, "imagenet", 0.5, dtype=torch.float32)
    fast = fast.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (8,), device="cuda")
    losses = []
    for autocast in (False, True):
        fast.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = fast(x)
        loss = teskd_fast.teskd_loss(out.logits, out.student_logits, y, out.feature, out.student_features)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in fast.parameters() if p.grad is not None)
        losses.append(float(loss))
    assert abs(losses[0] - losses[1]) < 0.05 * abs(losses[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_up_block_statistics_are_float32_under_autocast(dtype):
    # Under autocast the up block's conv output arrives in half precision; its batch statistics (and so the
    # running statistics) must still be those of the upsampled map in float32, as nn.BatchNorm2d computes them.
    torch.manual_seed(0)
    y = (torch.randn(8, 16, 7, 5) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    bn, ref = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
    with torch.autocast("cpu", dtype=dtype):
        resize_bn_relu(y, bn, (14, 9))
    ref(torch.nn.functional.interpolate(y.float(), size=(14, 9), mode="bilinear", align_corners=True))
    # float32 rounding of the same statistics: 1e-5 relative; half-precision matmuls would be off by ~1e-3.
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


def test_interpolation_statistics_are_built_once():
    from teskd_fast.models.fast import interpolation_matrix, resize_statistics

    first = resize_statistics(7, 14, torch.float32, torch.device("cpu"))
    assert all(a is b for a, b in zip(first, resize_statistics(7, 14, torch.float32, torch.device("cpu")), strict=True))
    a = interpolation_matrix(7, 14, torch.float64, "cpu")
    col, gram = resize_statistics(7, 14, torch.float64, torch.device("cpu"))
    assert_close(col, a.sum(0), torch.float64, "column sums")
    assert_close(gram, a.t() @ a, torch.float64, "Gram matrix")


@pytest.mark.parametrize("formulation", ["faithful", "fast"])
def test_bad_input_is_refused_up_front_with_what_was_expected(formulation):
    model = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation=formulation, width=0.125)
    x = torch.randn(2, 3, 16, 16)
    cases = [
        (torch.randn(2, 1, 16, 16), ValueError, r"expected a float32 \[B, 3, H, W\] image batch, got float32 of "
                                                r"shape \[2, 1, 16, 16\]"),
        (torch.randn(3, 16, 16), ValueError, r"got float32 of shape \[3, 16, 16\]"),
        ((x * 255).to(torch.uint8), TypeError, r"float32 \[B, 3, H, W\] image batch, got uint8 .*convert"),
        (x.long(), TypeError, r"float32 \[B, 3, H, W\] image batch, got int64 of shape \[2, 3, 16, 16\]"),
        (x.double(), TypeError, r"float32 \[B, 3, H, W\] image batch, got float64 .*dtype must be the network's"),
        (x.numpy(), TypeError, r"float32 \[B, 3, H, W\] image batch, got ndarray"),
    ]
    for bad, error, message in cases:
        for call in (model, model.teacher_forward):
            with pytest.raises(error, match=message):
                call(bad)
    # Under autocast float32 / bfloat16 / float16 inputs mix (autocast casts them), float64 does not.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert model(x.to(dtype)).logits.dtype == torch.bfloat16
        with pytest.raises(TypeError, match="got float64"):
            model(x.double())
    # A network cast to another dtype takes inputs of that dtype, and refuses float32 ones.
    for dtype in (torch.float64, torch.bfloat16):
        cast = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation=formulation, width=0.125).to(dtype)
        with torch.no_grad():
            assert cast(x.to(dtype)).logits.dtype == dtype
        with pytest.raises(TypeError, match=rf"expected a {str(dtype)[6:]} \[B, 3, H, W\] image batch, got float32"):
            cast(x)


def test_a_backbone_with_other_input_channels_is_checked_against_them():
    backbone = torchvision.models.resnet18(num_classes=10)
    backbone.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    model = teskd_fast.wrap(backbone, 10)
    assert model(torch.randn(2, 1, 32, 32)).logits.shape == (2, 10)
    with pytest.raises(ValueError, match=r"expected a float32 \[B, 1, H, W\] image batch, got float32 of shape "
                                         r"\[2, 3, 32, 32\]"):
        model(torch.randn(2, 3, 32, 32))


def test_the_baseline_network_checks_its_input_and_the_exported_teacher_stays_plain():
    from teskd_fast.train.build import build_model
    from teskd_fast.train.config import resolve

    baseline = build_model(resolve({"method": "baseline", "width": 0.125}), 10)
    assert type(baseline) is torchvision.models.ResNet
    assert baseline(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(TypeError, match=r"float32 \[B, 3, H, W\] image batch, got int64"):
        baseline(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] image batch, got float32 of shape \[2, 4, 8, 8\]"):
        baseline(torch.zeros(2, 4, 8, 8))
    # The library's export is torchvision's ResNet with no hook of ours (TorchScript and ONNX take it as it is).
    teacher = teskd_fast.export_teacher(teskd_fast.create_model("resnet18", 10, width=0.125))
    assert not teacher._forward_pre_hooks
