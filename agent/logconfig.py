"""Structured logging: one structlog chain; JSON lines for journald, console lines for people.

``configure_logging`` is called by the CLI before anything logs. Third-party libraries'
stdlib ``logging`` records go through the same chain to the same stream, at the configured
level but never below warning (their info and debug lines are not the agent's story).
Loggers are not cached on first use, so calling it again on a reload changes the level and
format of every logger at once; the agent logs a few lines per event, where the cost of
an uncached logger (about a microsecond) does not show.

Logging never raises into the code that logs, nor waits for the stream (:class:`LogOutput`):
a line the stream refuses (a full disk, a journal or pipe reader gone) is dropped and
counted, and so is a line that does not fit beside what already waits for a stream that is
not reading (a journal busy on a slow disk, a full pipe, a terminal paused with Ctrl-S), at
most :data:`QUEUE_LIMIT_CHARS`, or one longer than :data:`LINE_LIMIT_CHARS`; the first
failure is said once on stderr when stderr is another stream, and the first line written
again is preceded by one ``log_lines_lost`` line saying how many were lost, and why (each
reason with its count when there were several). The agent runs on.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import stat
import sys
import threading
import time
from collections import Counter, deque
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, TextIO, cast, final

import structlog

from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from structlog.typing import EventDict, Processor, WrappedLogger

    from agent.config import LogConfig

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
SYSLOG_PRIORITY: Final = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
"""The ``<N>`` prefix journald reads as PRIORITY, by structlog level name."""
THIRD_PARTY_LEVEL: Final = logging.WARNING
"""The lowest level of stdlib ``logging`` records (other libraries) ever written; a higher
configured level (``error``) raises it."""

_DICT_TRACEBACKS: Final = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
"""``dict_tracebacks`` without local variables (they may hold secrets and big buffers)."""
OWN_CONTEXT_KEY: Final = "component"
"""A line whose logger binds this key is that component's own (the simulated host's, whose
in-process driver runs in the agent's tasks): the calling task's context variables
(``service=balloon``...) are not merged into it."""
LINES_LOST_EVENT: Final = "log_lines_lost"
"""The line written once the stream takes lines again, with how many were lost (``lines``),
why (``error``: the reason, or each reason with its count, most lines first) and how many
for each reason (``reasons``, reason to count)."""
QUEUE_LIMIT_CHARS: Final = 64 * 1024
"""The most characters of lines (about as many bytes: the lines are ASCII JSON, mostly) that
wait for a stream other than a regular file to take them; a line that does not fit beside
those already waiting is dropped and counted (:data:`NOT_READING`). As much again as a pipe
holds. It bounds what a stream that does not read may cost, not a line's length: the line
being written does not count, nor does one the idle writer takes at once, however long
(:data:`LINE_LIMIT_CHARS` at most)."""
LINE_LIMIT_CHARS: Final = 1024 * 1024
"""The longest line queued for a stream other than a regular file; a longer one is dropped
and counted (:data:`TOO_LONG`). The agent's longest lines are a few KiB (a config rejection
lists at most ``agent.config.LISTED_PROBLEMS`` problems) or tens of KiB (a traceback), and
journald cuts a line over its ``LineMax=`` (48 KiB by default) into several entries: this
only bounds the line a stream that does not read may hold the writer thread in, beside
:data:`QUEUE_LIMIT_CHARS` waiting."""
EXIT_FLUSH_S: Final = 0.05
"""How long the exit waits for the stream to take the lines still waiting (a stream that
reads takes them at once); the lines it did not take are counted as lost. The second the
stop promises past ``shutdown_timeout_s`` has room for it."""
NOT_READING: Final = "the log stream is not reading"
"""Why lines were dropped when :data:`QUEUE_LIMIT_CHARS` waited, or at the exit."""
TOO_LONG: Final = f"a line longer than {LINE_LIMIT_CHARS} characters"
"""Why a line longer than :data:`LINE_LIMIT_CHARS` was dropped."""
_NONE_LOST: Final[Mapping[str, int]] = MappingProxyType({})
"""What a queued line that follows no lost line carries (shared, so read-only)."""


def configure_logging(cfg: LogConfig, *, stream: TextIO | None = None) -> None:
    """Send structlog and stdlib logging to ``stream`` (default: ``sys.stdout``) as ``cfg`` says.

    JSON lines when ``cfg.format`` is ``"json"``, or ``"auto"`` and the stream is not a
    terminal; console lines otherwise. When the stream is systemd's journal stream
    (``$JOURNAL_STREAM``), each line starts with its syslog priority (``<6>``).
    """
    out = sys.stdout if stream is None else stream
    console = cfg.format == "console" or (cfg.format == "auto" and out.isatty())
    renderer: Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    if _is_journal_stream(out):
        renderer = _JournalPriority(renderer)
    own: list[Processor] = [  # what a line says of itself, not of the task that wrote it
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if not console:
        own.append(_DICT_TRACEBACKS)
    shared: list[Processor] = [_merge_context, *own]
    notice = _Notice([*own, renderer])
    output = _OUTPUT.output
    if output is None or output.stream is not out:  # a reload to the same stream keeps it
        output = _OUTPUT.output = LogOutput(out, notice)
    output.notice = notice
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[cfg.level]),
        logger_factory=output.logger,
        cache_logger_on_first_use=False,
    )
    third_party = max(THIRD_PARTY_LEVEL, _LEVELS[cfg.level])
    _route_stdlib(output, [structlog.stdlib.add_logger_name, *shared], renderer, third_party)


@record
class LogOutputStatistics:
    """What became of the log lines written since the process started.

    Attributes:
        lost: lines the stream refused, or that found it not reading, dropped.
        failing: why lines are lost now (None once the line saying so was written).
    """

    lost: int
    failing: str | None


def flush_log_output(timeout: float = EXIT_FLUSH_S) -> None:
    """Wait up to ``timeout`` seconds for the log stream to take the lines waiting for it;
    count those it did not take as lost (see :meth:`LogOutput.flush`)."""
    output = _OUTPUT.output
    if output is not None:
        output.flush(timeout)


def log_output_statistics() -> LogOutputStatistics:
    """Return the lines lost so far and why the log stream fails now, if it does."""
    output = _OUTPUT.output
    if output is None:
        return LogOutputStatistics(lost=0, failing=None)
    return LogOutputStatistics(lost=output.lost, failing=output.failing)


@final
class LogOutput:
    """The stream the log lines go to, as a structlog logger whose writes never raise and
    never wait for the stream.

    A line is written with one ``write`` on the stream's descriptor (the rest of it again if
    a full disk took part of it), not through the stream's buffer, which would keep refused
    lines and write them, out of order, once it can. On a descriptor that may wait for its
    reader (anything but a regular file) the lines are handed, in order, to one writer
    thread, at most :data:`QUEUE_LIMIT_CHARS` of them waiting besides the line the writer
    has (or takes at once, up to :data:`LINE_LIMIT_CHARS`): a line that does not fit is
    dropped and counted (:data:`NOT_READING`, or :data:`TOO_LONG`), so a reader that stops
    reading costs lines, never the event loop. The thread waits without a timeout while
    nothing is logged. A regular file, which has no reader to wait for, is written at once,
    and a stream without a descriptor (a test's ``StringIO``) is written and flushed.

    A line refused (``OSError``, or ``ValueError`` for a closed stream) is dropped and
    counted; the first of a run of failures is said once on stderr when stderr is another
    stream than the log's and takes it (the journal takes stdout and stderr on one stream:
    nothing is said there); the next line written is preceded by ``notice`` saying how many
    were lost and why, after a newline if a line was cut. Each lost line is counted under
    its reason from its drop to that notice (carried in the queue with the line after it),
    so the notice counts each reason exactly, however drops and writes interleave.
    """

    def __init__(self, stream: TextIO, notice: Callable[[Mapping[str, int]], str]) -> None:
        self.stream = stream
        self.notice = notice
        """Renders the line saying how many lines were lost for each reason."""
        self.lost = 0
        """Lines dropped since the process started."""
        self.failing: str | None = None
        """Why the last line was lost, until the line saying so is written."""
        self._unsaid: Counter[str] = Counter()
        """Lines lost before the next line to write, by reason."""
        self._torn = False
        """A write failed after it wrote part of its line."""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        """Notified when a line is queued and when the writer is done with one."""
        self._queue: deque[tuple[Mapping[str, int], str, int]] | None = None
        """Lines waiting for the writer thread, each with the lines dropped just before it
        (by reason) and the characters it counts for in ``_queued_chars`` (None: lines are
        written at once)."""
        self._queued_chars = 0
        """What the lines waiting count for: all but one handed to an idle writer."""
        self._dropped: Counter[str] = Counter()
        """Lines dropped since the last line queued, by reason."""
        self._busy = False
        """The writer thread is writing a line."""
        self._idle = True
        """The writer thread waits for a line (or is not started yet)."""
        self._writer: threading.Thread | None = None
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._stderr = None if _same_stream(stream, sys.stderr) else sys.stderr
        fd = _descriptor(stream)
        self._write: Callable[[str], None]
        if fd is None:
            self._write = self._write_stream
        else:
            self._write = partial(self._write_fd, fd)
            _flush_quietly(stream)  # what was written through its buffer goes first
            if _waits_for_a_reader(fd):
                self._queue = deque()

    def logger(self, *_args: object) -> LogOutput:
        """The structlog logger factory: every logger writes through this output."""
        return self

    def msg(self, message: str) -> None:
        """Write ``message`` as a line, or queue it for the writer thread; drop and count it
        if the stream refuses it, if it is too long to queue, or if it does not fit beside
        the lines already waiting."""
        line = f"{message}\n"
        with self._lock:
            if self._queue is None:
                self._emit(_NONE_LOST, line)
            elif len(line) > LINE_LIMIT_CHARS:
                self._drop(TOO_LONG)
            else:
                self._enqueue(self._queue, line)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the writer thread to write every line queued.

        Lines still queued then are dropped and counted as lost, and a stream still holding
        the writer (its line neither written nor refused) is failing (:data:`NOT_READING`);
        a later flush does not wait for that line again.
        """
        queue = self._queue
        if queue is None:
            return
        deadline = time.monotonic() + timeout
        with self._changed:
            while queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.lost += len(queue)
                    for dropped, _, _ in queue:
                        self._dropped.update(dropped)
                    self._dropped[NOT_READING] += len(queue)
                    queue.clear()
                    self._queued_chars = 0
                    self._busy = False
                    self._fail(NOT_READING)
                    return
                self._changed.wait(left)

    def _drop(self, reason: str) -> None:
        """Count a line dropped before it was queued, for the notice before the next one."""
        self.lost += 1
        self._dropped[reason] += 1
        self._fail(reason)

    def _enqueue(self, queue: deque[tuple[Mapping[str, int], str, int]], line: str) -> None:
        """Queue ``line`` if it fits, else drop and count it (:data:`NOT_READING`).

        A line handed to an idle writer counts for nothing, as the line the writer writes
        does not: it becomes that line at once, however long (:data:`LINE_LIMIT_CHARS` at
        most), and the lines after it still have :data:`QUEUE_LIMIT_CHARS`. So a stream that
        does not read holds at most the line the writer is stuck in and that many characters.
        """
        counted = 0 if self._idle and not queue else len(line)
        if self._queued_chars + counted > QUEUE_LIMIT_CHARS:
            self._drop(NOT_READING)
        else:
            queue.append((self._dropped or _NONE_LOST, line, counted))
            self._queued_chars += counted
            if self._dropped:
                self._dropped = Counter()
            self._start_writer()
            self._changed.notify_all()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_queued, name="log", daemon=True)
            self._writer.start()
            atexit.register(self.flush, EXIT_FLUSH_S)

    def _write_queued(self) -> None:
        """The writer thread: write the queued lines in order, waiting for the next."""
        while True:
            with self._changed:
                while not self._queue:
                    self._idle = True
                    self._changed.wait()
                dropped, line, counted = self._queue.popleft()
                self._queued_chars -= counted
                self._busy = True
                self._idle = False
            self._emit(dropped, line)
            with self._changed:
                self._busy = False
                self._changed.notify_all()

    def _emit(self, dropped: Mapping[str, int], line: str) -> None:
        """Write ``line``, after the line saying how many were lost, and why, if some were
        (with ``dropped``, those dropped just before it); drop and count it if refused."""
        with self._lock:
            if dropped:  # most lines follow none: no Counter work on the hot path
                self._unsaid.update(dropped)
            unsaid = Counter(self._unsaid) if self._unsaid else None
            lead = "\n" if self._torn else ""
        try:
            if unsaid is not None:
                self._write(f"{lead}{self.notice(unsaid)}\n")
                with self._lock:
                    self._unsaid -= unsaid  # keeps only the counts still unsaid
                    if self._all_said():
                        self.failing = None
            self._write(line)
        except (OSError, ValueError) as exc:
            with self._lock:
                self.lost += 1
                reason = _reason(exc)
                self._unsaid[reason] += 1
                self._fail(reason)

    def _all_said(self) -> bool:
        """No lost line waits for its notice: none at the writer, none dropped since the
        last line queued, none before a line still queued."""
        queued = self._queue or ()
        return not (self._unsaid or self._dropped or any(dropped for dropped, _, _ in queued))

    def _fail(self, reason: str) -> None:
        """Record why lines are lost; say it on stderr if it is the first of a run."""
        if self.failing is None and self._stderr is not None:
            _say_on(self._stderr, f"vbox-agent: cannot write the output: {reason}")
        self.failing = reason

    def _write_fd(self, fd: int, text: str) -> None:
        data = text.encode(self._encoding, "backslashreplace")
        written = os.write(fd, data)
        while written < len(data):  # a full disk took part of it: the rest, or its error
            self._torn = True
            step = os.write(fd, data[written:])
            if not step:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            written += step
        self._torn = False

    def _write_stream(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


class _Output:
    """The output ``configure_logging`` set up last: a reload to the same stream keeps it
    (and its count)."""

    output: LogOutput | None = None


_OUTPUT: Final = _Output()


@final
class _Notice:
    """Render the ``log_lines_lost`` line as any warning (without the context of the task
    that happened to write next)."""

    def __init__(self, processors: Sequence[Processor]) -> None:
        self._processors = processors

    def __call__(self, lost: Mapping[str, int]) -> str:
        event: object = {
            "event": LINES_LOST_EVENT,
            "lines": sum(lost.values()),
            "error": _lost_reasons(lost),
            "reasons": dict(lost),
        }
        for processor in self._processors:
            event = processor(None, "warning", cast("EventDict", event))
        # Both renderers used here (JSON with json.dumps, console) return str.
        return cast("str", event)


def _lost_reasons(lost: Mapping[str, int]) -> str:
    """Why the lines counted in ``lost`` (by reason) were lost: the reason, or each reason
    with its count, most lines first (the ``error`` of :data:`LINES_LOST_EVENT`)."""
    if len(lost) == 1:
        return next(iter(lost))
    ranked = Counter(lost).most_common()  # a tie keeps the order the reasons came in
    return "; ".join(
        f"{reason} ({count} {'line' if count == 1 else 'lines'})" for reason, count in ranked
    )


def _merge_context(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Merge the task's context variables into the line, unless its logger names its own
    component (:data:`OWN_CONTEXT_KEY`)."""
    if OWN_CONTEXT_KEY in event_dict:
        return event_dict
    return structlog.contextvars.merge_contextvars(logger, method_name, event_dict)


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _descriptor(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None


def _same_stream(one: TextIO, other: TextIO) -> bool:
    """Whether ``one`` and ``other`` write to the same file, pipe, socket or terminal."""
    if one is other:
        return True
    try:
        first, second = os.fstat(one.fileno()), os.fstat(other.fileno())
    except (OSError, ValueError):
        return False
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def _waits_for_a_reader(fd: int) -> bool:
    """Whether a write on ``fd`` may wait for a reader (a pipe, a socket, a terminal): any
    descriptor but a regular file's."""
    try:
        return not stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return True


def _flush_quietly(stream: TextIO) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):
        return


def _say_on(stream: TextIO, line: str) -> None:
    """Write ``line`` to ``stream`` if it takes it: there is nowhere else to say it."""
    try:
        stream.write(f"{line}\n")
        stream.flush()
    except (OSError, ValueError):
        return


def logs_to_journal(stream: TextIO | None = None) -> bool:
    """Whether log lines written to ``stream`` (default: ``sys.stdout``) reach systemd's
    journal, which then files each at its ``<N>`` priority (stderr goes there too)."""
    return _is_journal_stream(sys.stdout if stream is None else stream)


class _JournalPriority:
    """Wrap a renderer so its line starts with the event's syslog priority (journald strips it)."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        priority = SYSLOG_PRIORITY.get(event_dict.get("level", ""), SYSLOG_PRIORITY["info"])
        # Both renderers used here (JSON with json.dumps, console) return str.
        line = cast("str", self._renderer(logger, method_name, event_dict))
        return f"<{priority}>{line}"


def _is_journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd named in ``$JOURNAL_STREAM`` (dev:ino)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # no descriptor (io.UnsupportedOperation), or no such env
        return False


class _AgentHandler(logging.Handler):
    """The root handler ``configure_logging`` installs (and replaces when called again): it
    writes through the agent's :class:`LogOutput`."""

    def __init__(self, output: LogOutput) -> None:
        super().__init__()
        self._output = output

    def emit(self, record: logging.LogRecord) -> None:
        """Write ``record`` as a line (a line the stream refuses is counted, not raised)."""
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted, as logging does
            self.handleError(record)
            return
        self._output.msg(line)


def _route_stdlib(
    output: LogOutput, pre_chain: list[Processor], renderer: Processor, level: int
) -> None:
    handler = _AgentHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=pre_chain,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _AgentHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
