"""A stop or reload signal that comes before the daemon handles signals waits for it; one
that comes after is discarded.

Rules of this test module:
- Real ``vbox-agent run --simulate`` processes, started through a wrapper that holds the
  start-up just before ``trio.run`` (config loaded, logging configured: the last step before
  the daemon's signal handling), or the exit once ``main`` returned, until the test writes
  a line to its stdin, after saying so on stderr; the signal is sent in that window, on that
  event.
- Every wait is bounded and waits on a condition (a line, an exit); every process is killed
  in teardown.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Final

import pytest

from agent.cli import HELD_SIGNALS, main
from agent.daemon.signals import SIGNALS

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

WAIT_S: Final = 30.0
HOLDING: Final = b"holding before trio.run\n"
WRAPPER: Final = f"""
import sys
import agent.cli._run as run

freeze = run._freeze_start_up_objects

def held():
    sys.stderr.buffer.write({HOLDING!r})
    sys.stderr.flush()
    sys.stdin.readline()
    freeze()

run._freeze_start_up_objects = held
from agent.cli import HELD_SIGNALS, main
from agent.daemon.signals import SIGNALS
sys.exit(main(sys.argv[1:]))
"""
"""``python -c WRAPPER run ...``: the agent, held where its start-up would meet a signal
with the signal's default action."""


ENDED: Final = b"holding the exit\n"
AT_EXIT: Final = f"""
import sys
from agent.cli import main

code = main()
sys.stderr.buffer.write({ENDED!r})
sys.stderr.flush()
sys.stdin.readline()
sys.exit(code)
"""
"""``python -c AT_EXIT run ...``: the agent as the console script runs it (``main()`` on the
process's command line), held once ``main`` returned, where the interpreter exits."""


@pytest.fixture(name="agent")
def _agent(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    config = tmp_path / "agent.toml"
    config.write_text('[log]\nformat = "json"\n')
    process = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, "run", "--simulate", "--config", str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=WAIT_S)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _read_line(process: subprocess.Popen[bytes], stream: int, wanted: bytes) -> bytes:
    """Read ``stream`` (a pipe from ``process``) until a line ``wanted`` is in it; return all."""
    read = b""
    deadline = time.monotonic() + WAIT_S
    while not any(wanted in line for line in read.split(b"\n")[:-1]):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"never read {wanted!r}; got {read!r}"
        ready, _, _ = select.select([stream], [], [], remaining)
        if ready:
            chunk = os.read(stream, 65536)
            assert chunk, f"the agent exited (code {process.wait()}) before {wanted!r}: {read!r}"
            read += chunk
    return read


def _signal_while_held(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Wait until ``process`` holds before ``trio.run``, send ``signum``, let it go on."""
    assert process.stderr is not None
    assert process.stdin is not None
    _read_line(process, process.stderr.fileno(), HOLDING.strip())
    process.send_signal(signum)
    process.stdin.write(b"\n")
    process.stdin.flush()


def _events(output: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_an_early_stop_signal_is_a_clean_stop(
    agent: subprocess.Popen[bytes], signum: signal.Signals
) -> None:
    """SIGTERM or SIGINT while the agent still loads (its default action would end the
    process: killed, or a KeyboardInterrupt) stops it as soon as it handles signals: exit 0."""
    _signal_while_held(agent, signum)
    stdout, _ = agent.communicate(timeout=WAIT_S)
    assert agent.returncode == 0
    received = [e["signal"] for e in _events(stdout) if e["event"] == "signal_received"]
    assert received == [signum.name]


def test_an_early_sighup_is_skipped_not_the_end(agent: subprocess.Popen[bytes]) -> None:
    """SIGHUP while the agent still loads (its default action ends the process, which
    systemd counts as clean) is a reload skipped before READY=1; the agent runs on until
    SIGTERM."""
    assert agent.stdout is not None
    _signal_while_held(agent, signal.SIGHUP)
    output = _read_line(agent, agent.stdout.fileno(), b'"config_reload_skipped"')
    assert agent.poll() is None
    agent.send_signal(signal.SIGTERM)
    rest, _ = agent.communicate(timeout=WAIT_S)
    assert agent.returncode == 0
    skipped = [e for e in _events(output) if e["event"] == "config_reload_skipped"]
    assert [e["reason"] for e in skipped] == ["the agent is starting or stopping"]
    assert "shutdown_requested" in [e["event"] for e in _events(output + rest)]


def test_run_leaves_the_signal_mask_as_it_found_it(tmp_path: Path) -> None:
    """``run`` holds the signals only while it runs: a run that ends early (a bad config
    here) leaves the caller's mask as it was."""
    config = tmp_path / "agent.toml"
    config.write_text("[daemon]\nshutdown_timeout_s = -1\n")
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert main(["run", "--config", str(config)]) == 78
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_run_holds_exactly_the_signals_the_daemon_handles() -> None:
    """``run`` holds what the daemon's signal task unblocks: a signal held and never
    unblocked would never reach the agent, one unblocked and not held is not protected."""
    assert set(HELD_SIGNALS["run"]) == set(SIGNALS)


def test_a_signal_after_the_run_is_discarded(tmp_path: Path) -> None:
    """SIGHUP, SIGTERM and SIGINT once the agent stopped and the interpreter exits (their
    default actions would kill it) change nothing: exit 0."""
    config = tmp_path / "agent.toml"
    config.write_text('[log]\nformat = "json"\n')
    command = ["run", "--simulate", "--duration", "0.5", "--config", str(config)]
    with subprocess.Popen(
        [sys.executable, "-c", AT_EXIT, *command],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as agent:
        try:
            assert agent.stderr is not None
            _read_line(agent, agent.stderr.fileno(), ENDED.strip())
            for signum in SIGNALS:
                agent.send_signal(signum)
            agent.communicate(b"\n", timeout=WAIT_S)
        finally:
            agent.kill()
    assert agent.returncode == 0
