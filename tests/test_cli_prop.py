"""End to end: ``vbox-agent prop`` against ``vbox-agent simulate``, as separate processes.

Rules of this test module:
- every command is its own ``python -m agent`` process; the host is checked through
  ``vbox-agent host``, never in-process;
- the simulator runs each personality under test (``mainline`` and the real Linux driver,
  ``kernel``; see ``tests/conftest.py``), on a socket in a short private directory in /tmp;
  a test of what the command does with its arguments or its own output streams runs on
  ``mainline`` only (:data:`ONE_DRIVER`);
- every wait is bounded: subprocess timeouts and deadlines on polled host state;
- processes are always reaped (killed in teardown if still running).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from agent.cli import _prop, main
from agent.cli._exit import (
    EX_CONFIG,
    EX_IOERR,
    EX_OK,
    EX_REFUSED,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
)
from agent.cli._prop import _delete, _enum, _explain, _set, _wait
from agent.device import open_device
from agent.device.unix import HOST_START_WAIT_S, VERSION_WAIT_S, UnixSocketOpener
from agent.host import SimOpener, SimulatedHost
from agent.host.guest_props import GuestFunction, GuestPropertyService
from agent.protocol import VBoxStatusError
from agent.protocol.constants import Ioctl, RequestType
from agent.protocol.guest_props import RDONLYGUEST, SERVICE_NAME
from agent.protocol.prop_patterns import patterns_match
from agent.protocol.status import VERR_TIMEOUT, VINF_SUCCESS
from agent.services.guest_props import ENUM_TRIES, GuestProperties, open_guest_properties
from agent.services.hgcm import HgcmBufferIn
from testbed.realdriver import ENV_LIBRARY
from tests.cli_support import (
    REFUSALS,
    Refusal,
    Simulator,
    hung_host,
    refusing_stream,
    wait_until,
)
from tests.conftest import KERNEL_PERSONALITY
from tests.sim_support import HookedOpener, OverflowAsking
from tests.test_cli_commands import FULL_DISK_LINE, run_into_full_disk
from tests.test_e2e import readme_block

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from agent.device import DeviceOpener


PYTHON: Final = sys.executable
WAIT_S: Final = 30.0
EX_TRACEBACK: Final = 99
AGENT_WITHOUT_TRACEBACK: Final = (
    PYTHON,
    "-c",
    f"import os, sys; sys.excepthook = lambda *_: os._exit({EX_TRACEBACK}); "
    "from agent.cli import main; sys.exit(main())",
)
"""``python -m agent``, but an exception that ends it exits :data:`EX_TRACEBACK`, not 1,
which ``prop`` exits for a property not set."""
ONE_DRIVER: Final = pytest.mark.parametrize("personality", ["mainline"])
"""For a test of the command's arguments or output streams: what it checks happens before
the first call reaches the driver or after the last one returned, in the same code whatever
the driver, whose own calls the other tests run on each personality."""


class PropHost(Simulator):
    """A ``vbox-agent simulate`` process (:class:`tests.cli_support.Simulator`) and the
    ``prop`` and ``host`` commands that talk to it."""

    def __init__(self, workdir: Path, personality: str, env: dict[str, str]) -> None:
        self.socket = workdir / "host.sock"
        self.env = env
        super().__init__(
            str(self.socket), workdir / "host.log", "--personality", personality, env=env
        )

    @property
    def device(self) -> str:
        """The ``--device`` spec of this host."""
        return f"unix:{self.socket}"

    def prop(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``vbox-agent prop --device unix:SOCKET ARGS``."""
        return self.run("prop", "--device", self.device, *args)

    def host(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``vbox-agent host --socket SOCKET ARGS``; it must succeed."""
        done = self.run("host", "--socket", str(self.socket), *args)
        assert done.returncode == EX_OK, done.stderr
        return done

    def status(self) -> dict[str, object]:
        """The host's ``status --json``."""
        status: dict[str, object] = json.loads(self.host("status", "--json").stdout)
        return status

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``python -m agent ARGS`` to completion."""
        return subprocess.run(
            [PYTHON, "-m", "agent", *args],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
            env=self.env,
        )

    def finish(self) -> None:
        """Kill the host; it must not have died on its own."""
        assert not self.kill(), self.log_path.read_text()[-3000:]


@pytest.fixture(name="sim")
def _sim(personality: str, request: pytest.FixtureRequest) -> Iterator[PropHost]:
    workdir = Path(tempfile.mkdtemp(prefix="vbx-prop-", dir="/tmp"))
    env = dict(os.environ)
    if personality == KERNEL_PERSONALITY:
        env[ENV_LIBRARY] = str(request.getfixturevalue("kernel_library"))
    sim = PropHost(workdir, personality, env)
    try:
        yield sim
    finally:
        sim.finish()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def held_wait(sim: PropHost, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``prop wait ARGS`` in a process of its own, yielded once its call is held at the host;
    killed (if still running) and reaped afterwards."""
    waiter = subprocess.Popen(
        [PYTHON, "-m", "agent", "prop", "--device", sim.device, "wait", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=sim.env,
    )
    try:
        wait_until(lambda: sim.status()["hgcm_pending_calls"] == 1, "the wait at the host")
        yield waiter
    finally:
        waiter.kill()
        waiter.wait(timeout=WAIT_S)


@contextlib.asynccontextmanager
async def _props_ignored_by(host: SimulatedHost) -> AsyncIterator[GuestProperties]:
    """A property client on ``host`` once its service has the global RDONLYGUEST flag (the
    guest's writes and deletes are ignored, VINF_PERMISSION_DENIED)."""
    service = host.vmmdev.hgcm.service(SERVICE_NAME)
    assert isinstance(service, GuestPropertyService)
    service.set_global_flags(RDONLYGUEST)
    async with open_device(SimOpener(host)) as device, open_guest_properties(device) as props:
        yield props


def _beside(
    host: SimulatedHost, run: Callable[[argparse.Namespace, DeviceOpener], Awaitable[None]]
) -> Callable[[argparse.Namespace, DeviceOpener], Awaitable[None]]:
    """``prop``'s ``_run`` on ``host``, which runs in-process meanwhile, whatever device the
    command names; the command's failure is raised as ``_run`` raises it."""

    async def run_beside(args: argparse.Namespace, opener: DeviceOpener) -> None:
        del opener
        failure: Exception | None = None
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as vm:
                await vm.start(host.run)
                try:
                    await run(args, SimOpener(host))
                except Exception as exc:  # noqa: BLE001 - raised below, out of the nursery
                    failure = exc
                vm.cancel_scope.cancel()
        if failure is not None:
            raise failure

    return run_beside


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a failing command printed on stderr."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


class TestVerbs:
    def test_set_get_enum_delete(self, sim: PropHost) -> None:
        """Each verb works and the host sees the result; flags come back canonical."""
        assert sim.prop("set", "/Guest/a", "hello world", "--flags", "transreset").returncode == 0
        got = sim.prop("get", "/Guest/a")
        assert (got.returncode, got.stdout) == (EX_OK, "hello world\n")
        as_json = json.loads(sim.prop("get", "/Guest/a", "--json").stdout)
        assert as_json["flags"] == "TRANSIENT, TRANSRESET"
        # the host's view in the same shape and order (it had no name and sorted keys)
        host_view = sim.host("prop", "get", "/Guest/a", "--json").stdout
        assert host_view == sim.prop("get", "/Guest/a", "--json").stdout
        assert list(json.loads(host_view)) == ["name", "value", "flags", "timestamp"]
        stored = json.loads(sim.prop("set", "/Guest/b", "2", "--json").stdout)
        assert list(stored) == ["name", "value", "flags", "timestamp", "ignored"]
        assert (stored["value"], stored["ignored"]) == ("2", False)
        listed = json.loads(sim.prop("enum", "/Guest/*", "--json").stdout)
        assert [(p["name"], p["value"]) for p in listed] == [
            ("/Guest/a", "hello world"),
            ("/Guest/b", "2"),
        ]
        text = sim.prop("enum", "/Guest/?").stdout.splitlines()
        assert text[1].startswith("Name: /Guest/b, value: 2, timestamp: ")
        deleted = sim.prop("delete", "/Guest/a", "--json")
        assert json.loads(deleted.stdout) == {"name": "/Guest/a", "deleted": True, "ignored": False}
        # a property that never existed was not deleted (it said true)
        deleted = sim.prop("delete", "/Guest/never", "--json")
        assert json.loads(deleted.stdout) == {
            "name": "/Guest/never",
            "deleted": False,
            "ignored": False,
        }
        missing = sim.prop("get", "/Guest/a")
        assert missing.returncode == EX_REFUSED
        # the host's own words (it said "no property '/Guest/a'")
        assert one_line(missing) == "vbox-agent prop get: guest property '/Guest/a' is not set"
        host_missing = sim.run("host", "--socket", str(sim.socket), "prop", "get", "/Guest/a")
        assert host_missing.stderr == "vbox-agent host: guest property '/Guest/a' is not set\n"

    @ONE_DRIVER
    def test_a_value_the_output_cannot_encode_prints_escaped(self, sim: PropHost) -> None:
        """Under an ASCII stdout a value still prints, backslash-escaped, and the command
        succeeds (the encoding error was a ValueError, reported as a usage error, exit 64)."""
        assert sim.prop("set", "/Guest/u", "h\u00e9llo \u2603").returncode == EX_OK
        done = subprocess.run(
            [PYTHON, "-m", "agent", "prop", "--device", sim.device, "get", "/Guest/u"],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
            env=dict(sim.env, PYTHONIOENCODING="ascii"),
        )
        assert (done.returncode, done.stdout, done.stderr) == (EX_OK, "h\\xe9llo \\u2603\n", "")

    @ONE_DRIVER
    def test_output_nobody_reads_ends_quietly(self, sim: PropHost) -> None:
        """``prop enum | true``: the reader is gone, so the command ends with 141 and nothing
        on stderr, as every command does (it said ``failed: [Errno 32] Broken pipe``, exit 70)."""
        assert sim.prop("set", "/Guest/p", "1").returncode == EX_OK
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            done = subprocess.run(
                [PYTHON, "-m", "agent", "prop", "--device", sim.device, "enum"],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=WAIT_S,
                check=False,
                env=sim.env,
            )
        finally:
            os.close(write_end)
        assert (done.returncode, done.stderr) == (141, "")  # as SIGPIPE would end it

    @ONE_DRIVER
    @pytest.mark.parametrize("argv", [["get", "/Guest/p"], ["enum", "--json"]])
    def test_output_to_a_full_disk_is_one_line(self, sim: PropHost, argv: list[str]) -> None:
        """``> /dev/full``: one line and exit 74, as every command (it said ``failed:``, 70)."""
        assert sim.prop("set", "/Guest/p", "1").returncode == EX_OK
        done = run_into_full_disk("prop", "--device", sim.device, *argv, env=sim.env)
        assert done == (EX_IOERR, FULL_DISK_LINE)

    @ONE_DRIVER
    @pytest.mark.parametrize("refusal", REFUSALS)
    def test_a_stderr_that_refuses_lines_keeps_the_exit_code(
        self, sim: PropHost, refusal: Refusal
    ) -> None:
        """``2>/dev/full`` or a stderr nobody reads: a property not set still exits 1, and a
        value that cannot be written to a full disk 74, their lines lost (a full disk made
        each end with an OSError, a reader gone exit 141). The child's traceback exits
        :data:`EX_TRACEBACK`: its usual 1 is the code a property not set has."""
        assert sim.prop("set", "/Guest/p", "1").returncode == EX_OK

        def get(name: str, stdout: int) -> int:
            with refusing_stream(refusal) as stderr:
                return subprocess.run(
                    [*AGENT_WITHOUT_TRACEBACK, "prop", "--device", sim.device, "get", name],
                    stdout=stdout,
                    stderr=stderr,
                    timeout=WAIT_S,
                    check=False,
                    env=sim.env,
                ).returncode

        assert get("/Guest/none", subprocess.DEVNULL) == EX_REFUSED
        with refusing_stream("full") as full:
            assert get("/Guest/p", full) == EX_IOERR

    def test_a_failed_disconnect_after_the_write_is_no_failure(self, sim: PropHost) -> None:
        """The host fails the disconnect after the set: one warning, exit 0 (it said
        ``refused by the host``, exit 1, though the property was written)."""
        sim.host("fault", "HGCM_DISCONNECT", "VERR_INTERNAL_ERROR")
        done = sim.prop("set", "/dc/x", "applied")
        assert done.returncode == EX_OK, done.stderr
        (warning,) = (json.loads(line) for line in done.stderr.splitlines())
        assert (warning["event"], warning["status"]) == (
            "hgcm_disconnect_failed",
            "VERR_INTERNAL_ERROR",
        )
        assert sim.prop("get", "/dc/x").stdout == "applied\n"

    @ONE_DRIVER
    def test_text_that_is_not_unicode_prints_as_byte_escapes(self, sim: PropHost) -> None:
        """A name and a value a guest set with bytes IPRT takes and Python cannot decode
        print with each such byte as ``\\xNN``, the same from ``prop`` as from ``host prop``,
        text and JSON, under a strict UTF-8 stdout. (``host prop get`` died with a
        UnicodeEncodeError traceback, its ``--json`` printed lone surrogates, ``\\udcf4``,
        and ``prop`` printed U+FFFD, which merged names.)"""
        value = b"v\xf4\x90\x80\x80"  # U+110000 in four bytes

        async def guest_sets() -> None:
            async with (
                open_device(UnixSocketOpener(str(sim.socket))) as device,
                open_guest_properties(device) as props,
            ):
                for name in (b"/Guest/x", b"/Guest/\xf5\x80\x80\x80"):
                    reply = await props.channel.call(
                        GuestFunction.SET_PROP_VALUE,
                        HgcmBufferIn(name + b"\0"),
                        HgcmBufferIn(value + b"\0"),
                    )
                    assert reply.status == VINF_SUCCESS

        trio.run(guest_sets)
        shown = "v\\xf4\\x90\\x80\\x80"

        def strict(*args: str) -> str:
            done = subprocess.run(
                [*AGENT_WITHOUT_TRACEBACK, *args],
                capture_output=True,
                text=True,
                timeout=WAIT_S,
                check=False,
                env=dict(sim.env, PYTHONIOENCODING="utf-8"),
            )
            assert (done.returncode, done.stderr) == (EX_OK, ""), done.stderr
            return done.stdout

        guest = ("prop", "--device", sim.device)
        host = ("host", "--socket", str(sim.socket), "prop")
        assert strict(*guest, "get", "/Guest/x") == strict(*host, "get", "/Guest/x") == f"{shown}\n"
        as_json = strict(*guest, "get", "/Guest/x", "--json")
        assert strict(*host, "get", "/Guest/x", "--json") == as_json
        assert json.loads(as_json)["value"] == shown
        listed = json.loads(strict(*guest, "enum", "/Guest/*", "--json"))
        assert sorted((prop["name"], prop["value"]) for prop in listed) == [
            ("/Guest/\\xf5\\x80\\x80\\x80", shown),
            ("/Guest/x", shown),
        ]
        # set and delete --json name it the same way (they printed lone surrogates).
        name, name_shown = (
            "/Guest/\udcf8\udc88\udc80\udc80\udc80",
            "/Guest/\\xf8\\x88\\x80\\x80\\x80",
        )
        assert json.loads(strict(*guest, "set", name, "v", "--json"))["name"] == name_shown
        assert json.loads(strict(*guest, "delete", name, "--json")) == {
            "name": name_shown,
            "deleted": True,
            "ignored": False,
        }
        lines = strict(*guest, "enum", "/Guest/*").splitlines()
        assert any(
            line.startswith(f"Name: /Guest/\\xf5\\x80\\x80\\x80, value: {shown}, ")
            for line in lines
        )

    def test_set_replaces_the_flags(self, sim: PropHost) -> None:
        """A set without --flags leaves the property without flags."""
        sim.prop("set", "/Guest/f", "1", "--flags", "RDONLYHOST")
        assert json.loads(sim.prop("get", "/Guest/f", "--json").stdout)["flags"] == "RDONLYHOST"
        sim.prop("set", "/Guest/f", "2")
        assert json.loads(sim.prop("get", "/Guest/f", "--json").stdout)["flags"] == ""


class TestErrors:
    def test_read_only_for_the_guest(self, sim: PropHost) -> None:
        """The host's refusal is one line naming the status; exit 1."""
        sim.host("prop", "set", "/Guest/ro", "x", "--flags", "RDONLYGUEST")
        for name in ("/Guest/ro", "/VirtualBox/HostInfo/Mine"):
            done = sim.prop("set", name, "y")
            assert done.returncode == EX_REFUSED
            line = one_line(done)
            assert f"{name}: refused by the host: VERR_PERMISSION_DENIED (-10)" in line
            assert "read-only for the guest" in line
        assert sim.prop("delete", "/Guest/ro").returncode == EX_REFUSED

    def test_a_malformed_reply_names_the_property_and_exits_69(self, sim: PropHost) -> None:
        """A GET whose reply holds none of its strings: one line naming the property and the
        malformed reply, exit 69 as for a host that broke the socket protocol (it said
        ``failed: the host returned 0 strings where 2 belong``, exit 70)."""
        sim.prop("set", "/Guest/m", "x")
        sim.host("fault", "HGCM_CALL64", "0")
        done = sim.prop("get", "/Guest/m")
        assert (done.returncode, done.stdout) == (EX_UNAVAILABLE, "")
        assert one_line(done) == (
            "vbox-agent prop get: /Guest/m: the host's reply was malformed: "
            "the host returned 0 strings where 2 belong"
        )

    def test_an_unknown_status_is_named_once(self) -> None:
        """A status without a name reads ``VERR_UNKNOWN(rc)``, the number once (it said
        ``VERR_UNKNOWN(-4242) (-4242)``); a known one keeps its number."""
        args = argparse.Namespace(prop_action="get", name="/Guest/x\n")
        unknown = VBoxStatusError(-4242, "VBG_IOCTL_HGCM_CONNECT")
        assert _explain(args, unknown) == (
            "/Guest/x\\n: refused by the host: VERR_UNKNOWN(-4242)",
            EX_REFUSED,
        )
        assert str(unknown) == "VBG_IOCTL_HGCM_CONNECT failed: VERR_UNKNOWN(-4242)"
        denied = VBoxStatusError(-10, "VBG_IOCTL_HGCM_CONNECT")
        assert _explain(args, denied)[0].startswith(
            "/Guest/x\\n: refused by the host: VERR_PERMISSION_DENIED (-10): "
        )

    @ONE_DRIVER
    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (("set", "/" + "n" * 63, "v"), "the limit is 63"),
            (("set", "/Guest/v", "v" * 1024), "the limit is 1023"),
            (("set", "/Guest/*", "v"), "'*'"),
            (("set", "/Guest/x", "v", "--flags", "PERMANENT"), "unknown flag"),
            (("enum", "p" * 600, "q" * 600), "the limit is 1023"),
            (("get", ""), "empty"),
            (("set", "/Guest/x", "x\uffff"), "holds U+FFFF at character 2, which the host"),
            (("wait", "/x", "--timeout", "-1"), "positive number"),
        ],
    )
    def test_limits_are_usage_errors(
        self, sim: PropHost, args: tuple[str, ...], message: str
    ) -> None:
        """What the service would refuse for its size or shape exits 64 with one line."""
        done = sim.prop(*args)
        assert done.returncode == EX_USAGE
        assert message in done.stderr


