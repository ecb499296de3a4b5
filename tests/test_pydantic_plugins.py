"""The agent's stand-in for pydantic's plugin loader (``agent.pydantic_plugins``).

Each check runs in a process of its own: the stand-in works through ``sys.modules``, which
the test process shares with every other test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

REPO: Final = Path(__file__).parents[1]
TIMEOUT_S: Final = 60.0
MODEL: Final = (
    "import pydantic\n"
    "class Probe(pydantic.BaseModel):\n"
    "    x: int = 0\n"
    "assert Probe.model_validate({'x': '7'}).x == 7\n"
)
LOOKUP_LOADED: Final = "print('importlib.metadata' in sys.modules)\n"


def _python(code: str) -> str:
    """Run ``code`` in a new interpreter (from the repository) and return what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_bare_first_model_imports_the_plugin_lookup() -> None:
    """What the stand-in spares: without it, pydantic's first model imports
    ``importlib.metadata``, plugins off or not."""
    code = "import os\nos.environ['PYDANTIC_DISABLE_PLUGINS'] = '__all__'\n" + MODEL
    assert _python(code + LOOKUP_LOADED) == "True"


def test_models_validate_without_the_plugin_lookup() -> None:
    """After ``disable()``, models are built and validate, and ``importlib.metadata`` is
    never imported."""
    code = "from agent import pydantic_plugins\npydantic_plugins.disable()\n" + MODEL
    assert _python(code + LOOKUP_LOADED) == "False"


def test_the_shipped_config_checks_without_the_plugin_lookup() -> None:
    """``vbox-agent check-config`` builds every section's model (the run path's models) and
    imports no ``importlib.metadata``."""
    code = (
        "from agent.cli import main\n"
        "code = main(['check-config', 'config/agent.toml'])\n"
        "print(code, 'importlib.metadata' in sys.modules)\n"
    )
    assert _python(code).splitlines() == ["config/agent.toml: ok", "0 False"]


def test_an_unknown_name_is_answered_by_the_real_loader() -> None:
    """A name the stand-in lacks comes from pydantic's real loader, which then takes its
    place in ``sys.modules``."""
    code = (
        "from agent import pydantic_plugins\n"
        "pydantic_plugins.disable()\n"
        "from pydantic.plugin._loader import PYDANTIC_ENTRY_POINT_GROUP\n"
        "real = sys.modules['pydantic.plugin._loader']\n"
        "print(PYDANTIC_ENTRY_POINT_GROUP, real.get_plugins is not pydantic_plugins.get_plugins,"
        " list(real.get_plugins()))\n"
    )
    assert _python(code) == "pydantic True []"


def test_import_probes_do_not_load_the_real_loader() -> None:
    """The import system's probes (``__path__`` on ``from ... import``) leave the stand-in
    in place."""
    code = (
        "from agent import pydantic_plugins\n"
        "pydantic_plugins.disable()\n"
        "from pydantic.plugin._loader import get_plugins\n"
        "stand_in = sys.modules['pydantic.plugin._loader']\n"
        "print(hasattr(stand_in, '__path__'), get_plugins is pydantic_plugins.get_plugins,"
        " 'importlib.metadata' in sys.modules)\n"
    )
    assert _python(code) == "False True False"


def test_the_stand_in_is_bound_on_its_package() -> None:
    """``pydantic.plugin._loader`` reached through its package is the stand-in, and a name
    it lacks reached that way comes from the real loader (bound only in ``sys.modules``,
    the package had no ``_loader`` attribute: AttributeError both times)."""
    code = (
        "from agent import pydantic_plugins\n"
        "pydantic_plugins.disable()\n"
        "import pydantic.plugin._loader\n"
        "print(list(pydantic.plugin._loader.get_plugins()), 'importlib.metadata' in sys.modules,"
        " pydantic.plugin._loader.PYDANTIC_ENTRY_POINT_GROUP,"
        " pydantic.plugin._loader is sys.modules['pydantic.plugin._loader'])\n"
    )
    assert _python(code) == "[] False pydantic True"


def test_an_already_imported_loader_is_kept() -> None:
    """``disable()`` after pydantic imported its real loader leaves that one in place."""
    code = (
        "import pydantic.plugin._loader as real\n"
        "from agent import pydantic_plugins\n"
        "pydantic_plugins.disable()\n"
        "print(sys.modules['pydantic.plugin._loader'] is real)\n"
    )
    assert _python(code) == "True"


@pytest.mark.parametrize("name", ["__path__", "__wrapped__"])
def test_dunder_names_are_missing(name: str) -> None:
    """Dunder names are missing from the stand-in, as on a plain module, without loading
    the real loader."""
    code = (
        "from agent import pydantic_plugins\n"
        "pydantic_plugins.disable()\n"
        "import pydantic.plugin._loader as stand_in\n"
        f"print(hasattr(stand_in, {name!r}), 'importlib.metadata' in sys.modules)\n"
    )
    assert _python(code) == "False False"


def test_disable_twice_adds_one_finder() -> None:
    """``main`` may run more than once in a process (the tests run it): one finder."""
    code = (
        "from agent import pydantic_plugins\n"
        "before = len(sys.meta_path)\n"
        "pydantic_plugins.disable()\n"
        "pydantic_plugins.disable()\n"
        "print(len(sys.meta_path) - before)\n"
    )
    assert _python(code) == "1"
