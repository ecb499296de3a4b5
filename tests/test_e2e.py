"""End to end: the real agent process against a simulated host in another process.

Rules of this test module:
- Two real processes (``python -m agent simulate`` and ``python -m agent run``) talk over
  a Unix socket in a short /tmp directory; ``python -m agent host`` inspects the host.
- Every wait is bounded (``WAIT_S``) and every process is killed in teardown.
- Agent log lines are JSON (stdout is a pipe), read line by line.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent.cli._exit import EX_CONFIG, EX_UNAVAILABLE
from agent.config import LISTED_PROBLEMS
from agent.device.unix import HOST_START_WAIT_S, VERSION_WAIT_S
from testbed.realdriver import ENV_LIBRARY
from tests.cli_support import Simulator, hung_host, wait_until
from tests.conftest import KERNEL_PERSONALITY

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

WAIT_S = 20.0
PYTHON = sys.executable
LOADED_SIMULATOR = """
import json, sys
from agent.cli import main
code = main(sys.argv[1:])
loaded = sorted(name for name in sys.modules if name.split(".")[:2] == ["agent", "host"])
print(json.dumps(loaded), file=sys.stderr)
sys.exit(code)
"""
"""Runs ``vbox-agent ARGS`` in-process, then prints the agent.host modules it loaded."""
LOADED_OF = """
import json, sys
from agent.cli import main
asked = sys.argv[1].split(",")
code = main(sys.argv[2:])
print(json.dumps(sorted(name for name in asked if name in sys.modules)), file=sys.stderr)
sys.exit(code)
"""
"""Runs ``vbox-agent ARGS`` in-process (argv: MODULE,MODULE... ARGS), then prints which of
the modules named it loaded."""
SOCKET_CODE = ("agent.device.unix", "agent.protocol.wire")
CHUNK_CODE = (
    "agent.services.balloon._chunks",
    "agent.services.balloon._handover",
    "agent.services.balloon._walker",
)


def _loaded(modules: Sequence[str], argv: list[str]) -> tuple[int, list[str]]:
    """Run ``vbox-agent ARGV`` in a fresh interpreter: its exit code, and which of
    ``modules`` it imported."""
    result = subprocess.run(
        [PYTHON, "-c", LOADED_OF, ",".join(modules), *argv],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    loaded: list[str] = json.loads(result.stderr.splitlines()[-1])
    return result.returncode, loaded


def _loaded_simulator(args: list[str]) -> list[str]:
    """Run ``vbox-agent run ARGS --duration 1`` in a fresh interpreter, which must exit 0;
    return the agent.host modules it imported."""
    result = subprocess.run(
        [PYTHON, "-c", LOADED_SIMULATOR, "run", *args, "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stderr.splitlines()[-1])
    return loaded


class AgentProcess:
    """The agent under test, with its JSON log lines."""

    def __init__(self, socket_path: Path, workdir: Path) -> None:
        self.notify_path = workdir / "notify.sock"
        self.process = subprocess.Popen(
            [PYTHON, "-m", "agent", "run", "--device", f"unix:{socket_path}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.events: list[dict[str, Any]] = []
        self._pending = b""

    def finish(self) -> tuple[int, str]:
        """Kill the agent if it still runs; return its exit code and stderr, closing pipes."""
        if self.process.poll() is None:
            self.process.kill()
        _, stderr = self.process.communicate(timeout=WAIT_S)
        return self.process.returncode, stderr.decode()

    def read_until(self, event: str) -> dict[str, Any]:
        """Return the first log line whose event is ``event``, reading as needed."""
        deadline = time.monotonic() + WAIT_S
        while True:
            for line in self.events:
                if line.get("event") == event:
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"agent never logged {event!r}; saw {[e['event'] for e in self.events]}"
                )
            assert self.process.stdout is not None
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    pytest.fail(f"agent exited before logging {event!r}")
                self._pending += chunk
                *lines, self._pending = self._pending.split(b"\n")
                self.events.extend(json.loads(line) for line in lines if line.strip())


@pytest.fixture(name="workdir")
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vbx-e2e-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="host_socket")
def _host_socket(workdir: Path, personality: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A ``simulate`` process of each personality under test (``tests/conftest.py``)."""
    socket_path = workdir / "host.sock"
    env = dict(os.environ)
    if personality == KERNEL_PERSONALITY:
        env[ENV_LIBRARY] = str(request.getfixturevalue("kernel_library"))
    host = Simulator(str(socket_path), workdir / "host.log", "--personality", personality, env=env)
    yield socket_path
    exited = host.process.poll()
    try:
        code = host.stop(signal.SIGTERM) if exited is None else exited
    finally:
        if host.process.poll() is None:
            host.stop(signal.SIGKILL)
    log = (workdir / "host.log").read_text()[-3000:]
    assert exited is None, log
    assert code == 0, f"the host exited {code} on SIGTERM: {log}"


