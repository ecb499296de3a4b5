"""Control commands for a running simulated host, as VBoxManage controls a VM.

A command is a JSON object ``{"command": NAME, ...arguments}``; the answer is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line"}``. The commands:

==================  ==============================================  =============================
command             arguments                                       result
==================  ==============================================  =============================
``balloon``         ``mb`` (int)                                    null
``prop_set``        ``name``, ``value`` (str), ``flags`` (str, "")  null
``prop_get``        ``name``                                        ``{value, flags, timestamp}``
``prop_delete``     ``name``                                        null
``event``           ``mask`` (int)                                  null
``restore``         (none)                                          null
``cpu``             ``action`` (str), ``core``, ``package`` (int)   null
``stats_interval``  ``seconds`` (int)                               null
``fault``           ``request`` (int), ``status`` (int), ``count``  null
``fault_clear``     ``request`` (int; absent: every type)           ``{cleared: int}``
``delay``           ``request`` (int), ``seconds`` (float)          null
``drop``            (none)                                          ``{dropped, closing: int}``
``status``          (none)                                          ``host.status()``
==================  ==============================================  =============================

``count`` is 1 to ``MAX_FAULT_COUNT``; ``cleared`` is how many answers the dropped faults
still held. ``status`` lists the queued ``faults``, the active ``delays`` and the
``held_requests``. ``drop``'s ``closing`` counts the sessions not closed yet (a delay holds
them, or their close waits behind a held write). ``prop_get`` answers the value and flags as
the service holds them: bytes a guest set that Python cannot decode are surrogate escapes
(``\\udcf4`` in the JSON), which ``vbox-agent host prop get`` prints as ``\\xf4``
(:mod:`agent.protocol.host_text`).

:func:`execute_control` runs one command on the host (server side); :func:`call_control`
sends one from another process (client side). ``cpu`` plugs (``action`` "plug") or unplugs
("unplug") the CPU with those ids, as ``VBoxManage controlvm plugcpu``/``unplugcpu`` do.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from agent.protocol import AgentError, RequestType
from agent.protocol.errors import escaped, shown
from agent.protocol.wire import (
    ControlReply,
    ControlRequest,
    ErrorFrame,
    FrameDecoder,
    Hello,
    Role,
    WireError,
    describe_frame,
    encode_frame,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.host.host import SimulatedHost
    from agent.protocol.wire import Frame

_T = TypeVar("_T")

RECEIVE_SIZE: Final = 64 << 10
"""Bytes asked of the socket per receive on a control connection."""
START_POLL_S: Final = 0.05
"""How often a client waiting for a starting host tries to connect again."""
_FLOAT_INT_MAX: Final = int(sys.float_info.max)
"""Largest integer a float argument may be given as (JSON numbers have no limit)."""


class HostUnreachableError(AgentError):
    """No simulated host answers on the control socket (not running, or not a host)."""


class ControlCommandError(AgentError):
    """The host refused a control command; the message is the host's one-line reason."""


class _BadCommandError(AgentError):
    """A control command is malformed (unknown name, missing or mistyped argument)."""


async def execute_control(
    host: SimulatedHost,
    payload: dict[str, object],
    *,
    drop: Callable[[], Awaitable[dict[str, int]]],
) -> dict[str, object]:
    """Run one control command on ``host`` and return the answer object.

    ``drop`` closes every device connection and returns the ``drop`` result. Errors the
    host raises for a bad value (``ValueError``, ``LookupError``) or a refusal
    (:class:`AgentError`, such as a VBox status a host service answered) become
    ``{"ok": false}`` answers; anything else is a host bug and propagates.
    """
    try:
        if payload.get("command") == "drop":
            return {"ok": True, "result": await drop()}
        result = _dispatch(host, payload)
    except (ValueError, LookupError, AgentError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return {"ok": False, "error": str(text)}
    return {"ok": True, "result": result}


def _dispatch(host: SimulatedHost, payload: dict[str, object]) -> object:
    command = payload.get("command")
    match command:
        case "balloon":
            host.set_balloon_target(_arg(payload, "mb", int))
        case "prop_set":
            flags = _arg(payload, "flags", str) if "flags" in payload else ""
            host.prop_set(_arg(payload, "name", str), _arg(payload, "value", str), flags)
        case "prop_get":
            return _prop_get(host, _arg(payload, "name", str))
        case "prop_delete":
            host.prop_delete(_arg(payload, "name", str))
        case "event":
            host.raise_events(_arg(payload, "mask", int))
        case "restore":
            host.restore()
        case "cpu":
            _cpu(host, payload)
        case "stats_interval":
            host.set_statistics_interval(_arg(payload, "seconds", int))
        case "fault" | "fault_clear":
            return _fault(host, payload)
        case "delay":
            seconds = _arg(payload, "seconds", float)
            host.add_delay(RequestType(_arg(payload, "request", int)), seconds)
        case "status":
            return host.status()
        case _:
            msg = f"unknown control command {shown(command)}"
            raise _BadCommandError(msg)
    return None


def _prop_get(host: SimulatedHost, name: str) -> dict[str, object]:
    found = host.prop_get(name)
    if found is None:
        msg = f"guest property {shown(name)} is not set"
        raise _BadCommandError(msg)
    value, flags, timestamp = found
    return {"value": value, "flags": flags, "timestamp": timestamp}


def _fault(host: SimulatedHost, payload: dict[str, object]) -> dict[str, object] | None:
    """``fault`` queues one; ``fault_clear`` drops those of ``request`` (all without)."""
    if payload.get("command") == "fault_clear":
        request = RequestType(_arg(payload, "request", int)) if "request" in payload else None
        return {"cleared": host.clear_faults(request)}
    request_type = RequestType(_arg(payload, "request", int))
    host.add_fault(request_type, _arg(payload, "status", int), _arg(payload, "count", int))
    return None


def _cpu(host: SimulatedHost, payload: dict[str, object]) -> None:
    action = _arg(payload, "action", str)
    if action not in ("plug", "unplug"):
        msg = f"control command 'cpu' needs action as 'plug' or 'unplug', not {shown(action)}"
        raise _BadCommandError(msg)
    change = host.cpu_plug if action == "plug" else host.cpu_unplug
    change(_arg(payload, "core", int), _arg(payload, "package", int))


def _arg(payload: dict[str, object], name: str, kind: type[_T]) -> _T:
    value = payload.get(name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) <= _FLOAT_INT_MAX else math.inf
    finite = not isinstance(value, float) or math.isfinite(value)
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool) or not finite:
        what = "a finite float" if kind is float else kind.__name__
        msg = f"control command {payload.get('command')!r} needs {name} as {what}"
        raise _BadCommandError(msg)
    return value


