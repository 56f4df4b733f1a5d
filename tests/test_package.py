"""Packaging: kernels install as ``teskd_fast.kernels``, the import is light, the kernels build for an H100."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code, cwd, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_non_editable_install_maps_kernels_into_the_package(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile", "--quiet",
         "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "teskd_fast" / "kernels" / "teskd_loss.py").is_file()
    assert not (target / "kernels").exists(), "kernels/ must not install as a global module"
    for name in ("teskd_loss_cpu.c", "teskd_loss_cpu_impl.h"):  # the fused CPU kernel's source ships as data
        assert (target / "teskd_fast" / "kernels" / "csrc" / name).is_file(), name
    # Run from an empty folder with only the installed copy on the path: no source checkout visible.
    out = _run(
        """
        import importlib.util, shutil
        import teskd_fast, teskd_fast.kernels.teskd_loss as k
        from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel
        print(teskd_fast.__file__)
        print(k.__file__)
        print(importlib.util.find_spec("kernels"))
        # Built from the installed source, where a C compiler exists.
        print(cpu_kernel.status()[0] if cpu_kernel._compiler() else "no-compiler")
        """,
        cwd=tmp_path,
        env_extra={"PYTHONPATH": str(target), "TRITON_INTERPRET": "1", "TESKD_FAST_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    pkg, kern, spec, kernel = out.stdout.split()
    assert pkg.startswith(str(target)) and kern.startswith(str(target / "teskd_fast" / "kernels"))
    assert spec == "None"
    assert kernel in ("True", "no-compiler"), f"the fused CPU kernel did not build from the installed copy: {kernel}"


def test_import_is_light():
    """``import teskd_fast`` loads neither Triton nor DALI nor the models."""
    out = _run(
        """
        import sys, teskd_fast
        heavy = [m for m in ("triton", "nvidia.dali", "teskd_fast.kernels", "teskd_fast.models") if m in sys.modules]
        print(heavy)
        """,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_the_training_configuration_loads_without_torch():
    """``teskd-train --help`` and a configuration check need no torch: the configuration reads the loss's
    specification (kernels/options.py) and the registries of the layers above it only when it needs them."""
    out = _run(
        """
        import sys
        import teskd_fast.train.config as c
        assert c.TrainConfig().temperature == 4.0
        print(sorted(m for m in ("torch", "teskd_fast.models", "teskd_fast.loss") if m in sys.modules))
        """,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_kernels_import_nothing_from_the_layers_above():
    """kernels/ is the lowest layer: importing every kernel module loads no other part of teskd_fast."""
    out = _run(
        """
        import sys
        import teskd_fast.kernels.options, teskd_fast.kernels.teskd_loss, teskd_fast.kernels.teskd_loss_cpu
        print(sorted(m for m in sys.modules if m.startswith("teskd_fast.") and not m.startswith("teskd_fast.kernels")))
        """,
        cwd=ROOT,
        env_extra={"TRITON_INTERPRET": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_triton_kernels_compile_for_h100_without_register_spills():
    """Compile the kernels ahead of time for sm_90 (no GPU needed; the interpreter does not type-check), in every
    configuration the launcher can pick, and read ptxas' report: no register may spill."""
    out = _run(
        """
        import itertools, os, re, subprocess, tempfile, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from teskd_fast.kernels.teskd_loss_jit import _teskd_bwd_kernel, _teskd_fwd_kernel, launch_config

        INTS = {"B", "C", "D", "K", "N1", "N2", "P1", "ignore_index"}
        PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        SPILLS = []

        def build(fn, ptrs, consts, num_warps=4):
            sig = {}
            for name in fn.arg_names:
                if name == "w":  # the K + 1 head weights, a tuple of scalars
                    sig[name] = ("fp32",) * (consts["BLOCK_K"] + 1)
                elif name in consts:
                    sig[name] = "constexpr"
                elif name in ptrs:
                    sig[name] = ptrs[name]
                elif name in INTS or name.startswith("s_"):
                    sig[name] = "i32"
                else:
                    sig[name] = "fp32"
            target = GPUTarget("cuda", 90, 32)
            kernel = triton.compile(ASTSource(fn, sig, consts), target=target, options={"num_warps": num_warps})
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(kernel.asm["ptx"])
            report = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                    text=True, check=True).stderr
            spilled = [int(n) for n in re.findall(r"(\\d+) bytes spill stores", report)]
            assert spilled, report
            if any(spilled):
                SPILLS.append((fn.__name__, consts, num_warps, max(spilled)))

        def fwd_ptrs(dt, gdt):
            return dict(t_ptr="*" + dt, s_ptr="*" + dt, y_ptr="*i64", ft_ptr="*" + dt, fs_ptr="*" + dt,
                        gt_ptr="*" + gdt, gs_ptr="*" + gdt, gf_ptr="*" + gdt, part_ptr="*fp32", total_ptr="*fp32",
                        parts_ptr="*fp32", ticket_ptr="*i32")

        # Every configuration the launcher gives for K <= 32 (it depends on K and C alone: every power of two of
        # each), in the variant with the most live values (features, gradients, KD into the teacher).
        configs = sorted({launch_config(K, 256, C, 512) for K, C in itertools.product(
            range(1, 33), (2**i for i in range(1, 14)))})
        for K, C in itertools.product((1, 3, 32), (2, 1000, 5000)):
            assert len({launch_config(K, B, C, D) for B in (1, 17, 65536) for D in (1, 100, 8192)}) == 1, (K, C)
        for block_k, block_c, block_d, block_b, num_warps in configs:
            consts = dict(HAS_FEAT=True, DETACH=False, NEED_GRAD=True, BLOCK_K=block_k, BLOCK_C=block_c,
                          BLOCK_D=block_d, BLOCK_B=block_b)
            build(_teskd_fwd_kernel, fwd_ptrs("fp32", "fp32"), consts, num_warps)
        # The other dtypes and flags type-check too.
        for dt, gdt, feat, detach, grad in (("bf16", "bf16", True, True, False), ("fp16", "fp32", False, False, True)):
            block_k, block_c, block_d, block_b, num_warps = launch_config(3, 256, 8192, 512)
            consts = dict(HAS_FEAT=feat, DETACH=detach, NEED_GRAD=grad, BLOCK_K=block_k, BLOCK_C=block_c,
                          BLOCK_D=block_d, BLOCK_B=block_b)
            build(_teskd_fwd_kernel, fwd_ptrs(dt, gdt), consts, num_warps)
        build(_teskd_bwd_kernel, dict(g_ptr="*fp32", x_ptr="*fp32", y_ptr="*bf16", x2_ptr="*fp32", y2_ptr="*bf16"),
              dict(BLOCK=4096))
        print(len(configs), "configurations")
        for spill in SPILLS:
            print("SPILL", *spill)
        print("ok")
        """,
        cwd=ROOT,
    )
    if "ImportError" in out.stderr and ("GPUTarget" in out.stderr or "ASTSource" in out.stderr):
        pytest.skip("this Triton release has no ahead-of-time compile API at triton.compiler.ASTSource")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    spills = [line for line in out.stdout.splitlines() if line.startswith("SPILL")]
    assert not spills, "register spills on sm_90:\n" + "\n".join(spills)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["teskd_fast", *rel.parts] if rel.parts[0] == "kernels" else list(rel.parts)  # kernels installs there
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports (at module level or inside a function).

    ``from P import N`` depends on ``P.N`` when that is a module, else on ``P`` (a name ``P/__init__.py`` defines
    or re-exports). The parent packages that Python initialises before any submodule are not edges: every import
    runs them, and a package's ``__init__`` importing its own submodules is no cycle of the code's design (a module
    that takes a name the ``__init__`` re-exports does depend on the ``__init__``: import it from where it is
    defined). An import under ``if TYPE_CHECKING:`` never runs: it names a type for the reader, not a layer.
    """
    files = [p for p in (ROOT / "teskd_fast").rglob("*.py") if "kernels" not in p.relative_to(ROOT).parts[1:2]]
    modules = {_module_name(p): p for p in [*files, *(ROOT / "kernels").rglob("*.py")]}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text(), str(path))
        for block in ast.walk(tree):
            if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest path back to the component's first module, through the component: the cycle to show."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    for v in queue:
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


def test_no_import_cycle_inside_the_package():
    """The package's modules import in one direction: no cycle, including imports placed inside functions (an
    import moved into a function hides a cycle from Python, not from the reader)."""
    graph = _import_graph()
    assert "teskd_fast.kernels.options" in graph and "teskd_fast.train.config" in graph
    cycles = [" -> ".join(_one_cycle(graph, c)) for c in _cycles(graph)]
    assert not cycles, "import cycles inside the package:\n" + "\n".join(cycles)


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _one_cycle({"a": {"b"}, "b": {"a", "c"}, "c": {"a"}}, ["a", "b", "c"]) == ["a", "b", "a"]
    assert _cycles({"a": {"b"}, "b": set()}) == []