@pytest.fixture(name="agent")
def _agent(host_socket: Path, workdir: Path) -> Iterator[AgentProcess]:
    agent = AgentProcess(host_socket, workdir)
    yield agent
    agent.finish()


def _host(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "agent", "host", "--socket", str(socket_path), *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


def _run(*args: str, timeout: float = WAIT_S) -> subprocess.CompletedProcess[str]:
    """``vbox-agent run ARGS`` to its end, output captured."""
    return subprocess.run(
        [PYTHON, "-m", "agent", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _status(socket_path: Path) -> dict[str, Any]:
    result = _host(socket_path, "status", "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


class TestTwoProcesses:
    """The agent and the simulated host as separate processes."""

    def test_host_sees_what_the_agent_did(
        self, agent: AgentProcess, host_socket: Path, personality: str
    ) -> None:
        """Once ready, the host shows the agent's facility Active and its event filter."""
        agent.read_until("agent_ready")
        status = _status(host_socket)
        assert status["personality"] == personality
        assert status["facilities"]["100"]["status"] == 50
        assert status["filter_mask"] & 0x10

    def test_restore_reaches_the_agent(self, agent: AgentProcess, host_socket: Path) -> None:
        """``host restore`` makes the agent log the new session id the host reports."""
        agent.read_until("agent_ready")
        assert _host(host_socket, "restore").returncode == 0
        restored = agent.read_until("vm_restored")
        assert int(restored["session_id"], 16) == _status(host_socket)["session_id"]

    def test_sigterm_stops_the_agent_cleanly(self, agent: AgentProcess, host_socket: Path) -> None:
        """SIGTERM ends the agent with exit 0, facility Terminated, before any deadline of
        the stop: no drain, report or close is given up on (``*_abandoned``)."""
        agent.read_until("agent_ready")
        agent.process.send_signal(signal.SIGTERM)
        agent.read_until("agent_stopped")
        assert agent.process.wait(timeout=WAIT_S) == 0
        assert [e["event"] for e in agent.events if e["event"].endswith("_abandoned")] == []
        status = _status(host_socket)
        assert status["facilities"]["100"]["status"] == 101
        assert status["hgcm_clients"] == 0

    def test_agent_killed_releases_its_sessions(
        self, agent: AgentProcess, host_socket: Path
    ) -> None:
        """A vanished agent leaves no event filter bits and no session behind at the host."""
        agent.read_until("agent_ready")
        running = _status(host_socket)
        assert running["filter_mask"] & 0x10
        assert running["sessions"] > 0
        agent.process.kill()
        assert agent.process.wait(timeout=WAIT_S) == -signal.SIGKILL

        def released() -> bool:
            status = _status(host_socket)
            return status["sessions"] == 0 and not status["filter_mask"] & 0x10

        wait_until(released, "the session and its filter bit released")

    def test_vanished_host_ends_the_agent(self, workdir: Path) -> None:
        """Killing the host makes the agent exit promptly with EX_UNAVAILABLE (69), and its
        log says why (the reason was only on stderr, outside the JSON lines)."""
        socket_path = workdir / "gone.sock"
        host = Simulator(str(socket_path), workdir / "gone.log")
        try:
            agent = AgentProcess(socket_path, workdir)
            try:
                agent.read_until("agent_ready")
                host.stop(signal.SIGKILL)
                lost = agent.read_until("device_lost")
                assert lost["level"] == "critical"
                assert "is gone" in lost["error"]
                assert agent.process.wait(timeout=WAIT_S) == 69
            finally:
                code, stderr = agent.finish()
            assert code == 69
            assert "vbox-agent:" in stderr
        finally:
            if host.process.poll() is None:
                host.stop(signal.SIGKILL)

    def test_agent_started_before_the_host(self, workdir: Path) -> None:
        """An agent started first logs that it waits, then runs once the host listens."""
        socket_path = workdir / "late.sock"
        agent = AgentProcess(socket_path, workdir)
        try:
            waiting = agent.read_until("waiting_for_simulated_host")
            assert waiting["limit_s"] == HOST_START_WAIT_S
            host = Simulator(str(socket_path), workdir / "late.log")
            try:
                agent.read_until("agent_ready")
            finally:
                host.stop(signal.SIGKILL)
        finally:
            agent.finish()

    def test_missing_device_exits_69(self, workdir: Path) -> None:
        """No host listening: it waits the bounded time, then one line naming the socket, 69."""
        result = _run("--device", f"unix:{workdir / 'none.sock'}")
        assert result.returncode == 69
        assert [json.loads(line)["event"] for line in result.stdout.splitlines()] == [
            "waiting_for_simulated_host"
        ]
        assert "none.sock" in result.stderr
        assert f"waited {HOST_START_WAIT_S:g} s for it" in result.stderr
        assert len(result.stderr.splitlines()) == 1

    def test_a_host_that_answers_no_ioctl_exits_69(self, workdir: Path) -> None:
        """A host that answers HELLO and then nothing (hung): the session is closed after
        ``VERSION_WAIT_S`` without an answer to the version query and one line says so, 69,
        and nothing else (the agent waited for it forever)."""
        path = workdir / "hung.sock"
        with hung_host(str(path)):
            result = _run("--device", f"unix:{path}")
        assert result.returncode == EX_UNAVAILABLE
        assert result.stdout == ""
        assert result.stderr == (
            f"vbox-agent: unix:{path} did not answer the driver version query within "
            f"{VERSION_WAIT_S:g} s\n"
        )

    def test_duration_over_before_the_device_opened_exits_69(self, workdir: Path) -> None:
        """--duration elapsing while the agent still waits for its host: a warning and one
        line saying the device was never reached, 69 (it exited 0 as if it had run)."""
        device = f"unix:{workdir / 'typo.sock'}"
        result = _run("--device", device, "--duration", "0.5")
        assert result.returncode == 69
        events = [json.loads(line) for line in result.stdout.splitlines()]
        assert [(e["event"], e.get("device")) for e in events][-1] == (
            "device_never_reached",
            device,
        )
        assert result.stderr == (
            f"vbox-agent: {device} was never reached: --duration 0.5 s elapsed first\n"
        )

    def test_sigterm_before_the_device_opened_exits_0(self, workdir: Path) -> None:
        """SIGTERM while the agent waits for its host is a clean stop, 0, with the warning."""
        agent = AgentProcess(workdir / "late.sock", workdir)
        try:
            agent.read_until("waiting_for_simulated_host")
            agent.process.send_signal(signal.SIGTERM)
            assert agent.read_until("device_never_reached")["level"] == "warning"
            assert agent.process.wait(timeout=WAIT_S) == 0
        finally:
            agent.finish()

    def test_device_that_is_not_a_socket_exits_78(self, workdir: Path) -> None:
        """A device path that exists and is not a socket: one line at once, no wait, 78 as
        for a character-device path that cannot be the device (69 had systemd restart it)."""
        not_a_socket = workdir / "file"
        not_a_socket.write_text("")
        result = _run("--device", f"unix:{not_a_socket}")
        assert result.returncode == 78
        assert result.stdout == ""
        assert result.stderr.strip().endswith(f"{not_a_socket}: it exists and is not a socket")
        assert len(result.stderr.splitlines()) == 1

    def test_a_device_path_that_cannot_be_the_device_is_a_config_error(self, workdir: Path) -> None:
        """A [device] path that exists and is not a vboxguest node (a regular file answers
        the handshake with ENOTTY, a directory is EISDIR) exits 78, which the unit does not
        restart, with one line naming the path; a missing node stays 69 (it may come)."""
        regular = workdir / "passwd"
        regular.write_text("root:x:0:0::/root:/bin/sh\n")
        config = workdir / "agent.toml"
        for path, code, reason in (
            (regular, 78, "it did not answer the vboxguest version handshake (ENOTTY)"),
            (workdir, 78, "cannot be the vboxguest device: Is a directory (EISDIR)"),
            (workdir / "vboxguest", 69, "does not exist"),
        ):
            config.write_text(f'[device]\npath = "{path}"\n')
            result = _run("--config", str(config))
            assert (result.returncode, result.stdout) == (code, "")
            [line] = result.stderr.splitlines()
            assert line.startswith(f"vbox-agent: {path} ")
            assert reason in line

    def test_why_it_did_not_start_is_an_error_in_the_journal(self, workdir: Path) -> None:
        """Under systemd (stdout and stderr both the journal) why it did not start is one
        JSON line at priority err (``<3>``), as every other line the agent logs there, so
        ``journalctl -p err`` and ``-o json`` users see it; no plain copy beside it."""
        config = workdir / "agent.toml"
        config.write_text('[log]\nlevel = "loud"\n[device]\nioctl_threads = 1\n')
        device = workdir / "vboxguest"
        journal = workdir / "journal"
        for argv, code, event, said in (
            (
                ["--config", str(config)],
                78,
                "config_invalid",
                {
                    "path": str(config),
                    "errors": [
                        f"{config}: device.ioctl_threads = 1: must be >= 4",
                        f"{config}: log.level = \"loud\": must be one of 'debug', 'info', "
                        "'warning' or 'error'",
                    ],
                },
            ),
            (
                ["--device", str(device)],
                69,
                "device_unavailable",
                {
                    "error": f"{device} does not exist: load the vboxguest kernel module "
                    "(modprobe vboxguest), or name the right device node (--device, or run's "
                    "[device] path)"
                },
            ),
        ):
            with journal.open("w") as stream:
                status = os.fstat(stream.fileno())
                result = subprocess.run(
                    [PYTHON, "-m", "agent", "run", *argv],
                    stdout=stream,
                    stderr=stream,
                    env={**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"},
                    timeout=WAIT_S,
                    check=False,
                )
            assert result.returncode == code
            [line] = journal.read_text().splitlines()
            assert line.startswith("<3>{"), line
            logged = json.loads(line.removeprefix("<3>"))
            assert (logged["event"], logged["level"]) == (event, "error")
            assert said.items() <= logged.items()

    def test_a_file_of_hundreds_of_problems_reaches_the_journals_socket(
        self, workdir: Path
    ) -> None:
        """Under systemd stdout is a stream socket to journald: a file of 400 problems is one
        ``config_invalid`` line listing the first ``LISTED_PROBLEMS`` and how many more. The
        line of them all was longer than the log stream queues, and the agent exited 78
        writing nothing, a unit left down with an empty journal."""
        config = workdir / "agent.toml"
        config.write_text("".join(f"[section_{n}]\nkey = 1\n" for n in range(400)))
        journal, agent_end = socket.socketpair()
        with journal, agent_end:
            status = os.fstat(agent_end.fileno())
            process = subprocess.Popen(
                [PYTHON, "-m", "agent", "run", "--config", str(config)],
                stdout=agent_end.fileno(),
                stderr=agent_end.fileno(),
                env={**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"},
            )
            try:
                agent_end.close()
                journal.settimeout(WAIT_S)
                received = b""
                while chunk := journal.recv(65536):  # until the agent's end closes at its exit
                    received += chunk
                assert process.wait(WAIT_S) == EX_CONFIG
            finally:
                process.kill()
                process.wait()
        [line] = received.decode().splitlines()
        logged = json.loads(line.removeprefix("<3>"))
        assert (logged["event"], len(logged["errors"])) == ("config_invalid", LISTED_PROBLEMS + 1)
        assert logged["errors"][-1].startswith(f"and {400 - LISTED_PROBLEMS} more problems")

    def test_a_real_agent_loads_no_simulator(self, host_socket: Path) -> None:
        """``run --device`` imports nothing from agent.host (the control, ``run --simulate``,
        which does, needs no host process: :meth:`test_a_simulated_agent_loads_the_simulator`)."""
        assert _loaded_simulator(["--device", f"unix:{host_socket}"]) == []

    def test_a_simulated_agent_loads_the_simulator(self) -> None:
        """``run --simulate`` imports agent.host (control): the check above sees such imports."""
        assert _loaded_simulator(["--simulate"]) != []

    def test_an_agent_on_the_character_device_loads_no_socket_code(self) -> None:
        """``run --device PATH`` imports neither the simulated host's socket client nor its
        framing (``agent.protocol.wire``): a real agent carries none of that code."""
        code, loaded = _loaded(SOCKET_CODE, ["run", "--device", "/dev/no-such-vboxguest"])
        assert code == EX_UNAVAILABLE
        assert loaded == []

    def test_only_a_balloon_of_the_agents_own_memory_loads_the_chunk_code(self) -> None:
        """Where the driver holds the balloon (mainline: kernel mode) the agent imports no
        chunk allocator, handover or walker; where the agent holds it (passthrough) it does."""
        for personality, expected in (("mainline", []), ("passthrough", sorted(CHUNK_CODE))):
            args = ["run", "--simulate", "--personality", personality, "--duration", "1"]
            code, loaded = _loaded(CHUNK_CODE, args)
            assert code == 0
            assert loaded == expected, personality


class TestSimulateDemo:
    """The README's first command."""

    def test_run_simulate_plays_the_demo(self) -> None:
        """``run --simulate --duration`` shows the agent at work and exits 0."""
        result = _run("--simulate", "--duration", "6", timeout=WAIT_S + 10)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines() if line]
        events = [line["event"] for line in lines]
        assert "agent_ready" in events
        assert "scenario_step" in events
        assert events[-1] == "agent_stopped"
        # The simulated driver runs in the calling service's task, but its lines are its own:
        # the host's component, none of the service's context (they read as the agent's).
        denied = [line for line in lines if line["event"] == "vmm_request_denied"]
        # The balloon's and the heartbeat's requests, by name (they used to be 111 and 220)
        assert {line["request"] for line in denied} >= {
            "GET_MEMBALLOON_CHANGE_REQ",
            "HEARTBEAT_CONFIGURE",
        }
        assert {line.get("component") for line in denied} == {"simulated-host"}
        host_lines = [line for line in lines if line.get("component") == "simulated-host"]
        assert not [line for line in host_lines if "service" in line]
        assert "heartbeat" in {line.get("service") for line in lines}
        assert "component" not in next(line for line in lines if line["event"] == "agent_ready")

    def test_failing_host_exits_69(self, workdir: Path) -> None:
        """A simulated VM whose driver fails to load after a reset: exit 69, as no device."""
        scenario = workdir / "failing.toml"
        scenario.write_text(
            "[[steps]]\nat = 0.5\naction = 'fault'\nrequest = 'GET_HOST_VERSION'\n"
            "status = 'VERR_NOT_SUPPORTED'\n\n"
            "[[steps]]\nat = 0.5\naction = 'reset'\n"
        )
        result = _run("--simulate", "--scenario", str(scenario))
        assert result.returncode == 69, result.stderr
        assert "GET_HOST_VERSION VERR_NOT_SUPPORTED" in result.stderr

    def test_a_vm_reset_ends_the_agent_with_69(self, workdir: Path) -> None:
        """A reset of the simulated VM under ``run --simulate`` loses the agent's device: it
        exits 69 with a ``device_lost`` line, as systemd expects to restart it on the new
        boot, instead of running on, to exit 0, on sessions that only fail."""
        scenario = workdir / "reset.toml"
        scenario.write_text("[[steps]]\nat = 1.0\naction = 'reset'\n")
        result = _run("--simulate", "--scenario", str(scenario), "--duration", "15")
        assert result.returncode == EX_UNAVAILABLE, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines() if line]
        lost = [line for line in lines if line["event"] == "device_lost"]
        assert [line["level"] for line in lost] == ["critical"]
        assert "the device is gone (ENODEV)" in result.stderr


class TestReadme:
    """The README's two-process example, pasted as written."""

    def test_two_process_example(self, workdir: Path) -> None:
        """Every paste succeeds: the host serves each command and the agent stops with 0."""
        socket_path = workdir / "host.sock"
        script = readme_block(TWO_PROCESS_INTRO).replace(README_SOCKET, str(socket_path))
        environment = dict(os.environ, PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
        assert shutil.which("vbox-agent", path=environment["PATH"]) is not None
        bash = shutil.which("bash")
        assert bash is not None
        for attempt in range(README_PASTES):
            # -e: the paste fails if any command in it does (the agent's own status included).
            result = subprocess.run(
                [bash, "-e", "-c", script],
                capture_output=True,
                text=True,
                timeout=4 * WAIT_S,
                check=False,
                env=environment,
            )
            assert result.returncode == 0, (attempt, result.stdout[-3000:], result.stderr)
            lines = [json.loads(line) for line in result.stdout.splitlines() if line[:1] == "{"]
            status = next(line for line in lines if "balloon" in line and "personality" in line)
            assert status["balloon"]["target_mb"] == 512
            served = [line["command"] for line in lines if line.get("event") == "control_command"]
            assert served == ["balloon", "prop_set", "restore", "stats_interval", "status"]
            assert "agent_stopped" in {line.get("event") for line in lines}
            assert not socket_path.exists()

    def test_cpu_hotplug_scratch_tree(self, workdir: Path) -> None:
        """The CPU hot-plug recipe, pasted as written (its paths moved to a private
        directory): the agent takes cpu1 offline and ejects it, then brings it back."""
        script = (
            readme_block(CPU_INTRO)
            .replace("/tmp/cpu.sock", str(workdir / "cpu.sock"))
            .replace("/tmp/cpus", str(workdir / "cpus"))
        )
        environment = dict(os.environ, PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
        bash = shutil.which("bash")
        assert bash is not None
        result = subprocess.run(
            [bash, "-e", "-c", script],
            capture_output=True,
            text=True,
            timeout=4 * WAIT_S,
            check=False,
            env=environment,
        )
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr)
        lines = result.stdout.splitlines()
        assert [line for line in lines if line[:1] != "{"] == ["0", "1"]
        events = [json.loads(line).get("event") for line in lines if line[:1] == "{"]
        changes = {"cpu_unplugged", "cpu_plugged", "cpu_unplug_failed", "cpu_plug_failed"}
        assert [event for event in events if event in changes] == [
            "cpu_unplugged",
            "cpu_plugged",
        ]
        cpu1 = workdir / "cpus/devices/system/cpu/cpu1"
        assert (cpu1 / "firmware_node/eject").read_text().strip() == "1"


TWO_PROCESS_INTRO = "A simulated host in its own process"
CPU_INTRO = "`host cpu plug|unplug CORE"
README_SOCKET = "/tmp/host.sock"
README_PASTES = 3
"""How many times the test pastes the example (it once lost a race one time in seven)."""


def readme_block(intro: str) -> str:
    """The first ``sh`` code block of README.md after the paragraph starting with ``intro``."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    found = re.search(re.escape(intro) + r".*?```sh\n(.*?)```", readme, re.DOTALL)
    assert found is not None, f"README.md has no sh block after {intro!r}"
    return found.group(1)
