"""Pydantic's plugins, off: none is loaded, and none is looked for.

Installed packages can register pydantic plugins (its ``pydantic`` entry points, logfire's
for one) that wrap every validator, so how a config file validates would depend on what
else site-packages holds. :func:`disable` turns them off with pydantic's own switch,
``PYDANTIC_DISABLE_PLUGINS=__all__``. Pydantic still imports its plugin loader when it
builds the first model, and that module imports ``importlib.metadata`` (with ``email``,
``zipfile`` and ``csv``) whatever the switch says: 1.3 MiB that the daemon would keep for
its whole life to learn that no plugin is wanted. So :func:`disable` also has the import
system load a stand-in under the loader's name (a finder for that one name, ahead of the
others), bound as the real one would be, in ``sys.modules`` and on ``pydantic.plugin``: its
``get_plugins`` is :func:`get_plugins`, which answers as the real one does with the switch
set, no plugin. A name the stand-in lacks (one a later pydantic asks its loader for) is
answered from the real loader, imported then in its place: an upgrade can cost that memory
back, never a start.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.machinery import ModuleSpec
from typing import TYPE_CHECKING, Final, cast

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader
    from types import ModuleType

SWITCH: Final = "PYDANTIC_DISABLE_PLUGINS"
LOADER: Final = "pydantic.plugin._loader"


def disable() -> None:
    """Turn pydantic's plugins off for this process and the processes it starts, and spare
    the plugin lookup unless pydantic's loader is imported already. Call it before the
    first model is built."""
    os.environ[SWITCH] = "__all__"
    if LOADER not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def get_plugins(*_args: object, **_kwargs: object) -> tuple[()]:
    """No plugin: what pydantic's loader answers while every plugin is disabled."""
    return ()


class _StandInFinder:
    """Finds the stand-in for pydantic's plugin loader, and nothing else."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        """The stand-in's spec for the loader's name; None (ask the next finder) otherwise."""
        del path, target
        # It is its own loader: typeshed wants an importlib.abc.Loader, which would import
        # importlib.resources for a base class the import system does not need.
        return ModuleSpec(name, cast("Loader", self)) if name == LOADER else None

    @staticmethod
    def create_module(spec: ModuleSpec) -> None:
        """A plain module (the import system's default)."""
        del spec

    @staticmethod
    def exec_module(module: ModuleType) -> None:
        """Give the module what pydantic takes from its loader, and the way to the rest."""
        module.get_plugins = get_plugins  # type: ignore[attr-defined]
        module.__getattr__ = _from_real_loader  # type: ignore[method-assign]


_FINDER: Final = _StandInFinder()


def _from_real_loader(name: str) -> object:
    """``name`` from pydantic's real loader, which takes the stand-in's place from now on.

    Dunder names are not asked on: the import system probes ``__path__`` on every ``from
    ... import``, and that must not load what the stand-in spares.
    """
    if name.startswith("__"):
        raise AttributeError(name)
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    sys.modules.pop(LOADER, None)
    return getattr(importlib.import_module(LOADER), name)
