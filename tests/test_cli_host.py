"""End-to-end tests of ``vbox-agent simulate`` and ``vbox-agent host`` as two real processes.

Rules of this test module:
- every command runs as its own ``python -m agent`` process (``tests/cli_support.py``);
- the socket lives in a short private directory under /tmp (``sun_path`` holds 108 bytes);
- every wait is bounded: subprocess timeouts, and the simulator's "listening" line;
- the simulator is always reaped: terminated or killed in the fixture's teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.cli._exit import EX_IOERR, EX_UNAVAILABLE
from agent.cli._host import CONTROL_TIMEOUT_S, _call as host_call
from agent.host.control import HostUnreachableError
from agent.protocol.wire import ControlReply, FrameDecoder, Hello, Role, encode_frame
from tests.cli_support import COMMAND_TIMEOUT_S, LISTENING, Simulator, agent, host
from tests.test_cli_commands import FULL_DISK_LINE, run_into_full_disk

if TYPE_CHECKING:
    from collections.abc import Iterator

    import trio

RAM_MB = 1024
"""The simulator's RAM: the balloon may reach 921 MB (90 %) exclusive."""


@pytest.fixture(name="socket_dir")
def _socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="vbx-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(name="socket_path")
def _socket_path(socket_dir: Path) -> str:
    return str(socket_dir / "host.sock")


@pytest.fixture(name="simulator")
def _simulator(socket_path: str, socket_dir: Path) -> Iterator[Simulator]:
    simulator = Simulator(socket_path, socket_dir / "host.log", "--ram-mb", str(RAM_MB))
    yield simulator
    if simulator.process.returncode is None:
        simulator.stop(signal.SIGKILL)


