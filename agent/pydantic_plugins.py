"""Pydantic's plugins, off: none is loaded, and none is looked for.

Installed packages can register pydantic plugins (its ``pydantic`` entry points, logfire's
for one) that wrap every validator, so how a config file validates would depend on what
else site-packages holds. :func:`disable` turns them off with pydantic's own switch,
``PYDANTIC_DISABLE_PLUGINS=__all__``. Pydantic still imports its plugin loader when it
builds the first model, and that module imports ``importlib.metadata`` (with ``email``,
``zipfile`` and ``csv``) whatever the switch says: 1.3 MiB that the daemon would keep for
its whole life to learn that no plugin is wanted. So :func:`disable` also puts this module
in the loader's place, until pydantic has imported the real one: its :func:`get_plugins`
answers as the real one does with the switch set, no plugin. A name this module lacks (one
a later pydantic asks its loader for) is answered from the real loader, imported then in
its place: an upgrade can cost that memory back, never a start.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Final

SWITCH: Final = "PYDANTIC_DISABLE_PLUGINS"
LOADER: Final = "pydantic.plugin._loader"


def disable() -> None:
    """Turn pydantic's plugins off for this process and the processes it starts, and spare
    the plugin lookup. Call it before the first model is built."""
    os.environ[SWITCH] = "__all__"
    sys.modules.setdefault(LOADER, sys.modules[__name__])


def get_plugins(*_args: object, **_kwargs: object) -> tuple[()]:
    """No plugin: what pydantic's loader answers while every plugin is disabled."""
    return ()


def __getattr__(name: str) -> object:
    """``name`` from pydantic's real loader, which takes this module's place from now on.

    Dunder names are not asked on: the import system probes ``__path__`` on every ``from
    ... import``, and that must not load what this module spares.
    """
    if name.startswith("__"):
        raise AttributeError(name)
    if sys.modules.get(LOADER) is sys.modules[__name__]:
        del sys.modules[LOADER]
    return getattr(importlib.import_module(LOADER), name)