REFUSED_ARGUMENTS: Final = [
    (("get", ""), "get: property name is empty"),
    (("get", "/a\udcff"), "get: property name '/a\\xff' is not valid Unicode text"),
    (
        ("delete", "/a?"),
        "delete: property name '/a?' contains '*', '?' or '|', which names may not",
    ),
    (
        ("set", "/a|b", "v"),
        "set: property name '/a|b' contains '*', '?' or '|', which names may not",
    ),
    (
        ("set", "/a", "v" * 1024),
        "set: property value is 1024 bytes long; the limit is 1023 bytes of UTF-8 "
        "(VERR_TOO_MUCH_DATA)",
    ),
    (
        ("set", "/a", "x\uffff"),
        "set: property value 'x\\uffff' holds U+FFFF at character 2, which the host refuses "
        "(VERR_CODE_POINT_ENDIAN_INDICATOR)",
    ),
    (("set", "/a", "v", "--flags", "BOGUS"), "set: invalid flags 'BOGUS': unknown flag at 'BOGUS'"),
    (
        ("set", "/a", "v", "--json", "--flags", "TRANSIENT;"),
        "set: invalid flags 'TRANSIENT;': expected ',' before ';'",
    ),
    (
        ("enum", "p" * 600, "q" * 600),
        "enum: pattern list is 1201 bytes long; the limit is 1023 bytes of UTF-8",
    ),
    (
        ("enum", "/ok", "a\ufffe"),
        "enum: pattern 'a\\ufffe' holds U+FFFE at character 2, which the host refuses "
        "(VERR_CODE_POINT_ENDIAN_INDICATOR)",
    ),
    (
        ("wait", "x\uffff", "--timeout", "1"),
        "wait: pattern 'x\\uffff' holds U+FFFF at character 2, which the host refuses "
        "(VERR_CODE_POINT_ENDIAN_INDICATOR)",
    ),
    (("wait", "x\udcff"), "wait: pattern 'x\\xff' is not valid Unicode text"),
]
"""Arguments of each action the service would refuse (the undecodable byte 0xFF arrives in
argv as U+DCFF), and the line after ``vbox-agent prop `` that says so."""


