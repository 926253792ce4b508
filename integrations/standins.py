"""Stand-in modules for upstream imports that a test or smoke run never uses.

DanceGRPO's ``train_grpo_flux.py`` imports ``wandb``, ``cv2`` and (through ``fastvideo``)
``liger_kernel`` at module level; Flow-GRPO's ``train_sd3.py`` imports ``absl``,
``ml_collections`` and ``wandb``. :func:`install_standins` puts permissive empty modules in
``sys.modules`` for those of ``names`` that are not installed, so the real upstream
functions can be imported and called. Training runs need the real packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable
from types import ModuleType
from typing import Any

__all__ = ["Anything", "install_standins"]


class Anything:
    """Callable, subscriptable, usable as a context manager and a base class; every
    attribute is another :class:`Anything`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Anything:
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything()

    def __call__(self, *args: Any, **kwargs: Any) -> Anything:
        return Anything()

    def __getitem__(self, key: Any) -> Anything:
        return Anything()

    def __enter__(self) -> Anything:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __mro_entries__(self, bases: tuple[type, ...]) -> tuple[type, ...]:
        return (object,)


class _StandinModule(ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return Anything()


class _StandinFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = _StandinModule(spec.name)
        module.__path__ = []
        module.__standin__ = True  # type: ignore[attr-defined]
        return module

    def exec_module(self, module: ModuleType) -> None:
        return None


def install_standins(names: Iterable[str]) -> list[str]:
    """Install stand-ins for the top-level packages in ``names`` that cannot be imported.

    ``diffusers`` and ``transformers`` are imported first: they probe optional packages
    (e.g. ``torchvision``) at import time and must not mistake a stand-in for the real one.
    Returns the names that got a stand-in.
    """
    for library in ("diffusers", "transformers"):
        if importlib.util.find_spec(library) is not None:
            importlib.import_module(library)
    missing = [n for n in names if n not in sys.modules and importlib.util.find_spec(n) is None]
    if missing:
        sys.meta_path.append(_StandinFinder(set(missing)))
    return missing
