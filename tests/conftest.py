"""Shared pytest configuration: Hypothesis profiles and the driver personalities under test.

Select a Hypothesis profile with ``HYPOTHESIS_PROFILE`` (``dev`` by default): ``ci`` has no
deadline and prints reproduction blobs; ``dev`` keeps Hypothesis' defaults.

No test may move this machine's clock or its CPUs: ``SystemClock`` and the CPU hot-plug
service's sysfs writes fail the test that tries.

``host`` is a running simulated host, once with each simulated driver (``SIMULATED_DRIVERS``):
the same service code must pass on both, so a test that expects a driver's own result looks
it up by ``host.personality``. A module or package that needs another host defines its own.
Tests that should hold for the real Linux driver too take the ``personality`` fixture
(``mainline`` and ``kernel``); tests only for the real driver take ``kernel_library``. Where
the library cannot be built, the ``kernel`` cases skip with the build error as the reason,
except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

import pytest
import structlog
import trio
from hypothesis import settings

from agent.daemon import daemon as daemon_module
from agent.host import PersonalityUnavailableError, SimulatedHost
from agent.services import _cpu_sysfs
from agent.services._wallclock import SystemClock

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path

    from agent.config import AgentConfig

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # Started in the background by a script (`cmd &` without job control ignores SIGINT),
    # the suite would hand that to every command it starts, and the tests that end one
    # with SIGINT (Ctrl-C) would wait for it in vain: Python's own handler, reset to the
    # default in a child, lets the child install its KeyboardInterrupt as usual.
    signal.signal(signal.SIGINT, signal.default_int_handler)

KERNEL_PERSONALITY = "kernel"
PERSONALITIES_UNDER_TEST = ("mainline", KERNEL_PERSONALITY)
"""The simulated mainline driver and the real one it models."""
SIMULATED_DRIVERS = ("mainline", "oracle")
"""The Linux driver (errnos, sticky interrupt) and Oracle's (statuses in ``hdr.rc``, one-shot
interrupt, an empty-mask wait invalid)."""


@pytest.fixture(autouse=True, scope="session")
def _children_keep_their_bytecode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every ``python`` a test starts reads its compiled modules from one cache of this run's
    (``PYTHONPYCACHEPREFIX``, outside the checkout): under ``PYTHONDONTWRITEBYTECODE`` (set
    on this machine) each of the suite's hundreds of ``vbox-agent`` processes compiled every
    module of the agent anew, about 0.1 s of CPU each."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        patch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield


@pytest.fixture(autouse=True)
def _machine_clock_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test in this process moves the machine's clock (CI runs as root, with CAP_SYS_TIME):
    a timesync service that would is a failing test. Tests of timesync pass their own clock."""

    def refuse(_clock: SystemClock, offset_ns: int) -> None:
        pytest.fail(f"a test tried to move this machine's clock by {offset_ns} ns")

    monkeypatch.setattr(SystemClock, "step", refuse)
    monkeypatch.setattr(SystemClock, "slew", refuse)


@pytest.fixture(autouse=True)
def _machine_cpus_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test in this process writes the machine's /sys (CI runs as root): the cpuhotplug
    tests give the service a tree of their own, and one that reaches /sys is a failing test."""
    write = _cpu_sysfs._write

    def guarded(path: Path, value: str) -> None:
        if os.path.realpath(path).startswith("/sys/"):
            pytest.fail(f"a test tried to write {value!r} to {path}")
        write(path, value)

    monkeypatch.setattr(_cpu_sysfs, "_write", guarded)


@pytest.fixture(autouse=True)
def _config_read_on_the_loop_under_autojump(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``autojump_clock`` the daemon's reload reads the file on the event loop: the
    clock jumps virtual time whenever every task waits, a task waiting for a worker thread
    too, so a reading on a thread would let a test's virtual time run ahead to its next
    deadline, its own ``fail_after`` among them. The reading's thread is tested on the real
    clock (``tests/daemon/test_daemon.py``)."""
    if "autojump_clock" not in request.fixturenames:
        return

    async def on_the_loop(
        load: Callable[[], AgentConfig], _limiter: trio.CapacityLimiter
    ) -> AgentConfig:
        await trio.lowlevel.checkpoint()
        return load()

    monkeypatch.setattr(daemon_module, "_load_off_the_loop", on_the_loop)


@pytest.fixture(autouse=True)
def _logging_config_restored() -> Iterator[None]:
    """Each test finds structlog as configured before it: a test that runs the CLI's
    ``main()`` configures logging (a level filter among it), which would otherwise hide the
    info lines of every later test from ``capture_logs``, so that a test's outcome depended
    on which tests ran before it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def kernel_library() -> Path:
    """The real driver library (built or found once per run): skip, or fail in CI, without it."""
    from testbed.realdriver import locate_library  # noqa: PLC0415 - only when asked for

    try:
        return locate_library()
    except PersonalityUnavailableError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the kernel personality is required in CI: {exc}")
        pytest.skip(f"kernel personality unavailable: {exc}")


@pytest.fixture(params=PERSONALITIES_UNDER_TEST)
def personality(request: pytest.FixtureRequest) -> str:
    """Each of ``mainline`` and ``kernel`` (which needs :func:`kernel_library`)."""
    name: str = request.param
    if name == KERNEL_PERSONALITY:
        request.getfixturevalue("kernel_library")
    return name


@pytest.fixture(name="host", params=SIMULATED_DRIVERS)
async def _host(request: pytest.FixtureRequest) -> AsyncIterator[SimulatedHost]:
    host = SimulatedHost(personality=request.param)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()
