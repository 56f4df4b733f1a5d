"""The contracts the trainer relies on: every built-in loader follows the Loader protocol (its members, their
parameters, resuming at a batch); and two rules of teskd_fast.data and teskd_fast.train: their public functions
say what they return."""

import ast
import importlib
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_imagenet import make_image_folder, needs_dali

from teskd_fast.data import CifarLoader, imagenet_loaders
from teskd_fast.data.digits import DigitsLoader, digits_loaders
from teskd_fast.data.imagenet import LOADER_BACKENDS
from teskd_fast.data.protocol import Loader, ResizableLoader

PACKAGE = Path(__file__).resolve().parents[1] / "teskd_fast"
HAS_CUDA = torch.cuda.is_available()
# What a backend needs to be built here; a backend added to LOADER_BACKENDS is tested without further ado.
NEEDS = {"dali": [needs_dali], "nvjpeg": [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]}
BACKENDS = [pytest.param(name, marks=NEEDS.get(name, [])) for name in LOADER_BACKENDS]


def _backend_class(name):
    backend = LOADER_BACKENDS[name]
    return getattr(importlib.import_module(backend.module), backend.class_name)


def _methods(protocol):
    """The protocol's methods (the dunders it declares included), by name."""
    out = {}
    for klass in reversed(protocol.__mro__):
        if klass.__module__ == protocol.__module__:
            out.update({n: v for n, v in vars(klass).items() if inspect.isfunction(v) and n != "__init__"
                        and (not n.startswith("_") or n in ("__len__", "__iter__"))})
    return out


def _conformance_problems(cls, protocol):
    """What ``cls`` lacks of ``protocol``: a missing method, or a parameter missing or with another default."""
    problems = []
    for name, declared in _methods(protocol).items():
        impl = getattr(cls, name, None)
        if not callable(impl):
            problems.append(f"{cls.__name__}.{name} is missing")
            continue
        have = inspect.signature(impl).parameters
        for p in list(inspect.signature(declared).parameters.values())[1:]:
            if p.name not in have:
                problems.append(f"{cls.__name__}.{name} has no parameter {p.name!r}")
            elif have[p.name].default != p.default:
                problems.append(f"{cls.__name__}.{name}({p.name}=...) defaults to {have[p.name].default!r}, "
                                f"not {p.default!r}")
    return problems


def test_the_protocol_declares_what_the_trainer_calls():
    assert set(_methods(Loader)) == {"__len__", "__iter__", "set_epoch", "state_dict", "load_state_dict"}
    assert set(_methods(ResizableLoader)) - set(_methods(Loader)) == {"set_image_size"}
    assert "classes" in Loader.__annotations__


def test_the_conformance_check_finds_what_a_loader_lacks():
    class Seekless:
        classes = ["a"]

        def __len__(self):
            return 1

        def __iter__(self):
            return iter(())

        def set_epoch(self, epoch):
            pass

    problems = _conformance_problems(Seekless, Loader)
    assert "Seekless.set_epoch has no parameter 'start_batch'" in problems
    assert "Seekless.state_dict is missing" in problems and not isinstance(Seekless(), Loader)


@pytest.mark.parametrize("cls", [DigitsLoader, CifarLoader], ids=lambda c: c.__name__)
def test_the_tensor_loader_classes_follow_the_protocol(cls):
    assert _conformance_problems(cls, Loader) == []


@pytest.mark.parametrize("backend", [pytest.param(n, marks=NEEDS[n] if n == "dali" else []) for n in LOADER_BACKENDS])
def test_every_imagefolder_loader_class_follows_the_protocol(backend):
    # Importing the class needs only its library (DALI for dali; nvjpeg's class imports without CUDA).
    cls = _backend_class(backend)
    assert cls.backend == backend
    # The ImageFolder backends also change their training resolution between passes (progressive resizing).
    assert _conformance_problems(cls, ResizableLoader) == []


def _check_instance(loader, num_classes):
    """A built loader is a Loader, names its classes and resumes a pass at a batch."""
    assert isinstance(loader, Loader) and len(loader.classes) == num_classes
    n = len(loader)
    assert n >= 2
    loader.set_epoch(1, start_batch=1)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 1
    batches = list(loader)
    assert len(batches) == n - 1
    images, labels = batches[0]
    assert images.dim() == 4 and labels.dtype == torch.int64 and labels.shape == images.shape[:1]
    assert loader.state_dict()["epoch"] == 2


def test_digits_loaders_follow_the_protocol(device):
    train, val = digits_loaders(batch_size=256, val_batch_size=128, device=device)
    _check_instance(train, 10)
    _check_instance(val, 10)


def test_cifar_loaders_follow_the_protocol(device):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (40,), generator=g)
    classes = [f"c{i}" for i in range(5)]
    for train in (True, False):
        _check_instance(CifarLoader(images, labels, batch_size=16, train=train, device=device, classes=classes), 5)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), np.random.default_rng(0), per_class=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_imagefolder_loaders_follow_the_protocol(backend, image_folder):
    device = "cuda" if backend == "nvjpeg" else "cpu"
    train, val = imagenet_loaders(image_folder, batch_size=3, backend=backend, image_size=32, val_resize=40,
                                  device=device, workers=1)
    for loader in (train, val):
        assert isinstance(loader, ResizableLoader)
        _check_instance(loader, 3)


def _unannotated(node, where, prefix=""):
    """``where:line name`` of every public function or method in ``node`` without a return annotation."""
    missing = []
    for n in ast.iter_child_nodes(node):
        if isinstance(n, ast.ClassDef) and not n.name.startswith("_"):
            missing += _unannotated(n, where, f"{prefix}{n.name}.")
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns is None:
            if not n.name.startswith("_") or n.name in ("__iter__", "__len__", "__call__"):
                missing.append(f"{where}:{n.lineno} {prefix}{n.name}")
    return missing


def _unannotated_public_functions(folder):
    return [m for path in sorted(folder.rglob("*.py"))
            for m in _unannotated(ast.parse(path.read_text()), path.relative_to(PACKAGE))]


@pytest.mark.parametrize("folder", ["data", "train"])
def test_the_public_api_has_return_annotations(folder):
    assert _unannotated_public_functions(PACKAGE / folder) == []
