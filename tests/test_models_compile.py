"""torch.compile around the TESKD forward: one graph, no recompilation across steps and train/eval switches."""

import pytest
import torch
from tolerances import assert_close, assert_rms_close

import teskd_fast


def tiny(formulation="fast"):
    return teskd_fast.create_model("resnet18", 5, stem="cifar", formulation=formulation, width=0.125)


def unique_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _train_eval_rounds(model, compiled, optimizer, x, y, rounds):
    """``rounds`` times a train step then an eval forward through ``compiled``; the graph count after each."""
    counts = []
    for _ in range(rounds):
        model.train()
        loss = loss_of(compiled(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            compiled(x)
        counts.append(unique_graphs())
    return counts


def stacked(v):
    return v if torch.is_tensor(v) else torch.stack(list(v))


def loss_of(out, y):
    return teskd_fast.teskd_loss(out.logits, out.student_logits, y, out.feature, out.student_features)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # a cold compile of the network, train and eval (docs/testing.md, tiers)
@pytest.mark.parametrize("formulation", ["fast", "faithful"])
def test_fullgraph_no_recompile_across_steps_and_modes(formulation):
    model = tiny(formulation)
    # aot_eager: the same Dynamo graph capture and AOT autograd as inductor, without code generation.
    compiled = teskd_fast.compile_model(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    counts = _train_eval_rounds(model, compiled, optimizer, x, y, rounds=3)
    # One graph per mode (train with autograd, eval under no_grad), compiled in the first step, then reused.
    assert counts == [2, 2, 2], counts
    with torch.no_grad():
        got, expected = compiled(x), model(x)
    assert_close(got.logits, expected.logits, torch.float32, "compiled eval logits")
    assert_close(
        stacked(got.student_logits), stacked(expected.student_logits), torch.float32, "compiled eval student logits"
    )


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
def test_compiled_train_step_matches_eager():
    model = tiny()
    twin = tiny()
    twin.load_state_dict(model.state_dict())
    compiled = teskd_fast.compile_model(model, backend="aot_eager")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    model.train(), twin.train()
    out, ref = compiled(x), twin(x)
    assert_close(out.logits, ref.logits, torch.float32, "logits")
    assert_close(out.student_logits, ref.student_logits, torch.float32, "student logits")
    assert_close(out.student_features, ref.student_features, torch.float32, "student features")
    loss_of(out, y).backward()
    loss_of(ref, y).backward()
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, twin_params[name].grad, torch.float32, f"grad {name}", scale=10.0)
    twin_buffers = dict(twin.named_buffers())
    for name, b in model.named_buffers():
        assert_close(b.double(), twin_buffers[name].double(), torch.float32, f"buffer {name}")


@pytest.mark.slow
def test_bf16_autocast_compiles_and_trains():
    model = tiny()
    compiled = teskd_fast.compile_model(model, backend="aot_eager")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        with torch.no_grad():
            ref = model(x)
    assert out.logits.dtype == torch.bfloat16 and out.student_logits.dtype == torch.bfloat16
    assert_close(out.logits.float(), ref.logits.float(), torch.bfloat16, "bf16 logits", scale=4.0)
    loss = loss_of(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_inductor_fullgraph_train_step_matches_eager():
    model, twin = tiny(), tiny()
    twin.load_state_dict(model.state_dict())
    compiled = teskd_fast.compile_model(model)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    out, ref = compiled(x), twin(x)
    assert_close(out.logits, ref.logits, torch.float32, "logits", scale=10.0)
    assert_close(out.student_logits, ref.student_logits, torch.float32, "student logits", scale=10.0)
    assert_close(out.feature, ref.feature, torch.float32, "feature", scale=10.0)
    assert_close(out.student_features, ref.student_features, torch.float32, "student features", scale=10.0)
    loss_of(out, y).backward()
    loss_of(ref, y).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected = torch.cat([p.grad.flatten() for p in twin.parameters()])
    # Inductor fuses and reorders float32 reductions; BatchNorm backward over 4 images amplifies the rounding
    # (eager float32 alone is ~5e-3 from float64 here, see test_models.py): compared as one vector, a bound that
    # only a real difference (errors of order 1) exceeds.
    assert_rms_close(grads, expected, torch.float32, "gradients", scale=3000.0)
    twin_buffers = dict(twin.named_buffers())
    for name, b in model.named_buffers():
        assert_close(b.double(), twin_buffers[name].double(), torch.float32, f"buffer {name}", scale=10.0)


def test_compile_model_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        teskd_fast.compile_model(lambda x: x)


def test_einops_rearrangements_add_no_graph_break_and_no_recompile():
    # einops (>= 0.8) registers its functions with dynamo: the student heads' patch convolution and the stacked
    # heads are traced as plain reshapes/permutes, one graph, reused.
    from torch._dynamo.utils import counters

    from teskd_fast.models import patch_conv

    compiled = torch.compile(patch_conv, fullgraph=True, backend="aot_eager")
    x, weight, bias = torch.randn(2, 3, 8, 12), torch.randn(5, 3, 4, 4), torch.randn(5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            got = compiled(x, weight, bias)
    assert unique_graphs() == 1 and not counters["graph_break"], (unique_graphs(), dict(counters["graph_break"]))
    assert_close(got, torch.nn.functional.conv2d(x, weight, bias, stride=4), torch.float32, "patch conv")


@pytest.mark.parametrize("formulation", ["fast", pytest.param("faithful", marks=pytest.mark.slow)])
def test_compiled_model_refuses_bad_input_with_the_networks_own_error(formulation):
    from torch._dynamo.utils import counters

    compiled = teskd_fast.compile_model(tiny(formulation), backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x)
        compiled(x)
        # Refused before the compiled forward runs: the network's TypeError / ValueError, not Dynamo's
        # "Observed exception" graph break, and no new graph for the bad inputs.
        with pytest.raises(TypeError, match=r"expected a float32 \[B, 3, H, W\] image batch, got int64"):
            compiled(x.long())
        with pytest.raises(ValueError, match=r"got float32 of shape \[4, 1, 16, 16\]"):
            compiled(x[:, :1])
    assert unique_graphs() == 1 and not counters["graph_break"], (unique_graphs(), dict(counters["graph_break"]))


@pytest.mark.parametrize("formulation", ["fast", pytest.param("faithful", marks=pytest.mark.slow)])
def test_compiled_model_checks_the_batch_given_by_name(formulation):
    # compiled(x=bad) skipped the eager check, and Dynamo reported an "Observed exception" instead.
    compiled = teskd_fast.compile_model(tiny(formulation), backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(compiled(x=x).logits, compiled(x).logits)
        with pytest.raises(TypeError, match=r"expected a float32 \[B, 3, H, W\] image batch, got int64"):
            compiled(x=x.long())


def test_export_teacher_takes_the_compiled_module():
    # Its state_dict's "_orig_mod." names made the export's load fail, listing every key.
    model = tiny("fast").eval()
    compiled = teskd_fast.compile_model(model, backend="aot_eager")
    teacher = teskd_fast.export_teacher(compiled)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(teacher(x), teskd_fast.export_teacher(model)(x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test_convnext", "test_efficientnet", "regnetx_002", "resnet10t"])
def test_wrapped_timm_models_compile_to_one_graph_per_mode(name):
    """ConvNeXt, EfficientNet, RegNet and ResNet-D: forward_intermediates and the model's own head, no graph break,
    no recompilation when switching train / eval."""
    timm = pytest.importorskip("timm", reason="timm is optional: pip install timm")
    model = teskd_fast.wrap(timm.create_model(name, num_classes=5), 5)
    compiled = teskd_fast.compile_model(model, backend="aot_eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2,))
    counts = _train_eval_rounds(model, compiled, optimizer, x, y, rounds=2)
    assert counts == [2, 2], counts
    with torch.no_grad():
        got, expected = compiled(x), model(x)
    assert_close(got.logits, expected.logits, torch.float32, "compiled eval logits")
    assert_close(stacked(got.student_logits), stacked(expected.student_logits), torch.float32, "student logits")
