"""The agent's settings: pydantic models, the TOML loader and readable config errors.

Every section is its own frozen model; ``AgentConfig()`` is the built-in default, and
``config/agent.toml`` spells out the same values. The daemon's own sections (``[device]``,
``[daemon]``, ``[log]``) are fields of :class:`AgentConfig`; every service brings its own
section model, and the caller passes them to :func:`load_config` by name (the daemon's
registry), so this module knows no service. Services receive their own section, never the
whole config or its path. TOML values are typed, so validation is strict: ``"5"`` is not a
number (an integer is still accepted where a float is expected).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.device.spec import cannot_be_the_device, check_device_spec, shown_path
from agent.ordered import exact_number, validate_ordered
from agent.protocol import AgentError
from agent.protocol.errors import shown_text
from agent.tomltext import (
    NotARegularFileError,
    TomlFileTooLargeError,
    TomlSyntaxError,
    read_toml_file,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from pydantic_core import ErrorDetails

DEFAULT_DEVICE: Final = "/dev/vboxguest"
MIN_IOCTL_THREADS: Final = 4
"""What the character-device transport needs: the event pump's wait, the short HGCM calls
beside it (the daemon's property calls and connects are short), the VMMDev requests (the
heartbeat) that no HGCM call may hold up, and the interrupt that ends the wait."""
OLD_MIN_IOCTL_THREADS: Final = 3
"""The minimum before VMMDev requests kept a thread of their own: still accepted, with one
warning, and read as :data:`MIN_IOCTL_THREADS`, so a config that followed the old
documentation does not leave the guest without an agent after an upgrade."""
MAX_IOCTL_THREADS: Final = 80
"""64 long HGCM waits (property notifications) beside the event pump take 68 threads, the
four reserved ones included; 80 leaves room for more short calls beside them. Twice this
(the workers and as many replacing abandoned calls) fits the unit's ``TasksMax=168`` with
the main thread and trio's own threads."""
OTHER_THREADS: Final = 8
"""Threads besides the ioctl workers that ``TasksMax=`` must leave room for (main, trio's,
the log's writer, the few services' own workers and a reload's reading of the file)."""
MAX_SHUTDOWN_TIMEOUT_S: Final = 13.0
"""The unit's ``TimeoutStopSec=15s`` must cover the drain plus the last second of the stop."""
MAX_RESTART_BACKOFF_S: Final = 3600.0
"""The longest restart delay: a failed service is tried again at least hourly (the balloon's
retries have the same bound)."""
MAX_RESTART_WINDOW_S: Final = 86400.0
"""The longest window the restart budget counts in: a day."""
MAX_RESTART_BUDGET: Final = 10_000
"""The supervisor keeps the time of each failure within the window, up to the budget and one
more, for each service: at most about 320 KB each."""


class _Model(BaseModel):
    """Frozen and strict; unknown keys, infinities and NaN are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class _Warnings(list[str]):
    """The validation context that collects warnings, one line each without the file (see
    :func:`load_config`)."""


class DeviceConfig(_Model):
    """Where the agent finds the VirtualBox device."""

    path: str = DEFAULT_DEVICE
    """A character device path, or ``unix:PATH`` for a simulated host's socket."""
    ioctl_threads: int = Field(default=5, ge=MIN_IOCTL_THREADS, le=MAX_IOCTL_THREADS)
    """Worker threads for ioctls, for the whole process. Blocking calls (the event pump's
    wait, property notifications) may hold all of them but three: one stays for short calls
    (property sets, HGCM connects and every other request), one for VMMDev requests (the
    heartbeat, the balloon), which no HGCM call may take since the host may hold those, and
    one for the interrupt that ends a blocked wait; long HGCM calls (property notifications)
    leave one more for the event pump's wait, so N of them need N + 4. A blocking call
    beyond that fails with a message naming this setting, while a short call waits for a
    free thread. 3, the minimum before VMMDev requests kept their thread, is deprecated: it
    is read as 4, with a warning (:attr:`AgentConfig.warnings`)."""

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        return check_device_spec(value)

    @field_validator("ioctl_threads", mode="before")
    @classmethod
    def _raise_old_minimum(cls, value: object, info: ValidationInfo) -> object:
        """The old minimum, 3, read as the new one (a warning in the context's list)."""
        if type(value) is not int or value != OLD_MIN_IOCTL_THREADS:
            return value
        if isinstance(info.context, _Warnings):
            info.context.append(
                f"device.ioctl_threads = {value}: deprecated, {MIN_IOCTL_THREADS} used: the "
                f"minimum is {MIN_IOCTL_THREADS} (was {OLD_MIN_IOCTL_THREADS}) since VMMDev "
                "requests (the heartbeat, the balloon) keep a thread no HGCM call may take; "
                f"set {MIN_IOCTL_THREADS} or more"
            )
        return MIN_IOCTL_THREADS