class TestNoHost:
    """Device specs that lead to no host: no simulator runs, so no personality is involved."""

    @pytest.mark.parametrize("device", ["no-node", "not-the-device", "no-host", "stale-socket"])
    @pytest.mark.parametrize(("args", "line"), REFUSED_ARGUMENTS)
    def test_what_the_service_refuses_exits_64_whatever_the_device(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        device: str,
        args: tuple[str, ...],
        line: str,
    ) -> None:
        """A name, value, pattern or flags the service would refuse exits 64 with its line
        before the device opens, at once: with no device node (it exited 69), a path that
        is not the device (78), and a ``unix:`` path no host listens on (it waited
        ``HOST_START_WAIT_S`` for one, then exited 69)."""
        stale = tmp_path / "stale.sock"
        with socket.socket(socket.AF_UNIX) as gone:  # its file stays, with no listener
            gone.bind(str(stale))
        spec = {
            "no-node": str(tmp_path / "vboxguest"),
            "not-the-device": os.devnull,
            "no-host": f"unix:{tmp_path / 'none.sock'}",
            "stale-socket": f"unix:{stale}",
        }[device]
        began = time.monotonic()
        code = main(["prop", "--device", spec, *args])
        took = time.monotonic() - began
        assert (code, *capsys.readouterr()) == (EX_USAGE, "", f"vbox-agent prop {line}\n")
        assert took < HOST_START_WAIT_S

    @staticmethod
    def prop(*args: str) -> subprocess.CompletedProcess[str]:
        """Run ``python -m agent prop ARGS`` to completion."""
        return subprocess.run(
            [PYTHON, "-m", "agent", "prop", *args],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )

    def test_no_host(self, tmp_path: Path) -> None:
        """A device spec that leads nowhere exits 69 with one line on stderr, nothing on
        stdout (structlog's default wrote the wait for the host there)."""
        done = self.prop("--device", f"unix:{tmp_path / 'none.sock'}", "get", "/x")
        assert done.returncode == EX_UNAVAILABLE
        assert "no simulated host" in one_line(done)
        assert done.stdout == ""

    def test_a_host_that_answers_no_ioctl(self, tmp_path: Path) -> None:
        """A host that answers HELLO and then nothing (hung) is unavailable once the version
        query went unanswered for ``VERSION_WAIT_S``: 69 and the one line saying so (``prop``
        waited for it forever; then an ``ioctl_abandoned`` warning followed the line, as
        the session was thrown away by cancelling the query)."""
        path = str(tmp_path / "hung.sock")
        with hung_host(path):
            done = self.prop("--device", f"unix:{path}", "get", "/x")
        assert (done.returncode, done.stdout) == (EX_UNAVAILABLE, "")
        assert done.stderr.splitlines() == [
            f"vbox-agent prop get: unix:{path} did not answer the driver version query "
            f"within {VERSION_WAIT_S:g} s"
        ]

    def test_path_that_is_not_a_socket(self, tmp_path: Path) -> None:
        """A device path that exists and is not a socket exits 78 at once, with one line, as
        a character-device path that cannot be the device."""
        path = tmp_path / "plain-file"
        path.write_text("not a socket\n")
        done = self.prop("--device", f"unix:{path}", "get", "/x")
        assert done.returncode == EX_CONFIG
        assert one_line(done).endswith(f"{path}: it exists and is not a socket")

    def test_a_path_that_cannot_be_the_device_exits_78_as_run_does(self, tmp_path: Path) -> None:
        """A device path that exists and is not a vboxguest node (a regular file answers the
        handshake with ENOTTY, a directory is EISDIR, a simulated host's socket named
        without ``unix:`` fails the open with ENXIO) is a config mistake: 78, as ``run``
        exits for it (``prop`` said 69, no device); a missing node stays 69."""
        regular = tmp_path / "passwd"
        regular.write_text("root:x:0:0::/root:/bin/sh\n")
        with socket.socket(socket.AF_UNIX) as listener:  # the socket file stays
            listener.bind(str(tmp_path / "host.sock"))
        for path, code, reason in (
            (regular, EX_CONFIG, "it did not answer the vboxguest version handshake (ENOTTY)"),
            (tmp_path, EX_CONFIG, "cannot be the vboxguest device: Is a directory (EISDIR)"),
            (
                tmp_path / "host.sock",
                EX_CONFIG,
                f"is a Unix socket, not the vboxguest device: "
                f"for a simulated host listening there write unix:{tmp_path / 'host.sock'} ",
            ),
            (tmp_path / "vboxguest", EX_UNAVAILABLE, "does not exist"),
        ):
            done = self.prop("--device", str(path), "get", "/x")
            assert (done.returncode, done.stdout) == (code, "")
            line = one_line(done)
            assert line.startswith(f"vbox-agent prop get: {path} ")
            assert reason in line


