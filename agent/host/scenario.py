"""Scenario files: a timed script of what the "host operator" does to a simulated VM.

A scenario is TOML with an optional ``[host]`` table (how to build the host) and a list of
``[[steps]]``, each with ``at`` (seconds after the start, non-decreasing) and an ``action``
plus that action's keys:

=============  =====================================================  ===================
action         keys                                                   host call
=============  =====================================================  ===================
``balloon``    ``mb`` (int)                                           ``set_balloon_target``
``event``      ``events`` (``"RESTORED|VRDP"`` or a number)           ``raise_events``
``prop_set``   ``name``, ``value``, optional ``flags`` (str)          ``prop_set``
``prop_delete`` ``name``                                              ``prop_delete``
``restore``    (none)                                                 ``restore``
``reset``      (none)                                                 ``reset``
``fault``      ``request`` (name or number), ``status``, opt. ``count``  ``add_fault``
``delay``      ``request``, ``seconds`` (float)                       ``set_delay``
=============  =====================================================  ===================

A ``reset`` reboots the guest: every session open on the VM fails with ENODEV from then on,
so an agent playing the scenario in-process (``run --simulate``) loses its device and exits
69 (``device_lost``), as on any lost device.

Errors name the step (counting from 1), the key and the bad value (with its TOML type when
the type is wrong); property names, values and flags are checked as the guest-property
service checks them, and the ``[host]`` table's limits are the host model's, said in the
table's units. Each step is logged as it starts. A step the host refuses while playing (a
property the guest made read-only for the host) is logged and the scenario goes on, as a
failed ``VBoxManage`` command leaves the VM running.

For users, ``docs/scenarios.md`` describes the format: every key, default and limit, and
what each step shows in the log.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from agent.host._balloon import BALLOON_MAX_DENOMINATOR, BALLOON_MAX_NUMERATOR
from agent.host._faults import MAX_FAULT_COUNT
from agent.host._heartbeat import DEFAULT_INTERVAL_NS, MAX_NS, MIN_INTERVAL_NS
from agent.host._log import host_log as _log
from agent.host.driver import PERSONALITIES
from agent.host.vmmdev import DEFAULT_RAM_MB
from agent.protocol.constants import (
    MAX_GUEST_RAM_MB,
    MIN_GUEST_RAM_MB,
    VALID_EVENT_MASK,
    Event,
    RequestType,
    parse_event_mask,
    parse_request_type,
)
from agent.protocol.errors import VBoxStatusError, shown_text
from agent.protocol.guest_props import encode_name, encode_value, parse_flags
from agent.protocol.status import (
    STATUS_CODES,
    STATUS_MAX,
    STATUS_MIN,
    parse_status,
    status_name,
)
from agent.tomltext import (
    NotARegularFileError,
    TomlFileTooLargeError,
    TomlSyntaxError,
    parse_toml,
    read_toml_file,
)
from agent.units import NS_PER_MS

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from agent.host.host import SimulatedHost

MIN_HEARTBEAT_INTERVAL_MS: Final = -(-MIN_INTERVAL_NS // NS_PER_MS)
"""The host's shortest heartbeat interval, in the unit of the ``[host]`` table and of
``vbox-agent simulate``."""
MAX_HEARTBEAT_INTERVAL_MS: Final = MAX_NS // 2 // NS_PER_MS
"""The longest interval whose heartbeat timeout (twice the interval, which a scenario cannot
set) fits the host's u64 nanoseconds."""
DEFAULT_HEARTBEAT_INTERVAL_MS: Final = DEFAULT_INTERVAL_NS // NS_PER_MS
"""The interval when neither the ``[host]`` table nor ``simulate`` sets one."""
Value = int | float | str
T = TypeVar("T")


class ScenarioError(ValueError):
    """A scenario file is malformed; the message says where and why."""


@dataclass(frozen=True, slots=True)
class HostSettings:
    """How to build the host a scenario runs against (the ``[host]`` table)."""

    personality: str = "mainline"
    ram_mb: int = DEFAULT_RAM_MB
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    host_time: bool = True
    core_dumps: bool = False
    seed: int | None = None
    r3_balloon: bool = False

    @property
    def heartbeat_interval_ns(self) -> int:
        """The host's ``HeartbeatInterval``."""
        return self.heartbeat_interval_ms * NS_PER_MS

    def options(self) -> dict[str, object]:
        """Keyword arguments for :class:`~agent.host.host.SimulatedHost`."""
        return {
            "personality": self.personality,
            "ram_mb": self.ram_mb,
            "heartbeat_interval_ns": self.heartbeat_interval_ns,
            "host_time_enabled": self.host_time,
            "core_dump_enabled": self.core_dumps,
            "seed": self.seed,
            "r3_balloon": self.r3_balloon,
        }