async def call_control(
    path: str | os.PathLike[str], payload: dict[str, object], *, start_wait_s: float = 0.0
) -> object:
    """Send one control command to the host listening at ``path`` and return its result.

    A host whose socket is missing or refuses connections may be starting: the call tries
    again every ``START_POLL_S`` for up to ``start_wait_s`` seconds. A path that exists and
    is not a socket can never be a host: that fails at once.

    Raises:
        HostUnreachableError: nothing (or no simulated host) answers at ``path``, or the
            answer is malformed.
        ControlCommandError: the host refused the command.
    """
    where = os.fspath(path)
    shown_where = escaped(where)  # as `prop` and `run` name a path: undecodable bytes as \xff
    stream = await _connect(where, start_wait_s)
    async with stream:
        try:
            await stream.send_all(encode_frame(Hello(Role.CONTROL)))
            decoder = FrameDecoder()
            if await _receive(stream, decoder) != Hello(Role.HOST):
                msg = f"{shown_where} is not a simulated host"
                raise HostUnreachableError(msg)
            await stream.send_all(encode_frame(ControlRequest(payload)))
            reply = await _receive(stream, decoder)
        except trio.BrokenResourceError as exc:
            msg = f"simulated host at {shown_where} dropped the control connection: {exc}"
            raise HostUnreachableError(msg) from exc
        except WireError as exc:
            msg = f"simulated host at {shown_where} sent a malformed frame: {exc}"
            raise HostUnreachableError(msg) from exc
    if not isinstance(reply, ControlReply):
        msg = f"simulated host at {shown_where} answered {describe_frame(reply)}"
        raise HostUnreachableError(msg)
    ok, error = reply.payload.get("ok"), reply.payload.get("error")
    if ok is True:
        return reply.payload.get("result")
    if ok is False and isinstance(error, str):
        raise ControlCommandError(error)
    msg = f"simulated host at {shown_where} answered a malformed reply: {shown(reply.payload)}"
    raise HostUnreachableError(msg)


async def _connect(path: str, start_wait_s: float) -> trio.SocketStream:
    deadline = trio.current_time() + start_wait_s
    shown_path = escaped(path)
    while True:
        try:
            return await trio.open_unix_socket(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if _is_other_file(path):
                msg = f"no simulated host at {shown_path}: it exists and is not a socket"
                raise HostUnreachableError(msg) from exc
            if trio.current_time() >= deadline:
                waited = f"; waited {start_wait_s:g} s for it to start" if start_wait_s else ""
                msg = (
                    f"no simulated host at {shown_path} ({exc.strerror or exc}{waited}): "
                    f"start one with `vbox-agent simulate --socket {shown_path}`"
                )
                raise HostUnreachableError(msg) from exc
        except PermissionError as exc:
            msg = (
                f"permission denied connecting to {shown_path} (a simulated host's socket is only "
                "for the user who started it)"
            )
            raise HostUnreachableError(msg) from exc
        except OSError as exc:
            msg = f"no simulated host at {shown_path} ({exc.strerror or exc})"
            raise HostUnreachableError(msg) from exc
        await trio.sleep(START_POLL_S)


def _is_other_file(path: str) -> bool:
    """Whether ``path`` exists and is not a socket (a file no host can ever listen on)."""
    try:
        return not stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


async def _receive(stream: trio.SocketStream, decoder: FrameDecoder) -> Frame:
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            msg = "the host closed the connection"
            raise trio.BrokenResourceError(msg)
        decoder.feed(data)
    if isinstance(frame, ErrorFrame):
        msg = f"the host reported an error: {frame.message}"
        raise trio.BrokenResourceError(msg)
    return frame