class DaemonConfig(_Model):
    """Shutdown and the crash-only restart policy of the supervisor."""

    shutdown_timeout_s: float = Field(default=5.0, gt=0, le=MAX_SHUTDOWN_TIMEOUT_S)
    """How long services may drain after STOPPING before they are cancelled."""
    restart_backoff_initial_s: float = Field(default=1.0, gt=0, le=MAX_RESTART_BACKOFF_S)
    """Delay before a failed service's first restart, counted from its failure (the failed
    run's drain is part of it); it doubles on each further one."""
    restart_backoff_max_s: float = Field(default=30.0, gt=0, le=MAX_RESTART_BACKOFF_S)
    """Upper bound of the restart delay."""
    restart_budget: int = Field(default=5, ge=0, le=MAX_RESTART_BUDGET)
    """Restarts of one service allowed within ``restart_window_s``; one more is fatal."""
    restart_window_s: float = Field(default=60.0, gt=0, le=MAX_RESTART_WINDOW_S)
    """The sliding window the restart budget counts in."""

    @model_validator(mode="wrap")
    @classmethod
    def _check_backoff_order(
        cls, data: object, handler: ModelWrapValidatorHandler[DaemonConfig]
    ) -> DaemonConfig:
        return validate_ordered(
            cls, data, handler, "restart_backoff_initial_s", "restart_backoff_max_s"
        )


class LogConfig(_Model):
    """Structured logging (see ``agent.logconfig``)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """The lowest level written."""
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: console lines on a terminal, JSON lines otherwise."""


M = TypeVar("M", bound=BaseModel)

CORE_SECTIONS: Final = ("device", "daemon", "log")
"""The daemon's own sections, in file order; every other section belongs to a service."""