@dataclass(frozen=True, slots=True)
class Step:
    """One action at ``at`` seconds after the scenario starts."""

    at: float
    action: str
    args: Mapping[str, Value] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated scenario."""

    host: HostSettings
    steps: tuple[Step, ...]


# --- validation ------------------------------------------------------------------------------


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an integer"
        raise TypeError(expected)
    return value


def _ram_mb(value: object) -> int:
    mb = _int(value)
    if not MIN_GUEST_RAM_MB <= mb <= MAX_GUEST_RAM_MB:
        msg = f"{mb} is not an integer in [{MIN_GUEST_RAM_MB}, {MAX_GUEST_RAM_MB}]"
        raise ValueError(msg)
    return mb


def _heartbeat_interval_ms(value: object) -> int:
    interval = _int(value)
    if interval < MIN_HEARTBEAT_INTERVAL_MS:
        msg = f"{interval} ms is below the host's shortest interval, {MIN_HEARTBEAT_INTERVAL_MS} ms"
        raise ValueError(msg)
    if interval > MAX_HEARTBEAT_INTERVAL_MS:
        msg = (
            f"{interval} ms is above {MAX_HEARTBEAT_INTERVAL_MS} ms, the longest interval whose "
            "heartbeat timeout (twice the interval) fits the host's 64-bit nanoseconds"
        )
        raise ValueError(msg)
    return interval


def _number(value: object) -> float:
    """A non-negative number, kept as written (``at = 1`` stays 1 in messages and the log)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value < math.inf  # TOML's inf and nan are floats too
    ):
        expected = "a non-negative number"
        raise TypeError(expected)
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        expected = "a string"
        raise TypeError(expected)
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        expected = "true or false"
        raise TypeError(expected)
    return value


