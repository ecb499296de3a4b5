"""Structured logging: one structlog chain; JSON lines for journald, console lines for people.

``configure_logging`` is called by the CLI before anything logs. Third-party libraries'
stdlib ``logging`` records go through the same chain to the same stream, at the configured
level but never below warning (their info and debug lines are not the agent's story).
Loggers are not cached on first use, so calling it again on a reload changes the level and
format of every logger at once; the agent logs a few lines per event, where the cost of
an uncached logger (about a microsecond) does not show.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Final, TextIO, cast

import structlog

if TYPE_CHECKING:
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
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if not console:
        shared.append(_DICT_TRACEBACKS)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[cfg.level]),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    third_party = max(THIRD_PARTY_LEVEL, _LEVELS[cfg.level])
    _route_stdlib(out, [structlog.stdlib.add_logger_name, *shared], renderer, third_party)


def print_error(line: str, *, stream: TextIO | None = None) -> None:
    """Write ``line``, why a command failed, to ``stream`` (default: ``sys.stderr``), for the
    person or script that ran it. Under systemd the agent says it as a log line instead
    (:func:`logs_to_journal`)."""
    out = sys.stderr if stream is None else stream
    out.write(f"{line}\n")


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


class _AgentHandler(logging.StreamHandler[TextIO]):
    """The root handler ``configure_logging`` installs (and replaces when called again)."""


def _route_stdlib(
    stream: TextIO, pre_chain: list[Processor], renderer: Processor, level: int
) -> None:
    handler = _AgentHandler(stream)
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
