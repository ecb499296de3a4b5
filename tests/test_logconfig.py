"""Tests of ``agent.logconfig.configure_logging``.

Rules of this test module:
- Output is captured from the ``stream`` argument (a StringIO, a fake terminal, or a file in
  ``tmp_path`` for the journal), never from the real stdout.
- The ``reset`` fixture (autouse) restores structlog's defaults, the root logger and the
  context variables, so no test leaks its configuration into another.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import select
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import pytest
import structlog

from agent import logconfig
from agent.config import LogConfig
from agent.host._log import LOG_COMPONENT, host_log
from agent.logconfig import (
    LINE_LIMIT_CHARS,
    NOT_READING,
    QUEUE_LIMIT_CHARS,
    TOO_LONG,
    LogOutputStatistics,
    configure_logging,
    flush_log_output,
    log_output_statistics,
    logs_to_journal,
)
from tests.log_support import Refusing

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LIMIT_S: Final = 30.0
"""How long a test waits for the log's writer thread to write what it was given."""


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True, name="reset")
def fixture_reset(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def fail(token: str) -> None:
    raise ValueError(len(token))


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


class TestJSON:
    def test_line_has_timestamp_level_event(self) -> None:
        """A non-terminal stream gets one JSON object per line with an ISO UTC timestamp."""
        out = io.StringIO()
        configure_logging(LogConfig(), stream=out)
        structlog.get_logger().info("balloon_resized", chunks=3)
        [line] = json_lines(out.getvalue())
        assert line["event"] == "balloon_resized"
        assert line["level"] == "info"
        assert line["chunks"] == 3
        assert ISO_UTC.match(line["timestamp"]), line["timestamp"]

    def test_forced_on_a_terminal(self) -> None:
        """format = "json" writes JSON even to a terminal."""
        out = FakeTTY()
        configure_logging(LogConfig(format="json"), stream=out)
        structlog.get_logger().info("hgcm_connected")
        assert json_lines(out.getvalue())[0]["event"] == "hgcm_connected"

    def test_merges_context_variables(self) -> None:
        """Context variables bound by a service appear in its lines."""
        out = io.StringIO()
        configure_logging(LogConfig(), stream=out)
        structlog.contextvars.bind_contextvars(service="heartbeat")
        structlog.get_logger().info("heartbeat_sent")
        assert json_lines(out.getvalue())[0]["service"] == "heartbeat"

    def test_exception_is_a_dict_traceback_without_locals(self) -> None:
        """An exception is rendered as structured frames, with no local variables."""
        out = io.StringIO()
        configure_logging(LogConfig(), stream=out)
        try:
            fail("token-123")
        except ValueError:
            structlog.get_logger().exception("service_failed")
        [line] = json_lines(out.getvalue())
        [exception] = line["exception"]
        assert exception["exc_type"] == "ValueError"
        assert exception["frames"][-1]["name"] == "fail"
        assert "token-123" not in json.dumps(exception["frames"])
        assert line["level"] == "error"

    def test_loggers_are_not_cached_under_pytest(self) -> None:
        """Under pytest, loggers are not cached, so tests can reconfigure logging."""
        configure_logging(LogConfig(), stream=io.StringIO())
        assert structlog.get_config()["cache_logger_on_first_use"] is False


class TestJournal:
    @pytest.mark.parametrize(
        ("method", "prefix"),
        [
            ("debug", "<7>"),
            ("info", "<6>"),
            ("warning", "<4>"),
            ("error", "<3>"),
            ("critical", "<2>"),
        ],
    )
    def test_priority_prefix(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, prefix: str
    ) -> None:
        """On the journal stream each line starts with its syslog priority."""
        with (tmp_path / "journal").open("w") as out:
            status = os.fstat(out.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
            configure_logging(LogConfig(level="debug"), stream=out)
            getattr(structlog.get_logger(), method)("agent_started")
        text = (tmp_path / "journal").read_text()
        assert text.startswith(prefix)
        assert json.loads(text.removeprefix(prefix))["event"] == "agent_started"

    def test_other_stream_gets_no_prefix(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A JOURNAL_STREAM naming another file leaves the lines plain JSON."""
        other = os.stat(tmp_path)
        monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
        with (tmp_path / "out").open("w") as out:
            configure_logging(LogConfig(), stream=out)
            structlog.get_logger().info("agent_started")
        assert (tmp_path / "out").read_text().startswith("{")

    def test_malformed_variable_is_ignored(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A malformed JOURNAL_STREAM is not the journal."""
        monkeypatch.setenv("JOURNAL_STREAM", "not-a-stream")
        out = io.StringIO()
        configure_logging(LogConfig(), stream=out)
        structlog.get_logger().info("agent_started")
        assert out.getvalue().startswith("{")


class TestLogsToJournal:
    def test_the_journal_is_told_apart(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """``logs_to_journal`` names the stream systemd's JOURNAL_STREAM is: there ``run``
        says why it failed as a log line instead of a plain one."""
        with (tmp_path / "journal").open("w") as out, (tmp_path / "other").open("w") as other:
            status = os.fstat(out.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
            assert (logs_to_journal(out), logs_to_journal(other)) == (True, False)


class TestConsole:
    def test_on_a_terminal(self) -> None:
        """A terminal gets human-readable console lines, not JSON."""
        out = FakeTTY()
        configure_logging(LogConfig(), stream=out)
        structlog.get_logger().info("agent_started", version="1.0")
        line = ANSI.sub("", out.getvalue())
        assert "[info" in line
        assert "agent_started" in line
        assert "version=1.0" in line
        assert not line.startswith("{")

    def test_forced_without_colours_off_a_terminal(self) -> None:
        """format = "console" off a terminal writes console lines without colour codes."""
        out = io.StringIO()
        configure_logging(LogConfig(format="console"), stream=out)
        structlog.get_logger().warning("balloon_stuck")
        assert "[warning  ] balloon_stuck" in out.getvalue()
        assert "\x1b[" not in out.getvalue()


class TestLevels:
    def test_filters_below_the_level(self) -> None:
        """Events below the configured level are dropped."""
        out = io.StringIO()
        configure_logging(LogConfig(level="warning"), stream=out)
        log = structlog.get_logger()
        log.debug("a")
        log.info("b")
        log.warning("c")
        log.error("d")
        assert [line["event"] for line in json_lines(out.getvalue())] == ["c", "d"]


class TestStdlib:
    def test_routed_at_warning(self) -> None:
        """Stdlib logging records of warning and above reach the same stream as JSON."""
        out = io.StringIO()
        configure_logging(LogConfig(level="debug"), stream=out)
        third_party = logging.getLogger("third_party")
        third_party.info("chatty")
        third_party.warning("disk %s", "slow")
        [line] = json_lines(out.getvalue())
        assert line["event"] == "disk slow"
        assert line["level"] == "warning"
        assert line["logger"] == "third_party"
        assert ISO_UTC.match(line["timestamp"])

    def test_a_higher_configured_level_holds_for_them_too(self) -> None:
        """``level = "error"`` drops third-party warnings as it drops the agent's own, and
        a reload back to ``info`` lets warnings through again (never their info lines)."""
        out = io.StringIO()
        third_party = logging.getLogger("third_party")
        configure_logging(LogConfig(level="error"), stream=out)
        third_party.warning("dropped")
        third_party.error("kept")
        configure_logging(LogConfig(level="info"), stream=out)
        third_party.info("chatty")
        third_party.warning("kept again")
        assert [line["event"] for line in json_lines(out.getvalue())] == ["kept", "kept again"]

    def test_reconfiguring_replaces_the_handler(self) -> None:
        """Calling configure_logging again writes each stdlib record once, to the new stream."""
        first, second = io.StringIO(), io.StringIO()
        configure_logging(LogConfig(), stream=first)
        configure_logging(LogConfig(), stream=second)
        logging.getLogger("third_party").error("failed")
        assert first.getvalue() == ""
        assert len(json_lines(second.getvalue())) == 1


class TestRefusedLines:
    def test_dropped_counted_said_once_and_summed_up(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Lines a stream refuses raise nothing: they are counted, stderr hears of the first
        refusal once, and the first line written again is preceded by one line with how
        many were lost (not the context of the task that wrote it)."""
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        out = Refusing()
        configure_logging(LogConfig(), stream=out)
        log = structlog.get_logger()
        log.info("before")
        out.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        log.info("lost")
        logging.getLogger("third_party").warning("lost too")
        assert LogOutputStatistics(lost=2, failing="No space left on device") == (
            log_output_statistics()
        )
        out.error = None
        structlog.contextvars.bind_contextvars(service="heartbeat")
        log.info("after")
        lines = json_lines(out.getvalue())
        assert [line["event"] for line in lines] == ["before", "log_lines_lost", "after"]
        assert (
            lines[1]["lines"],
            lines[1]["error"],
            lines[1]["level"],
        ) == (2, "No space left on device", "warning")
        assert lines[1]["reasons"] == {"No space left on device": 2}
        assert "service" not in lines[1]
        assert (
            stderr.getvalue()
        ) == "vbox-agent: cannot write the output: No space left on device\n"
        assert LogOutputStatistics(lost=2, failing=None) == log_output_statistics()

    def test_a_reader_gone_on_a_descriptor(self) -> None:
        """A pipe whose reader closed (EPIPE) refuses each line, written on its descriptor,
        without raising; a reload to the same stream keeps the count."""
        read_end, write_end = os.pipe()
        os.close(read_end)
        with os.fdopen(write_end, "w") as out:
            configure_logging(LogConfig(), stream=out)
            structlog.get_logger().info("nobody reads this")
            configure_logging(LogConfig(level="debug"), stream=out)
            structlog.get_logger().debug("nor this")
            logging.getLogger("third_party").error("nor this one")
            flush_log_output(LIMIT_S)
            assert LogOutputStatistics(lost=3, failing="Broken pipe") == log_output_statistics()

    def test_a_line_cut_by_a_full_disk_is_ended(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A write that took part of a line and then failed leaves the line cut: the line
        that says how many were lost starts on a line of its own."""
        read_end, write_end = os.pipe()
        real_write = os.write
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def half_then_full(fd: int, data: bytes) -> int:
            monkeypatch.setattr(os, "write", refuse)
            return real_write(fd, data[: len(data) // 2])

        def refuse(fd: int, data: bytes) -> int:
            raise full

        with os.fdopen(read_end, "rb") as log, os.fdopen(write_end, "w") as out:
            configure_logging(LogConfig(), stream=out)
            monkeypatch.setattr(os, "write", half_then_full)
            structlog.get_logger().info("cut")
            flush_log_output(LIMIT_S)
            monkeypatch.setattr(os, "write", real_write)
            structlog.get_logger().info("after")
            flush_log_output(LIMIT_S)
            out.close()
            cut, *whole = log.read().decode().splitlines()
        assert cut.startswith('{"event": "cut"')
        assert [line["event"] for line in json_lines("\n".join(whole))] == [
            "log_lines_lost",
            "after",
        ]

    def test_stderr_on_the_same_stream_hears_nothing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where stderr is the log's stream (``2>&1``, the journal), nothing is said there:
        it would refuse the line too."""
        with open("/dev/full", "w") as out, Recording(open(os.dup(out.fileno()), "wb")) as err:
            monkeypatch.setattr(sys, "stderr", err)
            configure_logging(LogConfig(), stream=out)
            structlog.get_logger().info("nobody reads this")
            flush_log_output(LIMIT_S)
            assert err.written == []
        failing = os.strerror(errno.ENOSPC)
        assert LogOutputStatistics(lost=1, failing=failing) == log_output_statistics()


class TestAStreamNotReading:
    def test_costs_lines_in_order_never_the_caller(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A pipe whose reader is alive but does not read: logging goes on at once, the lines
        that find the queue full are dropped and counted (stderr hears it once); once the
        reader reads, it gets the lines kept in their order, each run of lost lines said
        where it was, and the line logged after."""
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        read_end, write_end = os.pipe()
        sent = 4 * QUEUE_LIMIT_CHARS // 50  # more than the pipe and the queue hold
        with os.fdopen(read_end, "rb") as reader, os.fdopen(write_end, "w") as out:
            configure_logging(LogConfig(), stream=out)
            log = structlog.get_logger()

            def log_them() -> None:
                for n in range(sent):
                    log.info("line", n=n)

            logging_thread = threading.Thread(target=log_them)
            logging_thread.start()
            logging_thread.join(LIMIT_S)
            assert not logging_thread.is_alive(), "logging waited for the reader"
            stalled = log_output_statistics()
            assert (stalled.lost > 0, stalled.failing) == (True, NOT_READING)
            read: list[str] = []
            reading = threading.Thread(
                target=lambda: read.append(read_until(reader, b'"event": "after"'))
            )
            reading.start()
            flush_log_output(LIMIT_S)  # the reader reads: every line queued is written
            log.info("after")
            reading.join(LIMIT_S)
            flush_log_output(LIMIT_S)
        [text] = read
        lines = json_lines(text)
        assert lines[-1]["event"] == "after"
        expected, lost = 0, 0
        for line in lines[:-1]:
            if line["event"] == "log_lines_lost":
                assert line["error"] == NOT_READING
                expected += line["lines"]
                lost += line["lines"]
            else:
                assert expected == line["n"]
                expected += 1
        assert (sent, stalled.lost) == (expected, lost)
        assert LogOutputStatistics(lost=lost, failing=None) == log_output_statistics()
        assert stderr.getvalue() == f"vbox-agent: cannot write the output: {NOT_READING}\n"

    def test_the_exit_waits_for_it_a_bounded_time(self) -> None:
        """The lines still waiting when the exit's wait ends are counted lost, and the
        stream is failing; a second wait does not wait for the stuck line again."""
        read_end, write_end = os.pipe()
        with os.fdopen(read_end, "rb") as reader, os.fdopen(write_end, "w") as out:
            configure_logging(LogConfig(), stream=out)
            sent = 2 * QUEUE_LIMIT_CHARS // 50
            for n in range(sent):
                structlog.get_logger().info("line", n=n)
            before = log_output_statistics().lost
            flush_log_output(0.0)
            after = log_output_statistics()
            assert after.lost > before
            assert after.failing == NOT_READING
            start = time.monotonic()
            flush_log_output(LIMIT_S)
            assert time.monotonic() - start < LIMIT_S
            reader.close()  # the writer's stuck line ends (EPIPE), before its stream closes
            flush_log_output(LIMIT_S)


class TestLongLines:
    """The queue's limit is what a stream that does not read may cost, not a line's length."""

    def test_a_line_longer_than_the_queue_reaches_a_stream_that_reads(self) -> None:
        """A line longer than the queue holds (a config rejection of hundreds of problems)
        goes to an idle stream that reads, as does the line after it: the line alone was
        dropped, with a ``log_lines_lost`` saying the stream was not reading."""
        read_end, write_end = os.pipe()
        long = "x" * 2 * QUEUE_LIMIT_CHARS
        with os.fdopen(read_end, "rb") as reader, os.fdopen(write_end, "w") as out:
            configure_logging(LogConfig(), stream=out)
            read: list[str] = []
            reading = threading.Thread(
                target=lambda: read.append(read_until(reader, b'"event": "after"'))
            )
            reading.start()
            structlog.get_logger().error("config_reload_rejected", errors=[long])
            structlog.get_logger().info("after")
            reading.join(LIMIT_S)
            flush_log_output(LIMIT_S)
        [text] = read
        rejected, after = json_lines(text)
        assert (rejected["errors"], after["event"]) == ([long], "after")
        assert LogOutputStatistics(lost=0, failing=None) == log_output_statistics()

    def test_a_line_too_long_to_queue_is_said_to_be(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A line longer than ``LINE_LIMIT_CHARS`` is dropped and counted, and the notice and
        stderr say it was too long, not that the stream does not read."""
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        read_end, write_end = os.pipe()
        with os.fdopen(read_end, "rb") as reader, os.fdopen(write_end, "w") as out:
            configure_logging(LogConfig(), stream=out)
            read: list[str] = []
            reading = threading.Thread(
                target=lambda: read.append(read_until(reader, b'"event": "after"'))
            )
            reading.start()
            structlog.get_logger().info("huge", text="x" * LINE_LIMIT_CHARS)
            assert LogOutputStatistics(lost=1, failing=TOO_LONG) == log_output_statistics()
            structlog.get_logger().info("after")
            reading.join(LIMIT_S)
            flush_log_output(LIMIT_S)
        [text] = read
        notice, after = json_lines(text)
        assert (notice["event"], notice["lines"], notice["error"]) == (
            "log_lines_lost",
            1,
            TOO_LONG,
        )
        assert after["event"] == "after"
        assert LogOutputStatistics(lost=1, failing=None) == log_output_statistics()
        assert stderr.getvalue() == f"vbox-agent: cannot write the output: {TOO_LONG}\n"

    def test_a_stream_not_reading_still_costs_at_most_the_queue(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """While the writer is held in a line, a long line counts as any other: one that
        does not fit in the queue, empty or not, is dropped (only a line an idle writer
        takes at once is not counted)."""
        with held_writes(monkeypatch) as (writes, log):
            structlog.get_logger().info("line", n=1, text="x" * QUEUE_LIMIT_CHARS)
            log(2)
            writes.step()  # 0 written; the notice before 2 held
            writes.step()  # written; 2 held
        assert writes.events() == [0, (1, NOT_READING), 2]
        assert log_output_statistics() == LogOutputStatistics(lost=1, failing=None)


class TestLostLinesSaidWhereTheyWere:
    """The writer thread is held in each write and let go by the test, so lines are queued
    and dropped between two given writes: the order of drops and queued lines that a busy
    logger and a slow reader make by chance."""

    def test_each_notice_says_why_while_another_waits_in_the_queue(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two queued lines each follow lines dropped before them: each gets its notice with
        the reason, and the stream stays failing until the second notice is written."""
        with held_writes(monkeypatch) as (writes, log):
            log(1, 2, 3)  # 3 finds the queue full
            writes.step()  # 0 written; 1 held
            log(4, 5)  # 4 follows the lost 3; 5 finds the queue full
            writes.step()  # 1 written; 2 held
            log(6)  # follows the lost 5
            writes.step()  # 2 written; the notice before 4 held
            writes.step()  # written; 4 held, 6 still waits behind its lost line
            assert log_output_statistics() == LogOutputStatistics(lost=2, failing=NOT_READING)
            writes.step()  # 4 written; the notice before 6 held
            writes.step()  # written; 6 held
        assert writes.events() == [0, 1, 2, (1, NOT_READING), 4, (1, NOT_READING), 6]
        assert log_output_statistics() == LogOutputStatistics(lost=2, failing=None)

    def test_an_exit_that_stops_waiting_counts_every_line_lost_in_one_notice(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The queue dropped by a wait that ran out holds a line that followed a lost one:
        the next notice counts the queued lines and that lost one too."""
        with held_writes(monkeypatch) as (writes, log):
            log(1, 2, 3)  # 3 finds the queue full
            writes.step()  # 0 written; 1 held
            log(4)  # follows the lost 3
            flush_log_output(0.0)  # 2 and 4 dropped with the queue
            writes.let_go()  # 1 written
            log(7)
            writes.held()  # the notice before 7
            writes.step()  # written; 7 held
        assert writes.events() == [0, 1, (3, NOT_READING), 7]
        assert log_output_statistics() == LogOutputStatistics(lost=3, failing=None)

    def test_a_notice_names_each_reason_with_its_count(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Lines dropped for the stream not reading, then one too long: the notice counts
        them all and says each reason with its count, most lines first (it put all three
        down to the long line)."""
        with held_writes(monkeypatch) as (writes, log):
            log(1, 2, 3, 4)  # 3 and 4 find the queue full
            structlog.get_logger().info("line", n=5, text="x" * LINE_LIMIT_CHARS)
            assert log_output_statistics() == LogOutputStatistics(lost=3, failing=TOO_LONG)
            writes.step()  # 0 written; 1 held
            log(6)  # follows the lost 3, 4 and 5
            writes.step()  # 1 written; 2 held
            writes.step()  # 2 written; the notice before 6 held
            writes.step()  # written; 6 held
        mixed = f"{NOT_READING} (2 lines); {TOO_LONG} (1 line)"
        assert writes.events() == [0, 1, 2, (3, mixed), 6]
        assert writes.notices() == [{NOT_READING: 2, TOO_LONG: 1}]
        assert log_output_statistics() == LogOutputStatistics(lost=3, failing=None)

    def test_an_exit_that_stops_waiting_keeps_the_reasons_the_queue_carried(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A queued line follows a line too long; the exit's wait runs out and drops the
        queue: the next notice counts the queued lines as not read and the long line as
        too long."""
        with held_writes(monkeypatch) as (writes, log):
            log(1)
            structlog.get_logger().info("line", n=2, text="x" * LINE_LIMIT_CHARS)
            log(3)  # follows the lost 2
            flush_log_output(0.0)  # 1 and 3 dropped with the queue
            writes.let_go()  # 0 written
            log(7)
            writes.held()  # the notice before 7
            writes.step()  # written; 7 held
        mixed = f"{NOT_READING} (2 lines); {TOO_LONG} (1 line)"
        assert writes.events() == [0, (3, mixed), 7]
        assert writes.notices() == [{NOT_READING: 2, TOO_LONG: 1}]
        assert log_output_statistics() == LogOutputStatistics(lost=3, failing=None)


class HeldWrites:
    """``os.write`` for the log's descriptor: each write waits until the test lets it go."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written: list[bytes] = []
        self.arrived = b""
        """What the write held (or last held) was given."""
        self._real = os.write
        self._arrived = threading.Semaphore(0)
        self._go = threading.Semaphore(0)

    def __call__(self, fd: int, data: bytes) -> int:
        if fd != self.fd:
            return self._real(fd, data)
        self.arrived = bytes(data)
        self._arrived.release()
        if not self._go.acquire(timeout=LIMIT_S):
            raise OSError(errno.ETIMEDOUT, "the test never let the write go")
        self.written.append(bytes(data))
        return len(data)

    def held(self) -> None:
        """Wait until the writer thread is in a write."""
        assert self._arrived.acquire(timeout=LIMIT_S), "the writer never wrote"

    def step(self) -> None:
        """Let the write held go, and wait until the writer is in the next."""
        self._go.release()
        self.held()

    def let_go(self) -> None:
        self._go.release()

    def events(self) -> list[int | tuple[int, str]]:
        """Each line written: its ``n``, or a notice's lines and reason."""
        lines = json_lines(b"".join(self.written).decode())
        return [
            (line["lines"], line["error"]) if line["event"] == "log_lines_lost" else line["n"]
            for line in lines
        ]

    def notices(self) -> list[dict[str, int]]:
        """Each notice's lines lost by reason."""
        lines = json_lines(b"".join(self.written).decode())
        return [line["reasons"] for line in lines if line["event"] == "log_lines_lost"]


@contextlib.contextmanager
def held_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[HeldWrites, Callable[..., None]]]:
    """Log to a pipe whose writes the test lets go: yield the writes and a function logging
    the lines numbered by its arguments. Line 0 is logged and held first, and the queue
    then holds two lines but not three. On leaving, the write held is let go and every line
    queued is written."""
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb"), os.fdopen(write_end, "w") as out:
        writes = HeldWrites(write_end)
        monkeypatch.setattr(os, "write", writes)
        configure_logging(LogConfig(), stream=out)
        logger = structlog.get_logger()

        def log(*lines: int) -> None:
            for n in lines:
                logger.info("line", n=n)

        log(0)
        writes.held()
        monkeypatch.setattr(logconfig, "QUEUE_LIMIT_CHARS", 5 * len(writes.arrived) // 2)
        yield writes, log
        writes.let_go()
        flush_log_output(LIMIT_S)


def read_until(reader: BinaryIO, wanted: bytes) -> str:
    """Read the pipe ``reader`` until ``wanted`` is in what was read (for ``LIMIT_S`` at
    most); return all of it."""
    read = b""
    deadline = time.monotonic() + LIMIT_S
    while wanted not in read:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"never read {wanted!r}"
        ready, _, _ = select.select([reader], [], [], remaining)
        if ready:
            read += os.read(reader.fileno(), 65536)
    return read.decode()


class Recording(io.TextIOWrapper):
    """A stream on a descriptor that keeps what it is given instead of writing it."""

    def __init__(self, buffer: BinaryIO) -> None:
        super().__init__(buffer)
        self.written: list[str] = []

    def write(self, text: str) -> int:
        self.written.append(text)
        return len(text)


class TestHostLines:
    def test_carry_the_host_and_not_the_calling_service(self) -> None:
        """The in-process simulated host runs in the agent's tasks: its lines name the host
        and none of the task's context (they read as the balloon's own), the agent's do."""
        out = io.StringIO()
        configure_logging(LogConfig(), stream=out)
        structlog.contextvars.bind_contextvars(service="balloon")
        host_log.info("vmm_request_denied")
        structlog.get_logger().info("balloon_resized")
        host, agent = json_lines(out.getvalue())
        assert (host["component"], host.get("service")) == (LOG_COMPONENT, None)
        assert agent["service"] == "balloon"