def _name_or_integer(value: object) -> str | int:
    """A key that takes a name or its number (``request``, ``status``, ``events``)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    expected = "a name or an integer"
    raise TypeError(expected)


def _events(value: object) -> int:
    given = _name_or_integer(value)
    if isinstance(given, str):
        return parse_event_mask(given)
    if not 0 < given <= VALID_EVENT_MASK:
        msg = f"event mask {given} must be non-zero and within {VALID_EVENT_MASK:#x}"
        raise ValueError(msg)
    return parse_event_mask(f"{given:#x}")


def _request(value: object) -> int:
    given = _name_or_integer(value)
    if isinstance(given, str):
        return int(parse_request_type(given))
    try:
        return int(RequestType(given))
    except ValueError:
        msg = f"no VMMDev request type has the number {given}"
        raise ValueError(msg) from None


def _status(value: object) -> int:
    given = _name_or_integer(value)
    if isinstance(given, str):
        return parse_status(given)
    if not STATUS_MIN <= given <= STATUS_MAX:
        msg = f"VBox status {given} is outside {STATUS_MIN}..{STATUS_MAX} (a 32-bit int)"
        raise ValueError(msg)
    return given


def _str_checked_by(check: Callable[[str], object]) -> Callable[[object], str]:
    """A string that ``check`` accepts (it raises ValueError naming the problem otherwise)."""

    def checked(value: object) -> str:
        text = _str(value)
        check(text)
        return text

    return checked


_prop_name = _str_checked_by(encode_name)
_prop_value = _str_checked_by(encode_value)
_prop_flags = _str_checked_by(parse_flags)


def _action(value: object) -> str:
    if not isinstance(value, str):
        expected = f"one of {', '.join(ACTIONS)}"
        raise TypeError(expected)
    if value not in ACTIONS:
        msg = f"{value!r} is not one of {', '.join(ACTIONS)}"
        raise ValueError(msg)
    return value


def _count(value: object) -> int:
    count = _int(value)
    if not 1 <= count <= MAX_FAULT_COUNT:
        expected = f"a positive integer up to {MAX_FAULT_COUNT}"
        raise TypeError(expected)
    return count


ACTIONS: Final[dict[str, tuple[dict[str, Callable[[object], Value]], dict[str, Value]]]] = {
    "balloon": ({"mb": _int}, {}),
    "event": ({"events": _events}, {}),
    "prop_set": ({"name": _prop_name, "value": _prop_value, "flags": _prop_flags}, {"flags": ""}),
    "prop_delete": ({"name": _prop_name}, {}),
    "restore": ({}, {}),
    "reset": ({}, {}),
    "fault": ({"request": _request, "status": _status, "count": _count}, {"count": 1}),
    "delay": ({"request": _request, "seconds": _number}, {}),
}
"""Action -> (its keys with their checks, defaults of the optional keys)."""
_HOST_KEYS: Final[dict[str, Callable[[object], object]]] = {
    "personality": _str,
    "ram_mb": _ram_mb,
    "heartbeat_interval_ms": _heartbeat_interval_ms,
    "host_time": _bool,
    "core_dumps": _bool,
    "seed": _int,
    "r3_balloon": _bool,
}


def parse_scenario(text: str, *, source: str = "scenario") -> Scenario:
    """Parse and validate a scenario.

    Raises:
        ScenarioError: bad TOML, unknown keys or actions, wrong types, steps out of order.
    """
    try:
        data = parse_toml(text)
    except TomlSyntaxError as exc:
        raise _syntax_error(source, exc) from None
    return _scenario(data, source)


def _syntax_error(source: str, exc: TomlSyntaxError) -> ScenarioError:
    where = f"{exc.where}: " if exc.where else ""
    return ScenarioError(f"{source}: {where}invalid TOML: {exc.what}")


def _scenario(data: dict[str, Any], source: str) -> Scenario:
    extra = set(data) - {"host", "steps"}
    if extra:
        msg = f"{source}: unknown top-level key {min(extra)!r} (expected host, steps)"
        raise ScenarioError(msg)
    host = _host_settings(data.get("host", {}), source)
    raw_steps = data.get("steps", [])
    if not isinstance(raw_steps, list):
        msg = f"{source}: 'steps' must be an array of tables ([[steps]])"
        raise ScenarioError(msg)
    steps: list[Step] = []
    for number, raw in enumerate(raw_steps, start=1):
        step = _step(raw, f"{source}: step {number}", host)
        if steps and step.at < steps[-1].at:
            msg = (
                f"{source}: step {number}: key 'at': {step.at} is before the previous "
                f"step's {steps[-1].at}"
            )
            raise ScenarioError(msg)
        steps.append(step)
    return Scenario(host, tuple(steps))


def load_scenario(path: Path) -> Scenario:
    """Read and validate the scenario file at ``path``.

    Raises:
        ScenarioError: the file cannot be read or is invalid.
    """
    try:
        data = read_toml_file(path)
    except OSError as exc:
        msg = f"{path}: cannot read the scenario: {exc.strerror or exc}"
        raise ScenarioError(msg) from None
    except (NotARegularFileError, TomlFileTooLargeError) as exc:
        msg = f"{path}: the scenario is {exc}"
        raise ScenarioError(msg) from None
    except TomlSyntaxError as exc:
        raise _syntax_error(str(path), exc) from None
    return _scenario(data, str(path))


def _host_settings(raw: object, source: str) -> HostSettings:
    if not isinstance(raw, dict):
        msg = f"{source}: 'host' must be a table"
        raise ScenarioError(msg)
    values: dict[str, object] = {}
    for key, value in raw.items():
        check = _HOST_KEYS.get(key)
        if check is None:
            msg = f"{source}: host: unknown key {key!r} (expected {', '.join(_HOST_KEYS)})"
            raise ScenarioError(msg)
        values[key] = _checked(check, value, f"{source}: host: key {key!r}")
    settings = HostSettings(**values)  # type: ignore[arg-type]
    if settings.personality not in PERSONALITIES:
        msg = (
            f"{source}: host: key 'personality': {settings.personality!r} is not one of "
            f"{', '.join(PERSONALITIES)}"
        )
        raise ScenarioError(msg)
    if settings.r3_balloon and settings.personality != "oracle":
        msg = (
            f"{source}: host: key 'r3_balloon': only the oracle personality has it, and the "
            f"file's personality is {settings.personality!r}"
        )
        raise ScenarioError(msg)
    return settings


def _step(raw: object, where: str, host: HostSettings) -> Step:
    if not isinstance(raw, dict):
        msg = f"{where}: must be a table"
        raise ScenarioError(msg)
    for key in ("at", "action"):
        if key not in raw:
            msg = f"{where}: missing key {key!r}"
            raise ScenarioError(msg)
    at = _checked(_number, raw["at"], f"{where}: key 'at'")
    action = _checked(_action, raw["action"], f"{where}: key 'action'")
    checks, defaults = ACTIONS[action]
    where = f"{where} ({action})"
    args: dict[str, Value] = dict(defaults)
    for key, value in raw.items():
        if key in ("at", "action"):
            continue
        check = checks.get(key)
        if check is None:
            expected = ", ".join(checks) or "no other keys"
            msg = f"{where}: unknown key {key!r} (expected {expected})"
            raise ScenarioError(msg)
        args[key] = _checked(check, value, f"{where}: key {key!r}")
    missing = [key for key in checks if key not in args]
    if missing:
        msg = f"{where}: missing key {missing[0]!r}"
        raise ScenarioError(msg)
    limit = host.ram_mb * BALLOON_MAX_NUMERATOR // BALLOON_MAX_DENOMINATOR
    if action == "balloon" and not 0 <= int(args["mb"]) < limit:
        msg = f"{where}: key 'mb': {args['mb']} is not in [0, {limit}) for {host.ram_mb} MB RAM"
        raise ScenarioError(msg)
    return Step(at, action, args)


def _checked(check: Callable[[object], T], value: object, where: str) -> T:
    """``check(value)``; a TypeError says what was expected, a ValueError the whole problem."""
    try:
        return check(value)
    except TypeError as exc:
        msg = f"{where}: expected {exc}, got {_described(value)}"
        raise ScenarioError(msg) from None
    except ValueError as exc:
        msg = f"{where}: {exc}"
        raise ScenarioError(msg) from None


_TOML_TYPES: Final = (
    (bool, "boolean"),  # before int: a bool is an int too
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (dt.datetime, "date-time"),  # before date: a datetime is a date too
    (dt.date, "date"),
    (dt.time, "time"),
)


def _described(value: object) -> str:
    """A TOML value as its type's name in TOML and its text: ``boolean true``, ``time 00:00:05``."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    kind = next(name for cls, name in _TOML_TYPES if isinstance(value, cls))
    if isinstance(value, bool):
        return f"{kind} {str(value).lower()}"
    if isinstance(value, str):
        return f"{kind} {shown_text(repr(value))}"
    if isinstance(value, dt.date | dt.time):
        return f"{kind} {value.isoformat()}"
    return f"{kind} {value}"


