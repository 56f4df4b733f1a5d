"""teskd_fast from its source tree without installing it: the GPU suite's install fallback (bench/suite_install.sh).

Python imports ``sitecustomize`` at start-up; with this folder on ``PYTHONPATH`` and ``TESKD_FAST_SOURCE_TREE`` set to
the repository, every Python process (pytest, its subprocesses, teskd-train) finds ``teskd_fast`` in the tree and
``teskd_fast.kernels`` in its top-level ``kernels/`` folder, the mapping setup.py's ``package_dir`` makes. It works
as setuptools' editable installs do: a finder at the end of ``sys.meta_path``, consulted when the path finders do not
find the module (``teskd_fast`` on no path entry, or ``teskd_fast.kernels`` under a ``teskd_fast`` found in the tree).
The interpreter's own ``sitecustomize``, if it has one, runs afterwards.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    def __init__(self, root):
        self.packages = {"teskd_fast": os.path.join(root, "teskd_fast"),
                         "teskd_fast.kernels": os.path.join(root, "kernels")}

    def find_spec(self, name, path=None, target=None):
        folder = self.packages.get(name)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


def _install():
    root = os.environ.get("TESKD_FAST_SOURCE_TREE")
    if root and not any(isinstance(f, _SourceTreeFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceTreeFinder(root))
    here = os.path.dirname(os.path.abspath(__file__))
    others = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_install()
