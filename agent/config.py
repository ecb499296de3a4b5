"""The agent's settings: pydantic models, the TOML loader and readable config errors.

Every section is its own frozen model; ``AgentConfig()`` is the built-in default, and
``config/agent.toml`` spells out the same values. Services receive their own section, never
the whole config or its path. TOML values are typed, so validation is strict: ``"5"`` is not
a number (an integer is still accepted where a float is expected).
"""

from __future__ import annotations

import re
import tomllib
from typing import TYPE_CHECKING, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from agent.device.spec import UNIX_PREFIX
from agent.protocol import AgentError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from pydantic_core import ErrorDetails

DEFAULT_DEVICE: Final = "/dev/vboxguest"
MAX_IOCTL_THREADS: Final = 64
MAX_SUBSCRIBER_QUEUE: Final = 1024
MAX_SHUTDOWN_TIMEOUT_S: Final = 60.0


class _Model(BaseModel):
    """Frozen and strict; unknown keys, infinities and NaN are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class DeviceConfig(_Model):
    """Where the agent finds the VirtualBox device."""

    path: str = DEFAULT_DEVICE
    """A character device path, or ``unix:PATH`` for a simulated host's socket."""
    ioctl_threads: int = Field(default=4, ge=1, le=MAX_IOCTL_THREADS)
    """Worker threads that may sit in a blocking ioctl at once."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        target = value.removeprefix(UNIX_PREFIX)
        if not target.startswith("/"):
            msg = "must be an absolute path (/dev/vboxguest) or unix:/absolute/socket/path"
            raise ValueError(msg)
        return value


class EventsConfig(_Model):
    """The event pump's fan-out."""

    subscriber_queue: int = Field(default=16, ge=1, le=MAX_SUBSCRIBER_QUEUE)
    """Events buffered per subscriber before further ones are dropped (and counted)."""


class DaemonConfig(_Model):
    """Shutdown and the crash-only restart policy of the supervisor."""

    shutdown_timeout_s: float = Field(default=5.0, gt=0, le=MAX_SHUTDOWN_TIMEOUT_S)
    """How long services may drain after STOPPING before they are cancelled."""
    restart_backoff_initial_s: float = Field(default=1.0, gt=0)
    """Delay before a failed service's first restart; it doubles on each further one."""
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    """Upper bound of the restart delay."""
    restart_budget: int = Field(default=5, ge=0)
    """Restarts of one service allowed within ``restart_window_s``; one more is fatal."""
    restart_window_s: float = Field(default=60.0, gt=0)
    """The sliding window the restart budget counts in."""

    @field_validator("restart_backoff_max_s")
    @classmethod
    def _check_backoff_order(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("restart_backoff_initial_s")
        if initial is not None and value < initial:
            msg = f"must be >= restart_backoff_initial_s ({initial:g})"
            raise ValueError(msg)
        return value


class LogConfig(_Model):
    """Structured logging (see ``agent.logconfig``)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """The lowest level written."""
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: console lines on a terminal, JSON lines otherwise."""


class AgentConfig(_Model):
    """The whole configuration file."""

    device: DeviceConfig = Field(default_factory=DeviceConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    log: LogConfig = Field(default_factory=LogConfig)


class ConfigError(AgentError):
    """A configuration file cannot be used.

    Attributes:
        problems: one line per problem, each naming the file, the dotted key, the bad
            value and what is allowed.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def load_config(path: Path) -> AgentConfig:
    """Read and validate the TOML file at ``path``.

    Raises:
        ConfigError: the file is unreadable, not TOML, or breaks the models' rules.
    """
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: {_syntax_problem(exc)}"]) from exc
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(path, error) for error in exc.errors(include_url=False)]
        raise ConfigError(problems) from exc


_TOML_POSITION: Final = re.compile(r"^(?P<what>.*) \(at (?P<where>line \d+, column \d+)\)$")


def _syntax_problem(exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's TOMLDecodeError only has the message: "Invalid value (at line 3, column 7)".
    message = str(exc)
    match = _TOML_POSITION.match(message)
    if match is None:
        return f"invalid TOML: {message}"
    return f"{match['where']}: invalid TOML: {match['what']}"


_BOUNDS: Final = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _problem(path: Path, error: ErrorDetails) -> str:
    loc = error["loc"]
    key = ".".join(str(part) for part in loc)
    return f"{path}: {key} = {_show(error['input'])}: {_reason(loc, error)}"


def _reason(loc: tuple[str | int, ...], error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key; allowed keys: {', '.join(_allowed_keys(loc[:-1]))}"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "model_type":
        return "must be a table"
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}"
    if kind in _BOUNDS:
        ctx_key, symbol = _BOUNDS[kind]
        return f"must be {symbol} {error['ctx'][ctx_key]:g}"
    return error["msg"].replace("Input should be", "must be", 1)


def _allowed_keys(section: tuple[str | int, ...]) -> list[str]:
    node: BaseModel = AgentConfig()
    for name in section:
        node = getattr(node, str(name))
    return list(type(node).model_fields)


def _show(value: object) -> str:
    """Render a TOML value as it would be written in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{...}" if value else "{}"
    return repr(value)