class TestHostCommands:
    """``vbox-agent host`` controls a running simulator."""

    def test_balloon_and_status(self, simulator: Simulator) -> None:
        """The balloon target set by one process shows in the status another reads."""
        assert host(simulator.path, "balloon", "512").returncode == 0
        status = host(simulator.path, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["balloon"]["target_mb"] == 512
        plain = host(simulator.path, "status")
        assert "personality: mainline" in plain.stdout.splitlines()
        assert "additions_reported: true" in plain.stdout.splitlines()  # JSON's, not Python's
        assert '"target_mb": 512' in plain.stdout

    def test_stats_interval_shows_in_status(self, simulator: Simulator) -> None:
        """The statistics interval set from the command line shows in ``guest_stats``."""
        assert host(simulator.path, "stats-interval", "7").returncode == 0
        status = json.loads(host(simulator.path, "status", "--json").stdout)
        expected: dict[str, object] = {
            "interval_s": 7,
            "reports": 0,
            "last": None,
            "main": {},
            "metrics": {},
        }
        assert status["guest_stats"] == expected
        for bad in ("-1", "4294967296", "soon"):
            result = host(simulator.path, "stats-interval", bad)
            assert result.returncode == 64, (bad, result.stderr)
            assert "argument SECONDS: " in result.stderr
            assert "is not an integer in [0, 4294967295]" in result.stderr

    def test_balloon_refusal_matches_its_message(self, simulator: Simulator) -> None:
        """The refusal names the range [0, 920]; both ends pass and 921 (90 %) is refused."""
        refused = host(simulator.path, "balloon", "921")
        assert refused.returncode == 1
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "must be in range [0, 920] MB" in refused.stderr
        for accepted in ("920", "0"):
            result = host(simulator.path, "balloon", accepted)
            assert result.returncode == 0, (accepted, result.stderr)
        assert host(simulator.path, "balloon", str(2**40)).returncode == 1

    def test_cpu_without_a_monitoring_guest(self, simulator: Simulator) -> None:
        """With no agent to enable CPU hot-plug, unplug is refused (exit 1) with
        VERR_RESOURCE_BUSY on one line, plug succeeds with its notification lost (as Main's
        Console), and ``status`` shows the VM's untouched slot."""
        refused = host(simulator.path, "cpu", "unplug", "1", "--package", "0")
        assert refused.returncode == 1, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert "VERR_RESOURCE_BUSY" in refused.stderr
        plugged = host(simulator.path, "cpu", "plug", "1", "--package", "0")
        assert plugged.returncode == 0, plugged.stderr
        status = json.loads(host(simulator.path, "status", "--json").stdout)
        assert status["cpu_hotplug"] == {
            "monitored": False,
            "event": "INVALID",
            "core": 0,
            "package": 0,
            "notified": 0,
        }

    def test_properties(self, simulator: Simulator) -> None:
        """Properties set from the command line read back, with flags in --json."""
        assert host(simulator.path, "prop", "set", "/VM/x", "hello").returncode == 0
        assert host(simulator.path, "prop", "get", "/VM/x").stdout == "hello\n"
        assert (
            host(simulator.path, "prop", "set", "/VM/y", "v", "--flags", "TRANSIENT").returncode
            == 0
        )
        got = json.loads(host(simulator.path, "prop", "get", "/VM/y", "--json").stdout)
        assert got["value"] == "v"
        assert "TRANSIENT" in got["flags"]
        assert host(simulator.path, "prop", "delete", "/VM/x").returncode == 0
        missing = host(simulator.path, "prop", "get", "/VM/x")
        assert missing.returncode == 1
        assert "/VM/x" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1

    def test_a_property_read_only_for_the_host_is_refused(self, simulator: Simulator) -> None:
        """Deleting or setting a property read-only for the host exits 1 with the service's
        status on one line, and the simulator runs on (it used to exit 70)."""
        locked = host(simulator.path, "prop", "set", "/VM/ro", "v", "--flags", "RDONLYHOST")
        assert locked.returncode == 0, locked.stderr
        for args in (("prop", "delete", "/VM/ro"), ("prop", "set", "/VM/ro", "w")):
            refused = host(simulator.path, *args)
            assert refused.returncode == 1, refused.stderr
            assert len(refused.stderr.splitlines()) == 1
            assert "failed: VERR_PERMISSION_DENIED (-10)" in refused.stderr
        assert host(simulator.path, "prop", "get", "/VM/ro").stdout == "v\n"
        assert simulator.process.poll() is None

    def test_events_faults_delays(self, simulator: Simulator) -> None:
        """Events, faults, delays, restore and drop are accepted."""
        for args in (
            ("event", "RESTORED"),
            ("event", "0x10"),
            ("fault", "CHANGE_MEMBALLOON", "VERR_NO_MEMORY", "--count", "2"),
            ("fault", "113", "-8"),
            ("delay", "GUEST_HEARTBEAT", "0.5"),
            ("restore",),
        ):
            result = host(simulator.path, *args)
            assert result.returncode == 0, (args, result.stderr)
        assert host(simulator.path, "drop").stdout == "dropped 0 device connection(s)\n"

    def test_queued_faults_and_delays_show_in_status_and_clear(self, simulator: Simulator) -> None:
        """``status`` (text and --json) lists the queued faults and the active delays;
        ``fault REQUEST --clear`` drops that type's faults, ``fault --clear`` every one,
        each saying how many answers it dropped."""
        for args in (
            ("fault", "CHANGE_MEMBALLOON", "VERR_NO_MEMORY", "--count", "2"),
            ("fault", "GET_SESSION_ID", "-10"),
            ("delay", "GUEST_HEARTBEAT", "0.5"),
        ):
            assert host(simulator.path, *args).returncode == 0, args
        status = json.loads(host(simulator.path, "status", "--json").stdout)
        assert status["faults"] == [
            {"request": "CHANGE_MEMBALLOON", "status": "VERR_NO_MEMORY", "remaining": 2},
            {"request": "GET_SESSION_ID", "status": "VERR_PERMISSION_DENIED", "remaining": 1},
        ]
        assert status["delays"] == {"GUEST_HEARTBEAT": 0.5}
        plain = host(simulator.path, "status").stdout.splitlines()
        assert (
            'faults: [{"request": "CHANGE_MEMBALLOON", "status": "VERR_NO_MEMORY", '
            '"remaining": 2}, {"request": "GET_SESSION_ID", "status": "VERR_PERMISSION_DENIED", '
            '"remaining": 1}]'
        ) in plain
        assert 'delays: {"GUEST_HEARTBEAT": 0.5}' in plain
        cleared = host(simulator.path, "fault", "CHANGE_MEMBALLOON", "--clear")
        assert cleared.stdout == "cleared 2 queued fault answer(s)\n", cleared.stderr
        remaining = json.loads(host(simulator.path, "status", "--json").stdout)["faults"]
        assert [fault["request"] for fault in remaining] == ["GET_SESSION_ID"]
        assert host(simulator.path, "fault", "--clear").stdout == (
            "cleared 1 queued fault answer(s)\n"
        )
        assert host(simulator.path, "delay", "GUEST_HEARTBEAT", "0").returncode == 0
        assert "faults: []" in host(simulator.path, "status").stdout.splitlines()
        status = json.loads(host(simulator.path, "status", "--json").stdout)
        assert (status["faults"], status["delays"]) == ([], {})

    def test_the_host_logs_each_command(self, simulator: Simulator) -> None:
        """The simulator logs every control command it served, refused ones with the reason."""
        assert host(simulator.path, "balloon", "512").returncode == 0
        assert host(simulator.path, "balloon", "5000").returncode == 1
        assert simulator.stop(signal.SIGTERM) == 0
        served = [
            line for line in simulator.log_lines() if line["event"].startswith("control_command")
        ]
        assert served[0]["event"] == "control_command"
        assert (served[0]["command"], served[0]["arguments"]) == ("balloon", {"mb": 512})
        assert served[0]["component"] == "simulated-host"
        assert served[1]["event"] == "control_command_refused"
        assert served[1]["arguments"] == {"mb": 5000}
        assert "invalid memory balloon size" in served[1]["error"]
        assert len(served) == 2


class TestSimulatorLifecycle:
    """The simulator starts, refuses bad arguments, and stops cleanly."""

    @pytest.mark.parametrize("argv", [["status"], ["status", "--json"]])
    def test_output_to_a_full_disk_is_one_line(self, simulator: Simulator, argv: list[str]) -> None:
        """``> /dev/full``: one line and exit 74 (it printed a traceback, exit 1)."""
        done = run_into_full_disk("host", "--socket", simulator.path, *argv)
        assert done == (EX_IOERR, FULL_DISK_LINE)

    def test_sigterm_exits_zero_and_removes_the_socket(self, simulator: Simulator) -> None:
        """SIGTERM ends the simulator with exit 0 and no socket left behind."""
        assert simulator.stop(signal.SIGTERM) == 0
        assert not os.path.exists(simulator.path)

    def test_sigint_exits_zero(self, simulator: Simulator) -> None:
        """SIGINT ends the simulator with exit 0 too."""
        assert simulator.stop(signal.SIGINT) == 0
        assert not os.path.exists(simulator.path)

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    def test_a_second_signal_while_it_stops_is_discarded(
        self, simulator: Simulator, signum: signal.Signals
    ) -> None:
        """Two stop signals back to back (``timeout`` sends SIGTERM to the command, then to
        its group) still end it with exit 0 and no socket: the second, left in trio's
        receiver, was delivered again to the default action once it closed (143, 130)."""
        simulator.process.send_signal(signum)
        assert simulator.stop(signum) == 0
        assert not os.path.exists(simulator.path)

    def test_a_sigterm_while_it_starts_stops_it_once_it_serves(
        self, socket_path: str, tmp_path: Path
    ) -> None:
        """SIGTERM before the host runs waits for it (held since ``main``): the host starts,
        says where it listens, and stops cleanly, exit 0 (the signal's default action ended
        it, 143, with its socket path cleared but nothing said)."""
        holding = "holding before the host is built"
        wrapper = (
            "import sys\n"
            "import agent.host\n"
            "built = agent.host.SimulatedHost\n"
            "def held(**settings):\n"
            f"    print({holding!r}, file=sys.stderr, flush=True)\n"
            "    sys.stdin.readline()\n"
            "    return built(**settings)\n"
            "agent.host.SimulatedHost = held\n"
            "from agent.cli import main\n"
            "sys.exit(main())\n"
        )
        with (tmp_path / "host.log").open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", wrapper, "simulate", "--socket", socket_path],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.PIPE,
                text=True,
            )
        try:
            assert process.stderr is not None
            assert process.stdin is not None
            assert process.stderr.readline().strip() == holding
            process.send_signal(signal.SIGTERM)
            process.stdin.write("go\n")
            process.stdin.flush()
            _, stderr = process.communicate(timeout=COMMAND_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=COMMAND_TIMEOUT_S)
        assert (process.returncode, stderr.startswith(LISTENING)) == (0, True)
        assert not os.path.exists(socket_path)

    def test_killed_simulator(self, simulator: Simulator) -> None:
        """After kill -9, a client call waits for a restart, then fails with one line, 69."""
        assert simulator.stop(signal.SIGKILL) == -signal.SIGKILL
        result = host(simulator.path, "status")
        assert result.returncode == 69
        assert simulator.path in result.stderr
        assert "waited 5 s for it to start" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1

    def test_second_simulator_on_a_live_socket(self, simulator: Simulator) -> None:
        """A second simulator on the same socket exits 69 and the first keeps serving."""
        second = agent("simulate", "--socket", simulator.path)
        assert second.returncode == 69
        assert "already listening" in second.stderr
        assert host(simulator.path, "status").returncode == 0

    def test_stale_socket_after_kill_is_replaced(
        self, simulator: Simulator, socket_dir: Path
    ) -> None:
        """A new simulator replaces the socket a killed one left behind."""
        simulator.stop(signal.SIGKILL)
        assert os.path.exists(simulator.path)
        replacement = Simulator(simulator.path, socket_dir / "replacement.log")
        try:
            assert host(simulator.path, "status").returncode == 0
        finally:
            assert replacement.stop(signal.SIGTERM) == 0

    def test_no_simulator(self, socket_path: str) -> None:
        """Without a simulator the host command exits 69 with one line."""
        result = host(socket_path, "status")
        assert result.returncode == 69
        assert "no simulated host" in result.stderr

    def test_path_that_is_not_a_socket(self, socket_path: str) -> None:
        """A file where the socket should be exits 69 at once, with one line saying so."""
        with open(socket_path, "w"):
            pass
        result = host(socket_path, "status")
        assert result.returncode == 69
        assert result.stderr.strip() == (
            f"vbox-agent host: no simulated host at {socket_path}: it exists and is not a socket"
        )

    def test_simulate_at_an_unusable_path(self, socket_dir: Path) -> None:
        """A socket path through a regular file exits 69 with one line, no traceback."""
        (socket_dir / "file").touch()
        path = str(socket_dir / "file" / "host.sock")
        result = agent("simulate", "--socket", path)
        assert result.returncode == EX_UNAVAILABLE
        assert result.stderr == (f"vbox-agent simulate: cannot listen at {path}: Not a directory\n")

    def test_usage_errors_create_no_socket(self, socket_path: str) -> None:
        """Bad simulator arguments exit 64 with the usage and create no socket."""
        result = agent("simulate", "--socket", socket_path, "--ram-mb", "0")
        assert result.returncode == 64
        assert result.stderr.startswith("usage: vbox-agent simulate")
        assert "argument --ram-mb: '0' is not an integer in [4, 2097152]" in result.stderr
        assert not os.path.exists(socket_path)