class AgentConfig(_Model):
    """The whole configuration file.

    ``services`` holds each service's section by name (not a table of the file: each is a
    top-level ``[name]`` table); :func:`load_config` fills in every section it was given.
    """

    device: DeviceConfig = Field(default_factory=DeviceConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    services: Mapping[str, BaseModel] = Field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    """What :func:`load_config` read otherwise than the file says (a deprecated value), one
    line each naming the file and the key, for the caller to report; not a table."""

    def service_section(self, name: str, model: type[M]) -> M:
        """Return service ``name``'s section, or ``model``'s defaults if it has none.

        Raises:
            TypeError: the stored section is not a ``model``.
        """
        section = self.services.get(name)
        if section is None:
            return model()
        if not isinstance(section, model):
            msg = f"section [{name}] is a {type(section).__name__}, not a {model.__name__}"
            raise TypeError(msg)
        return section


NO_SECTIONS: Final[Mapping[str, type[BaseModel]]] = MappingProxyType({})


LISTED_PROBLEMS: Final = 20
"""The most problems one log line lists (:attr:`ConfigError.listed`), then how many more: a
file can hold thousands (about 190 characters each), and journald cuts a line of them all
into several entries (``LineMax=``, 48 KiB by default). Twenty stay well under that even
where every key and value is cut at its longest (about 700 characters a problem as JSON);
``check-config`` prints every problem, one line each."""


class ConfigError(AgentError):
    """A configuration file cannot be used.

    Attributes:
        problems: one line per problem, each naming the file, the dotted key, the bad
            value and what is allowed.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    @property
    def summary(self) -> str:
        """The first problem without its value and reason (``FILE: key``; a file that cannot
        be read or parsed keeps its whole line), and how many more there are."""
        first = self.problems[0].partition(" = ")[0] if self.problems else "no problem named"
        more = len(self.problems) - 1
        return first if more < 1 else f"{first} and {more} more problem{'s' * (more > 1)}"

    @property
    def listed(self) -> list[str]:
        """The problems one log line lists: the first :data:`LISTED_PROBLEMS`, then one
        ``and N more problems`` naming how many it leaves out."""
        more = len(self.problems) - LISTED_PROBLEMS
        if more < 1:
            return list(self.problems)
        left_out = f"and {more} more problem{'s' * (more > 1)} (check-config lists them all)"
        return [*self.problems[:LISTED_PROBLEMS], left_out]


def load_config(
    path: Path,
    sections: Mapping[str, type[BaseModel]] = NO_SECTIONS,
    *,
    check_device: bool = False,
) -> AgentConfig:
    """Read and validate the TOML file at ``path``.

    A value that is still accepted but deprecated is read as its replacement and named in
    the config's ``warnings``.

    Args:
        path: the file.
        sections: the services' section models by name (``[name]`` tables); a section the
            file leaves out gets its model's defaults.
        check_device: also refuse a ``device.path`` that ``run`` would refuse with 78 at
            its next start, as far as ``stat`` shows (:func:`_device_problem`), beside the
            file's other problems: ``check-config`` and a reload, where the agent's device
            is the file's (not ``--device`` or a simulated host).

    Raises:
        ConfigError: the file is unreadable, not a regular file, not TOML, or breaks the
            models' rules (every problem of the file, one line each).
    """
    file = shown_path(path)  # as every problem names it: a file name may hold a newline
    try:
        data = read_toml_file(path)
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror or exc}"]) from exc
    except (NotARegularFileError, TomlFileTooLargeError) as exc:
        raise ConfigError([f"{file}: {exc}"]) from exc
    except TomlSyntaxError as exc:
        raise ConfigError([_syntax_problem(file, exc)]) from exc
    allowed = [*CORE_SECTIONS, *sections]
    problems = [
        f"{file}: {_key((name,))} = {_show(data[name])}: " + _unknown("section", name, allowed)
        for name in data
        if name not in allowed
    ]
    core = {name: value for name, value in data.items() if name in CORE_SECTIONS}
    warnings = _Warnings()
    first_core = len(problems)
    config = _validate(file, AgentConfig, core, (), problems, warnings=warnings)
    if check_device and (device := _device_problem(file, core.get("device", {}))) is not None:
        problems.insert(first_core, device)  # in file order: [device] comes first
    services = {
        name: _validate(file, model, data.get(name, {}), (name,), problems, warnings=warnings)
        for name, model in sections.items()
    }
    if config is None or problems:
        raise ConfigError(problems)
    shown = tuple(f"{file}: {warning}" for warning in warnings)
    return config.model_copy(update={"services": services, "warnings": shown})


def _validate(
    file: str,
    model: type[M],
    data: object,
    where: tuple[str, ...],
    problems: list[str],
    *,
    warnings: _Warnings,
) -> M | None:
    """Validate ``data`` as ``model``; append its problems (keys prefixed with ``where``) and
    warnings."""
    try:
        return model.model_validate(data, context=warnings)
    except ValidationError as exc:
        problems.extend(
            _problem(file, model, where, error) for error in exc.errors(include_url=False)
        )
        return None


def _device_problem(file: str, data: object) -> str | None:
    """The problem of a valid ``[device]`` table (``data``) whose path ``run`` would refuse
    with 78 at its next start, as far as ``stat`` shows it without an open
    (:func:`~agent.device.spec.cannot_be_the_device`): a directory, a regular file, a node
    sysfs names other than vboxguest or vboxuser, a ``unix:`` path that exists and is not a
    socket. None for a path that may be the device (a missing one may come: the module loads
    later, a simulated host starts), or for a table that is invalid (its problems say why)."""
    try:
        spec = DeviceConfig.model_validate(data).path
    except ValidationError:
        return None
    why = cannot_be_the_device(spec)
    return None if why is None else problem_line(file, ("device", "path"), spec, why)


def _syntax_problem(file: str, exc: TomlSyntaxError) -> str:
    """``FILE: line L, column C: invalid TOML: what``."""
    where = f"{exc.where}: " if exc.where else ""
    return f"{file}: {where}invalid TOML: {exc.what}"


_BOUNDS: Final = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _problem(file: str, model: type[BaseModel], where: tuple[str, ...], error: ErrorDetails) -> str:
    loc = error["loc"]
    keys = (*where, *(str(part) for part in loc))
    return problem_line(file, keys, error["input"], _reason(model, loc, error))


def problem_line(file: str, keys: tuple[str, ...], value: object, reason: str) -> str:
    """One problem as the loader writes it: ``FILE: section.key = VALUE: reason``, the key
    and the value as the file writes them."""
    return f"{file}: {_key(keys)} = {_show(value)}: {reason}"


def _reason(model: type[BaseModel], loc: tuple[str | int, ...], error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown("key", str(loc[-1]), _allowed_keys(model, loc[:-1]))
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "model_type":
        return "must be a table"
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}"
    if kind in _BOUNDS:
        ctx_key, symbol = _BOUNDS[kind]
        return f"must be {symbol} {exact_number(error['ctx'][ctx_key])}"
    return _pydantic_reason(model, loc, error)


def _pydantic_reason(
    model: type[BaseModel], loc: tuple[str | int, ...], error: ErrorDetails
) -> str:
    """pydantic's own reason, but for an integer too large for a float (``float_type``, past
    about 1.8e308): the key's bound on that side, as for ``1e300``, else finiteness."""
    value = error["input"]
    if error["type"] != "float_type" or type(value) is not int:
        return error["msg"].replace("Input should be", "must be", 1)
    field = _table_model(model, loc[:-1]).model_fields.get(str(loc[-1])) if loc else None
    sides = (
        ("less_than_equal", "less_than") if value > 0 else ("greater_than_equal", "greater_than")
    )
    for constraint in field.metadata if field is not None else ():
        for side in sides:
            ctx_key, symbol = _BOUNDS[side]
            bound: object = getattr(constraint, ctx_key, None)
            if isinstance(bound, int | float):
                return f"must be {symbol} {exact_number(bound)}"
    return "must be a finite number"


