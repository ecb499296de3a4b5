"""Where the idle agent's memory above the baseline goes, module by module.

``bench/daemon_idle.py`` compares the idle agent's RSS with a bare process that imports
trio, structlog and pydantic. This script shows what the difference is made of: a child
process does the baseline's imports and defines one pydantic model, then imports what
``vbox-agent run --device unix:...`` imports, and for every module loaded on top of that it
prints the memory (tracemalloc) the module's import kept: its code objects, classes, tables
and the methods ``dataclasses`` generated for it, without what the modules it imported kept
themselves. The totals follow, by origin (the agent, the standard library, other packages),
with the number of classes the agent defines by kind (on Python 3.11 a frozen slotted
dataclass of three fields keeps about 13 KiB: its six generated methods and its class; a
record, ``agent.records.record``, which generates only ``__init__``, about 5 KiB: the figures
of ``agent/records.py``).
The first model's own cost (pydantic's schema machinery; the agent spares its plugin
lookup, ``agent.pydantic_plugins``, and so does the model built here) is measured
separately, the same way. tracemalloc sees Python's allocations, not pydantic-core's, nor
the pages of shared libraries the process touches, nor what the daemon imports once it
runs (the balloon's chunk walker, in the modes where the agent holds chunks):
``daemon_idle.py`` has the RSS.

The agent is imported from a copy of the package compiled to ``.pyc`` first, as
``daemon_idle.py`` runs it.

    python bench/idle_modules.py [--top 25]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import agent

BASELINE = "import trio, structlog, pydantic; pydantic.BaseModel"
ONE_MODEL = (
    "from agent import pydantic_plugins; pydantic_plugins.disable()"
    "\nclass Probe(pydantic.BaseModel):\n    x: int = 0"
)
"""The first model, built as the agent builds its own: plugins off, their lookup spared."""
RUN_PATH = "import agent.cli, agent.cli._run, agent.device.unix"
"""What ``vbox-agent run --device unix:...`` imports before it runs (as in daemon_idle.py)."""

CHILD = '''
import dataclasses, enum, importlib.abc, json, sys, sysconfig, tracemalloc
{baseline}
kept = {{}}
nested = [0]


class _Measured:
    """A loader that records what executing its module kept, without nested imports."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        nested.append(0)
        before = tracemalloc.get_traced_memory()[0]
        try:
            self._loader.exec_module(module)
        finally:
            total = tracemalloc.get_traced_memory()[0] - before
            kept[module.__name__] = kept.get(module.__name__, 0) + total - nested.pop()
            nested[-1] += total


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _Measured(spec.loader)
                return spec
        return None


sys.meta_path.insert(0, _Finder())
tracemalloc.start()
start = tracemalloc.get_traced_memory()[0]
{one_model}
first_model = tracemalloc.get_traced_memory()[0] - start
first_model_modules = sum(kept.values())
kept.clear()
start = tracemalloc.get_traced_memory()[0]
{run_path}
run_path = tracemalloc.get_traced_memory()[0] - start
tracemalloc.stop()

from agent.records import is_record

stdlib = sysconfig.get_paths()["stdlib"]


def origin(name):
    if name == "agent" or name.startswith("agent."):
        return "agent"
    path = getattr(sys.modules[name], "__file__", None) or ""
    return "stdlib" if path.startswith(stdlib) and "site-packages" not in path else "other"


kinds = {{}}
for name, module in list(sys.modules.items()):
    if origin(name) != "agent":
        continue
    for value in vars(module).values():
        if isinstance(value, type) and value.__module__ == name:
            if is_record(value):
                kind = "records"
            elif dataclasses.is_dataclass(value):
                frozen = value.__dataclass_params__.frozen
                kind = "frozen dataclasses" if frozen else "dataclasses"
            elif issubclass(value, pydantic.BaseModel):
                kind = "pydantic models"
            elif issubclass(value, enum.Enum):
                kind = "enums"
            elif issubclass(value, BaseException):
                kind = "exceptions"
            else:
                kind = "other classes"
            kinds[kind] = kinds.get(kind, 0) + 1
json.dump(
    {{
        "first_model": first_model,
        "first_model_modules": first_model_modules,
        "run_path": run_path,
        "modules": [[name, size, origin(name)] for name, size in kept.items()],
        "classes": kinds,
    }},
    sys.stdout,
)
'''


def _kib(size: int) -> str:
    return f"{size / 1024:8.1f} KiB"


def main() -> None:
    """Measure in a child process and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25, help="modules listed, largest first")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vbox-bench-", dir="/tmp"))
    try:
        shutil.copytree(Path(agent.__file__).parent, workdir / "agent")
        if not compileall.compile_dir(workdir / "agent", quiet=1):
            msg = "compiling the agent package failed"
            raise RuntimeError(msg)
        code = CHILD.format(baseline=BASELINE, one_model=ONE_MODEL, run_path=RUN_PATH)
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=workdir,
            env=dict(os.environ, PYTHONPATH=str(workdir), PYDANTIC_DISABLE_PLUGINS="__all__"),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    figures = json.loads(result.stdout)
    modules = sorted(figures["modules"], key=lambda row: -row[1])
    print("memory the imports kept (tracemalloc), on top of the baseline:")
    print(f"  pydantic's first model     {_kib(figures['first_model'])}")
    print(f"    in the modules it loads  {_kib(figures['first_model_modules'])}")
    print(f"  the run path               {_kib(figures['run_path'])}  ({RUN_PATH})")
    for origin in ("agent", "stdlib", "other"):
        rows = [row for row in modules if row[2] == origin]
        total = sum(size for _, size, _ in rows)
        print(f"    {origin:7s} {len(rows):3d} modules {_kib(total)}")
    classes = ", ".join(f"{count} {kind}" for kind, count in sorted(figures["classes"].items()))
    print(f"  the agent's classes: {classes}")
    print(f"  the {args.top} largest modules of the run path:")
    for name, size, origin in modules[: args.top]:
        print(f"    {_kib(size)}  {name} ({origin})")


if __name__ == "__main__":
    main()
