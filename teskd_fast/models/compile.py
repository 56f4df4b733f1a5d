"""torch.compile around the whole TESKD forward (shared backbone plus students)."""

import functools
import inspect

import torch


def compile_model(model, mode=None, fullgraph=True, dynamic=None, backend="inductor") -> torch.nn.Module:
    """Compile a TESKD network's forward (teacher backbone and students in one graph).

    Model code stays eager; this is the call site of ``torch.compile``. The forward has no graph break
    (``fullgraph=True`` by default makes one an error). A training loop compiles once per mode: one graph for
    ``train()`` and one for ``eval()``, both cached, so switching back and forth recompiles nothing; a new input
    shape does (drop the last partial batch in training). Works under ``torch.autocast`` (bf16/fp16). A bad input
    raises the network's own ValueError / TypeError (see ``TESKDNet.check_input``), checked before the compiled
    forward runs.

    Args:
        model: a TESKD network (any formulation; ``fast`` is the one to compile).
        mode: ``torch.compile`` mode (None, ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``).
        fullgraph: fail on a graph break instead of splitting the graph.
        dynamic: ``torch.compile``'s ``dynamic`` (None: static until a shape changes).
        backend: ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` to check tracing cheaply).

    Returns:
        The compiled module (``torch._dynamo.OptimizedModule``); it shares parameters and state_dict entries
        (prefixed ``_orig_mod.``) with ``model``; ``model`` itself is unchanged.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_model needs an nn.Module, got {type(model).__name__}")
    compiled = torch.compile(model, mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    check = getattr(model, "check_input", None)
    if check is not None:
        # The input check, also run eagerly before the compiled forward: with fullgraph=True Dynamo would report
        # the check's error as an "Observed exception" graph break instead of the ValueError / TypeError itself.
        first = next(iter(inspect.signature(model.forward).parameters), None)
        compiled.register_forward_pre_hook(functools.partial(_check_first_argument, check, first), with_kwargs=True)
    return compiled


def _check_first_argument(check, name, module, args, kwargs) -> None:
    # The image batch, given by position or by its name (``compiled(x=batch)``).
    if args:
        check(args[0])
    elif name in kwargs:
        check(kwargs[name])