@contextmanager
def answering_host(path: str, answer: dict[str, object]) -> Iterator[None]:
    """A stand-in host at ``path`` (a thread) answering one control command with ``answer``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(COMMAND_TIMEOUT_S)

    def serve() -> None:
        connection, _ = listener.accept()
        connection.settimeout(COMMAND_TIMEOUT_S)
        replies = [encode_frame(Hello(Role.HOST)), encode_frame(ControlReply(answer))]
        decoder = FrameDecoder()
        with connection:
            while replies and (data := connection.recv(4096)):
                decoder.feed(data)
                while replies and decoder.next_frame() is not None:
                    connection.sendall(replies.pop(0))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield
    finally:
        thread.join(COMMAND_TIMEOUT_S)
        listener.close()


class TestOddHost:
    """A host whose answers do not fit the command gets one line and exit 69."""

    def test_a_path_not_utf8_is_named_as_every_command_names_it(self, socket_dir: Path) -> None:
        """The unexpected-result line showed an undecodable byte as ``\\udcff``."""
        path = os.fsdecode(bytes(socket_dir) + b"/\xff.sock")
        with answering_host(path, {"ok": True, "result": [1]}):
            result = host(path, "prop", "get", "x")
        assert result.returncode == EX_UNAVAILABLE
        assert f"host at {socket_dir}/\\xff.sock answered 'prop'" in result.stderr

    async def test_a_silent_host_at_a_path_not_utf8(
        self, socket_dir: Path, autojump_clock: trio.abc.Clock
    ) -> None:
        """The line for a host that never answers showed an undecodable byte as ``\\udcff``."""
        path = os.fsdecode(bytes(socket_dir) + b"/\xff.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(1)
            with pytest.raises(HostUnreachableError) as raised:
                await host_call(path, {"command": "status"})
        assert str(raised.value) == (
            f"the simulated host at {socket_dir}/\\xff.sock did not answer within "
            f"{CONTROL_TIMEOUT_S:g} s"
        )

    def test_a_drop_says_how_many_sessions_a_delay_holds(self, socket_path: str) -> None:
        """Connections whose session a delay holds are named as still closing."""
        answer = {"ok": True, "result": {"dropped": 2, "closing": 1}}
        with answering_host(socket_path, answer):
            result = host(socket_path, "drop")
        assert (result.returncode, result.stdout) == (
            0,
            "dropped 2 device connection(s); 1 still closing, behind a port write a delay holds "
            "(`host status` shows held_requests; `host delay REQUEST 0` releases them)\n",
        )

    @pytest.mark.parametrize(
        ("command", "answer", "told"),
        [
            (("prop", "get", "x"), {"ok": True, "result": {}}, "'prop' with an unexpected result"),
            (("prop", "get", "x"), {"ok": True, "result": [1]}, "unexpected result: [1]"),
            (("drop",), {"ok": True, "result": {"n": 1}}, "'drop' with an unexpected result"),
            (("drop",), {"ok": True, "result": {"dropped": 1}}, "unexpected result"),
            (("balloon", "5"), {"ok": False}, "malformed reply: {'ok': False}"),
            (("balloon", "5"), {"ok": 1, "error": "e"}, "malformed reply"),
        ],
    )
    def test_unexpected_answers(
        self, socket_path: str, command: tuple[str, ...], answer: dict[str, object], told: str
    ) -> None:
        """A result missing its fields raised KeyError (a traceback), a list printed nothing
        and exited 0, and ``ok: false`` without an error printed ``None``."""
        with answering_host(socket_path, answer):
            result = host(socket_path, *command)
        assert result.returncode == EX_UNAVAILABLE
        assert told in result.stderr
        assert len(result.stderr.splitlines()) == 1