class TestWait:
    def test_returns_when_the_host_sets_a_match(self, sim: PropHost) -> None:
        """``prop wait`` parks at the host and returns as soon as a matching property is set."""
        with held_wait(sim, "/W/*|/X", "--timeout", str(WAIT_S), "--json") as waiter:
            sim.host("prop", "set", "/Other/a", "no")
            sim.host("prop", "set", "/W/hit", "yes", "--flags", "TRANSIENT")
            stdout, stderr = waiter.communicate(timeout=WAIT_S)
        assert waiter.returncode == EX_OK, stderr
        change = json.loads(stdout)
        assert (change["name"], change["value"], change["flags"], change["deleted"]) == (
            "/W/hit",
            "yes",
            "TRANSIENT",
            False,
        )
        assert sim.status()["hgcm_clients"] == 0

    def test_returns_when_the_host_sets_the_value_a_property_has(self, sim: PropHost) -> None:
        """A host poking a trigger property with its current value wakes ``prop wait``, as
        it wakes VBoxControl's (the watch had skipped a change with nothing new in it)."""
        sim.host("prop", "set", "/W/trigger", "go")
        with held_wait(sim, "/W/*", "--timeout", str(WAIT_S), "--json") as waiter:
            sim.host("prop", "set", "/W/trigger", "go")
            stdout, stderr = waiter.communicate(timeout=WAIT_S)
        assert waiter.returncode == EX_OK, stderr
        change = json.loads(stdout)
        assert (change["name"], change["value"], change["deleted"]) == ("/W/trigger", "go", False)

    def test_takes_alternatives_over_1023_bytes(self, sim: PropHost) -> None:
        """A PATTERN of alternatives over 1023 bytes waits as a shorter one does: the service
        checks no length of a wait's patterns (it exited 64, with ENUM_PROPS' limit)."""
        names = [f"/W/{index:02}/{'x' * 40}" for index in range(30)]
        with held_wait(sim, "|".join(names), "--timeout", str(WAIT_S), "--json") as waiter:
            sim.host("prop", "set", names[7], "yes")
            stdout, stderr = waiter.communicate(timeout=WAIT_S)
        assert waiter.returncode == EX_OK, stderr
        assert json.loads(stdout)["name"] == names[7]

    def test_ctrl_c_ends_it_quietly(self, sim: PropHost) -> None:
        """SIGINT ends a wait with 130, nothing on stderr (it printed a traceback), and the
        client released at the host."""
        with held_wait(sim, "/Never/*") as waiter:
            waiter.send_signal(signal.SIGINT)
            stdout, stderr = waiter.communicate(timeout=WAIT_S)
        assert (waiter.returncode, stdout, stderr) == (130, "", "")  # as SIGINT would end it
        wait_until(lambda: sim.status()["hgcm_clients"] == 0, "the client's release")

    def test_times_out(self, sim: PropHost) -> None:
        """Nothing matching changes: exit 1 after the timeout, the client released."""
        done = sim.prop("wait", "/Nothing/*", "--timeout", "0.3")
        assert done.returncode == EX_REFUSED
        assert "changed within 0.3 s" in one_line(done)
        assert sim.status()["hgcm_clients"] == 0