# --- playing ---------------------------------------------------------------------------------


async def play_scenario(host: SimulatedHost, scenario: Scenario) -> None:
    """Run the steps of ``scenario`` on ``host`` at their times (from now, on trio's clock).

    Each step is logged (``scenario_step``, with its number and keys) as it starts. A step the
    host refuses (a bad value, no such service, a VBox status such as VERR_PERMISSION_DENIED
    for a property the guest made read-only for the host) is logged after it
    (``scenario_step_refused``, with its number) and the next one runs at its time.
    """
    start = trio.current_time()
    for number, step in enumerate(scenario.steps, start=1):
        await trio.sleep_until(start + step.at)
        # Logged first: a reset's new boot logs its own lines before the reset returns.
        _log.info("scenario_step", step=number, action=step.action, **step_fields(step))
        try:
            await _apply(host, step)
        except (ValueError, LookupError, VBoxStatusError) as exc:
            _log.warning("scenario_step_refused", step=number, action=step.action, error=str(exc))


def step_fields(step: Step) -> dict[str, Value]:
    """A step's keys for its log line, by name as a scenario writes them (``events = "VRDP"``,
    ``request = "GET_HOST_TIME"``, ``status = "VERR_NO_MEMORY"``); an event mask also as the
    number the agent's ``event_waiter_opened`` line shows its filter in."""
    keys, _ = ACTIONS[step.action]
    fields = {key: step.args[key] for key in keys}  # in the table's order, defaults included
    if "events" in fields:
        mask = int(fields["events"])
        fields["events"] = "|".join(str(event.name) for event in Event if mask & event)
        fields["mask"] = f"{mask:#x}"
    if "request" in fields:
        fields["request"] = RequestType(int(fields["request"])).name
    if "status" in fields:
        rc = int(fields["status"])
        name = status_name(rc)
        fields["status"] = name if STATUS_CODES.get(name) == rc else rc
    return fields


async def _apply(host: SimulatedHost, step: Step) -> None:
    args = step.args
    match step.action:
        case "balloon":
            host.set_balloon_target(int(args["mb"]))
        case "event":
            host.raise_events(int(args["events"]))
        case "prop_set":
            host.prop_set(str(args["name"]), str(args["value"]), str(args["flags"]))
        case "prop_delete":
            host.prop_delete(str(args["name"]))
        case "restore":
            host.restore()
        case "reset":
            await host.reset()
        case "fault":
            host.add_fault(int(args["request"]), int(args["status"]), int(args["count"]))
        case _:
            host.set_delay(int(args["request"]), float(args["seconds"]))