SUGGESTION_CUTOFF: Final = 0.7
"""How alike (``difflib``'s ratio, 0 to 1) an unknown name must be to an allowed one for the
problem line to suggest it: ``enabled`` for ``enable`` (0.92), ``lvl`` for ``level`` (0.75)."""


def _unknown(kind: str, name: str, allowed: Sequence[str]) -> str:
    """``unknown KIND; allowed KINDs: ...``, naming first the allowed name closest to ``name``
    (a typo, ``enabled`` for ``enable``; case aside, ``Log`` for ``log``) where one is close
    enough."""
    from difflib import get_close_matches  # noqa: PLC0415 (only a bad file pays for it)

    folded = {candidate.casefold(): candidate for candidate in allowed}
    close = get_close_matches(name.casefold(), folded, n=1, cutoff=SUGGESTION_CUTOFF)
    hint = f" (did you mean {folded[close[0]]}?)" if close else ""
    return f"unknown {kind}{hint}; allowed {kind}s: {', '.join(allowed)}"


def _allowed_keys(model: type[BaseModel], table: tuple[str | int, ...]) -> list[str]:
    """The keys of the table at ``table`` inside ``model`` (the daemon's or a section)."""
    return list(_table_model(model, table).model_fields)


def _table_model(model: type[BaseModel], table: tuple[str | int, ...]) -> type[BaseModel]:
    """The model of the table at ``table`` inside ``model`` (as far as the path names one)."""
    node = model
    for name in table:
        annotation = node.model_fields[str(name)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        node = annotation
    return node


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _key(parts: tuple[str, ...]) -> str:
    """A dotted key as the file writes it (parts that are not bare keys quoted), cut short."""
    return shown_text(
        ".".join(part if _BARE_KEY.fullmatch(part) else _basic_string(part) for part in parts)
    )


def _show(value: object) -> str:
    """Render a TOML value as it would be written in the file, cut short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return shown_text(_basic_string(value))
    if isinstance(value, dt.date | dt.time):  # datetimes are dates too
        return value.isoformat()
    if isinstance(value, dict):
        return "{...}" if value else "{}"
    if isinstance(value, list):
        return "[...]" if value else "[]"
    return shown_text(repr(value))


_SHORT_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _basic_string(text: str) -> str:
    """``text`` as a TOML basic string on one printable line: every character that is not
    printable (C0 and C1 controls, U+2028, format characters...) escaped as TOML writes it."""
    return f'"{"".join(map(_escaped, text))}"'


def _escaped(char: str) -> str:
    """``char`` as a TOML basic string holds it, printable."""
    if (short := _SHORT_ESCAPES.get(char)) is not None:
        return short
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