class _SlowDisconnect:
    """The first HGCM_DISCONNECT after ``blocking`` is set waits until cancelled (a
    disconnect still under way when a deadline expires)."""

    def __init__(self) -> None:
        self.blocking = False

    async def before(self, code: int) -> None:
        if code == Ioctl.HGCM_DISCONNECT and self.blocking:
            self.blocking = False
            await trio.sleep_forever()


def _wait_args(pattern: str, *, timeout: float) -> argparse.Namespace:
    """The arguments of ``prop wait PATTERN --timeout TIMEOUT``, as the parser gives them."""
    return argparse.Namespace(
        prop_action="wait", pattern=pattern, timeout=timeout, json=False, action=_wait
    )


class TestInProcess:
    """The actions run against an in-process simulated host, the shared ``host`` on each
    simulated driver (for what a separate host process cannot be made to do)."""

    async def test_a_change_survives_a_timeout_during_the_disconnect(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``prop wait`` prints a change it received even when its timeout expires while
        the wait's channel disconnects (it reported a timeout and lost the change)."""
        slow = _SlowDisconnect()
        opener = HookedOpener(host, before=slow.before)
        args = argparse.Namespace(prop_action="wait", pattern="/W/*", timeout=5.0, json=False)
        with trio.fail_after(60):
            async with open_device(opener) as device:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_wait, args, device)
                    await trio.testing.wait_all_tasks_blocked()
                    slow.blocking = True
                    host.prop_set("/W/a", "1")
                assert not slow.blocking
        stored = host.prop_get("/W/a")
        assert stored is not None
        printed = capsys.readouterr().out.splitlines()  # the simulated host logs there too
        assert [line for line in printed if line.startswith("Name: ")] == [
            f"Name: /W/a, value: 1, timestamp: {stored[2]}, flags: "
        ]

    async def test_the_timeout_bounds_the_connect(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost
    ) -> None:
        """``wait --timeout 1`` on a host slow to answer HGCM connects gives up after 1 s (it
        first connected a client for short calls, which it never makes, outside the timeout:
        up to the device's 30 s for a connect)."""
        host.set_delay(RequestType.HGCM_CONNECT, 10)
        args = _wait_args("/W/*", timeout=1.0)
        started = trio.current_time()
        with trio.fail_after(60), pytest.raises(_prop._NotFoundError, match="within 1 s"):
            await _prop._run(args, SimOpener(host))
        assert trio.current_time() - started < 1.5

    async def test_the_timeout_ends_the_matching_of_the_first_listing(
        self, autojump_clock: trio.abc.Clock, host: SimulatedHost, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A wait cancelled while it matches the properties it listed against its patterns
        stops at the next property. (The matching ran in one step: with thousands of
        alternatives and the host's 256 properties, ``--timeout 1`` exited after 7.8 s.)"""
        for index in range(20):
            host.prop_set(f"/P/{index}", "v")
        matched: list[bytes] = []
        scope = trio.CancelScope()

        def match_then_cancel(patterns: bytes, name: bytes) -> bool:
            matched.append(name)
            scope.cancel()  # as the wait's deadline passing while it matches
            return patterns_match(patterns, name)

        monkeypatch.setattr("agent.services.guest_props.patterns_match", match_then_cancel)
        with trio.fail_after(60), scope:
            await _prop._run(_wait_args("/W/*", timeout=30.0), SimOpener(host))
        assert scope.cancelled_caught
        assert len(matched) == 1

    async def test_a_wait_holds_one_client(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A parked ``wait`` holds its watch's client alone at the host (it held a second
        one, for short calls it never makes)."""
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_prop._run, _wait_args("/W/*", timeout=30.0), SimOpener(host))
                await trio.testing.wait_all_tasks_blocked()
                assert (host.status()["hgcm_clients"], host.status()["hgcm_pending_calls"]) == (
                    1,
                    1,
                )
                host.prop_set("/W/a", "1")
        printed = capsys.readouterr().out.splitlines()  # the simulated host logs there too
        assert [line for line in printed if line.startswith("Name: ")] == [
            f"Name: /W/a, value: 1, timestamp: {host.prop_get('/W/a')[2]}, flags: "  # type: ignore[index]
        ]

    async def test_a_property_named_empty_is_listed_and_passed_over(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``enum`` lists a property named "" (any guest process may set one with a two-byte
        name buffer) and ``wait`` for other names is not troubled by it. (Its listing entry
        was read as a malformed end of the list: both exited 69 while it stood.)"""
        enum_args = argparse.Namespace(prop_action="enum", patterns=[], json=True, action=_enum)
        with trio.fail_after(60):
            async with open_device(SimOpener(host)) as device, open_guest_properties(device) as p:
                empty_name, value = HgcmBufferIn(b"\0\0"), HgcmBufferIn(b"boom\0")
                await p.channel.call(GuestFunction.SET_PROP_VALUE, empty_name, value)
            await _prop._run(enum_args, SimOpener(host))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_prop._run, _wait_args("/x*", timeout=30.0), SimOpener(host))
                await trio.testing.wait_all_tasks_blocked()
                host.prop_set("/x1", "1")
        printed = capsys.readouterr().out.splitlines()  # the simulated host logs there too
        (listed,) = [json.loads(line) for line in printed if line.startswith("[")]
        assert [prop["value"] for prop in listed if prop["name"] == ""] == ["boom"]
        assert [line for line in printed if line.startswith("Name: ")] == [
            f"Name: /x1, value: 1, timestamp: {host.prop_get('/x1')[2]}, flags: "  # type: ignore[index]
        ]

    async def test_an_ignored_write_is_said_on_stderr(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """With the host's global RDONLYGUEST, set and delete succeed as no-ops; the command
        says so on stderr (it said nothing) and still succeeds."""
        host.prop_set("/Guest/kept", "1")
        with trio.fail_after(60):
            async with _props_ignored_by(host) as props:
                set_args = argparse.Namespace(
                    prop_action="set", name="/Guest/x", value="1", flags=None, json=False
                )
                await _set(set_args, props)
                delete_args = argparse.Namespace(
                    prop_action="delete", name="/Guest/kept", json=False
                )
                await _delete(delete_args, props)
        assert capsys.readouterr().err.splitlines() == [
            "vbox-agent prop set: /Guest/x: the host ignored the write (VINF_PERMISSION_DENIED)",
            "vbox-agent prop delete: /Guest/kept: the host ignored the write"
            " (VINF_PERMISSION_DENIED)",
        ]
        assert host.prop_get("/Guest/x") is None
        assert host.prop_get("/Guest/kept") is not None

    async def test_an_ignored_delete_is_not_reported_deleted(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``delete --json`` says ``"deleted": false`` when the host ignored the delete (the
        property still stands); it said true."""
        host.prop_set("/Guest/kept", "1")
        with trio.fail_after(60):
            async with _props_ignored_by(host) as props:
                args = argparse.Namespace(prop_action="delete", name="/Guest/kept", json=True)
                await _delete(args, props)
        printed = capsys.readouterr().out.splitlines()  # the simulated host logs there too
        assert [json.loads(line) for line in printed if line.startswith("{")] == [
            {"name": "/Guest/kept", "deleted": False, "ignored": True}
        ]
        assert host.prop_get("/Guest/kept") is not None

    @pytest.mark.parametrize(
        ("function", "argv", "subject"),
        [
            (GuestFunction.GET_PROP, ["get", "/Guest/x"], "/Guest/x: "),
            (GuestFunction.ENUM_PROPS, ["enum"], ""),
        ],
    )
    def test_a_buffer_size_no_guest_can_give_is_a_malformed_reply(
        self,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        function: GuestFunction,
        argv: list[str],
        subject: str,
    ) -> None:
        """A VERR_BUFFER_OVERFLOW asking for 0x7FFFFFFF bytes is the host's malformed reply:
        exit 69 and one line naming it (it said ``failed: ... the driver takes at most
        25165824 bytes per buffer``, exit 70, as if the command had broken a limit)."""
        host = SimulatedHost(services=[OverflowAsking(function, lambda _: 0x7FFF_FFFF)])
        monkeypatch.setattr(_prop, "_run", _beside(host, _prop._run))
        code = main(["prop", "--device", "unix:/nonexistent/host.sock", *argv])
        assert (code, capsys.readouterr().err.splitlines()) == (
            EX_UNAVAILABLE,
            [
                f"vbox-agent prop {argv[0]}: {subject}the host's reply was malformed: "
                f"{function.name}: the host answered VERR_BUFFER_OVERFLOW asking for a "
                "2147483647-byte buffer, over the 25165824 bytes one HGCM buffer carries"
            ],
        )

    def test_a_list_that_keeps_growing_is_worth_another_try(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """``enum`` on a host whose properties outgrow every buffer it is given: exit 75
        (``EX_TEMPFAIL``), one line saying they kept growing (it said the host's reply was
        malformed, exit 69)."""
        service = OverflowAsking(GuestFunction.ENUM_PROPS, lambda sent: sent + 1, times=100)
        monkeypatch.setattr(_prop, "_run", _beside(SimulatedHost(services=[service]), _prop._run))
        code = main(["prop", "--device", "unix:/nonexistent/host.sock", "enum"])
        assert (code, capsys.readouterr().err.splitlines()) == (
            EX_TEMPFAIL,
            [
                "vbox-agent prop enum: ENUM_PROPS: the host's properties kept growing while "
                f"they were listed: {ENUM_TRIES} tries in a row outgrew the buffer (the last "
                f"asked for {service.sent[-1] + 1} bytes); try again"
            ],
        )

    def test_a_host_that_does_not_answer_the_connect(self) -> None:
        """The device's VERR_TIMEOUT for a connect the host never answered (after 30 s):
        'did not answer', exit 69 (it said 'refused by the host: VERR_TIMEOUT', exit 1)."""
        args = argparse.Namespace(prop_action="get", name="/Guest/x")
        unanswered = VBoxStatusError(VERR_TIMEOUT, "VBG_IOCTL_HGCM_CONNECT to VBoxGuestPropSvc")
        assert _explain(args, unanswered) == (
            "/Guest/x: the host did not answer VBG_IOCTL_HGCM_CONNECT to VBoxGuestPropSvc "
            "(VERR_TIMEOUT)",
            EX_UNAVAILABLE,
        )

    async def test_every_set_prints_the_same_shape(
        self,
        autojump_clock: trio.abc.Clock,
        host: SimulatedHost,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """``set --json`` prints name, value, flags, timestamp and ``ignored`` whether the
        write was done or ignored, the fields null where no property stands (an ignored
        write printed a bare ``{"name": ...}``)."""
        host.prop_set("/Guest/kept", "old")
        timestamp = host.prop_get("/Guest/kept")[2]  # type: ignore[index]
        with trio.fail_after(60):
            async with _props_ignored_by(host) as props:
                for name in ("/Guest/x", "/Guest/kept"):
                    args = argparse.Namespace(
                        prop_action="set", name=name, value="new", flags=None, json=True
                    )
                    await _set(args, props)
        printed = capsys.readouterr().out.splitlines()  # the simulated host logs there too
        assert [json.loads(line) for line in printed if line.startswith("{")] == [
            {"name": "/Guest/x", "value": None, "flags": None, "timestamp": None, "ignored": True},
            {
                "name": "/Guest/kept",
                "value": "old",
                "flags": "",
                "timestamp": timestamp,
                "ignored": True,
            },
        ]


README_INTRO: Final = "Guest properties from the guest's side"
README_SOCKET: Final = "/tmp/props.sock"
README_PAUSE: Final = "sleep 3;"
PARKED_POLLS: Final = 300


def test_readme_example() -> None:
    """The README's ``prop`` example, pasted as written (with a private socket), succeeds.

    Its ``sleep 3`` stands for "once the wait is parked at the host"; on a loaded machine the
    test waits for exactly that instead (bounded polls of ``host status``).
    """
    workdir = Path(tempfile.mkdtemp(prefix="vbx-readme-", dir="/tmp"))
    socket_path = workdir / "p.sock"
    parked = (
        f"for _ in $(seq {PARKED_POLLS}); do vbox-agent host --socket {socket_path} status"
        " --json | grep -q '\"hgcm_pending_calls\": 1' && break; sleep 0.1; done;"
    )
    script = readme_block(README_INTRO).replace(README_SOCKET, str(socket_path))
    assert README_PAUSE in script
    script = script.replace(README_PAUSE, parked)
    environment = dict(os.environ, PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
    bash = shutil.which("bash")
    assert bash is not None
    shell = subprocess.Popen(
        [bash, "-e", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,  # its own process group, so teardown reaches every job
    )
    try:
        stdout, stderr = shell.communicate(timeout=4 * WAIT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(timeout=WAIT_S)
        shutil.rmtree(workdir, ignore_errors=True)
    assert shell.returncode == EX_OK, (stdout[-3000:], stderr[-3000:])
    assert "Name: /Demo/Reply, value: hello" in stdout
    listed = next(line for line in stdout.splitlines() if line.startswith("["))
    assert [(p["name"], p["value"], p["flags"]) for p in json.loads(listed)] == [
        ("/Demo/Guest", "hi", "TRANSIENT"),
        ("/Demo/Reply", "hello", ""),
    ]
