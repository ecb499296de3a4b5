"""``vbox-agent host --socket PATH COMMAND``: control a running simulated host.

The commands mirror what VBoxManage does to a running VM (resize the balloon, set guest
properties, set the guest statistics interval, plug and unplug CPUs, raise events, restore a
snapshot) plus test hooks (faults, delays, dropping the device connections) and ``status``.
Each invocation sends one control command (``docs/simulator-socket.md``), waiting as the agent
does (up to ``HOST_START_WAIT_S``) for a host that is still starting. Exit codes: 0 done, 1 the
host refused (the reason is printed on one line), 64 bad arguments, 69 no host answers at the path
(or its answer is not one a simulated host gives). ``prop get`` prints a value as the guest's
``prop get`` does: text that is not valid Unicode (a guest may set bytes IPRT takes and
Python cannot decode) with each such byte as ``\\xNN`` (:mod:`agent.protocol.host_text`).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Final

import trio

from agent.cli._arguments import argument_type, integer_at_least, parse_seconds, socket_path
from agent.cli._exit import EX_OK, EX_REFUSED, EX_UNAVAILABLE
from agent.cli._output import escape_unencodable, say, write_line
from agent.device.unix import HOST_START_WAIT_S
from agent.protocol.constants import parse_event_mask, parse_request_type
from agent.protocol.errors import escaped, shown
from agent.protocol.guest_props import encode_name, encode_value, parse_flags
from agent.protocol.host_text import displayed
from agent.protocol.status import parse_status

if TYPE_CHECKING:
    from collections.abc import Callable

CONTROL_TIMEOUT_S: Final = 10.0
"""How long the CLI waits for the host to answer one command."""
MAX_STATS_INTERVAL_S: Final = 0xFFFF_FFFF
"""The statistics interval is a u32 of seconds."""
U32_MAX: Final = 0xFFFF_FFFF
"""CPU core and package ids are u32s."""
MAX_FAULT_COUNT: Final = 0xFFFF_FFFF
"""The most requests one fault answers (the host's ``MAX_FAULT_COUNT``; a test checks)."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Give the ``host`` parser its description, arguments and handler."""
    parser.description = "Send one control command to a simulated host, as VBoxManage would."
    parser.add_argument(
        "--socket", required=True, type=socket_path, metavar="PATH", help="the host's socket"
    )
    commands = parser.add_subparsers(dest="host_command", required=True, metavar="COMMAND")
    balloon = commands.add_parser("balloon", help="set the balloon target (MiB)")
    balloon.add_argument("mb", type=integer_at_least(0), metavar="MB")
    balloon.set_defaults(build=_balloon)

    prop = commands.add_parser("prop", help="set, get or delete a guest property")
    prop_commands = prop.add_subparsers(dest="prop_command", required=True, metavar="ACTION")
    prop_set = prop_commands.add_parser("set", help="set a property")
    prop_set.add_argument("name", type=_property_name, metavar="NAME")
    prop_set.add_argument("value", type=_property_value, metavar="VALUE")
    prop_set.add_argument(
        "--flags", type=_property_flags, default="", help="e.g. TRANSIENT,RDONLYGUEST"
    )
    prop_set.set_defaults(build=_prop_set)
    prop_get = prop_commands.add_parser(
        "get", help="print a property's value (each byte that is not UTF-8 as \\xNN)"
    )
    prop_get.add_argument("name", type=_property_name, metavar="NAME")
    prop_get.add_argument("--json", action="store_true", help="print name, value, flags, timestamp")
    prop_get.set_defaults(build=_prop_get, show=_show_value)
    prop_delete = prop_commands.add_parser("delete", help="delete a property")
    prop_delete.add_argument("name", type=_property_name, metavar="NAME")
    prop_delete.set_defaults(build=_prop_delete)

    event = commands.add_parser("event", help="raise host events (RESTORED, 0x10, A|B)")
    event.add_argument("mask", type=argument_type(parse_event_mask), metavar="NAME|MASK")
    event.set_defaults(build=_event)
    stats = commands.add_parser(
        "stats-interval", help="ask for a guest statistics report every SECONDS (0 stops them)"
    )
    stats.add_argument(
        "seconds", type=integer_at_least(0, at_most=MAX_STATS_INTERVAL_S), metavar="SECONDS"
    )
    stats.set_defaults(build=_stats_interval)
    cpu = commands.add_parser(
        "cpu", help="plug or unplug a CPU (by its core and package ids) as controlvm plugcpu does"
    )
    cpu.add_argument("action", choices=("plug", "unplug"), metavar="plug|unplug")
    cpu.add_argument("core", type=integer_at_least(0, at_most=U32_MAX), metavar="CORE")
    cpu.add_argument(
        "--package",
        type=integer_at_least(0, at_most=U32_MAX),
        default=0,
        metavar="P",
        help="the CPU's package id (default: 0, as VirtualBox gives every CPU)",
    )
    cpu.set_defaults(build=_cpu)
    commands.add_parser("restore", help="simulate a VM restore").set_defaults(
        build=lambda _: {"command": "restore"}
    )
    fault = commands.add_parser(
        "fault",
        help="fail the next VMMDev requests of a type, or clear the queued faults",
        usage="%(prog)s REQUEST STATUS [--count N]\n       %(prog)s [REQUEST] --clear",
    )
    fault.add_argument(
        "request",
        nargs="?",
        type=_request_type,
        metavar="REQUEST",
        help="e.g. CHANGE_MEMBALLOON or 113",
    )
    fault.add_argument(
        "status",
        nargs="?",
        type=argument_type(parse_status),
        metavar="STATUS",
        help="e.g. VERR_NO_MEMORY or -8",
    )
    fault.add_argument(
        "--count",
        type=integer_at_least(1, at_most=MAX_FAULT_COUNT),
        metavar="N",
        help=f"how many requests it fails (default: 1, at most {MAX_FAULT_COUNT})",
    )
    fault.add_argument(
        "--clear",
        action="store_true",
        help="drop the queued faults of REQUEST (of every type without REQUEST)",
    )
    fault.set_defaults(build=_fault, show=_show_cleared)
    delay = commands.add_parser("delay", help="delay every VMMDev request of a type")
    delay.add_argument(
        "request", type=_request_type, metavar="REQUEST", help="e.g. GUEST_HEARTBEAT or 219"
    )
    delay.add_argument(
        "seconds",
        type=_seconds,
        metavar="SECONDS",
        help="how long each waits from when it was written, held ones too (0: no delay)",
    )
    delay.set_defaults(build=_delay)
    drop_help = (
        "drop every device connection; answers within 1 s (a session a delay holds, or whose"
        " close waits behind a held request, closes once released)"
    )
    commands.add_parser("drop", help=drop_help).set_defaults(
        build=lambda _: {"command": "drop"}, show=_show_dropped
    )
    status = commands.add_parser("status", help="print the host's state")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(build=lambda _: {"command": "status"}, show=_show_status)
    parser.set_defaults(handler=host_command, show=None)


def host_command(args: argparse.Namespace) -> int:
    """Send the command ``args`` names; return the exit code."""
    from agent.host.control import ControlCommandError, HostUnreachableError  # noqa: PLC0415

    build: Callable[[argparse.Namespace], dict[str, object]] = args.build
    try:
        result = trio.run(_call, args.socket, build(args))
    except HostUnreachableError as exc:
        say(f"vbox-agent host: {exc}")
        return EX_UNAVAILABLE
    except ControlCommandError as exc:
        say(f"vbox-agent host: {exc}")
        return EX_REFUSED
    show: Callable[[argparse.Namespace, object], None] | None = args.show
    if show is not None:
        escape_unencodable()
        try:
            show(args, result)
        except _UnexpectedResultError:
            say(
                f"vbox-agent host: the simulated host at {escaped(args.socket)} answered "
                f"{args.host_command!r} with an unexpected result: {shown(result)}"
            )
            return EX_UNAVAILABLE
    return EX_OK


async def _call(path: str, payload: dict[str, object]) -> object:
    from agent.host.control import HostUnreachableError, call_control  # noqa: PLC0415

    try:
        with trio.fail_after(CONTROL_TIMEOUT_S):
            return await call_control(path, payload, start_wait_s=HOST_START_WAIT_S)
    except trio.TooSlowError:
        msg = f"the simulated host at {escaped(path)} did not answer within {CONTROL_TIMEOUT_S:g} s"
        raise HostUnreachableError(msg) from None


def _checked(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argument type: the text itself, once ``check`` (raising ValueError) passed it."""

    @argument_type
    def parse(text: str) -> str:
        check(text)
        return text

    return parse


# The service checks the host's name, value and flags as it checks the guest's (it only lets
# the host, not the guest, set names under the host-reserved prefixes, which these pass).
_property_name = _checked(encode_name)
_property_value = _checked(encode_value)
_property_flags = _checked(parse_flags)


@argument_type
def _request_type(text: str) -> int:
    if not text.isascii() or text != text.strip():  # 113, not '١١٣' nor ' 113'
        msg = f"unknown VMMDev request type {text!r}: expected a name such as CHANGE_MEMBALLOON"
        raise ValueError(msg)
    return int(parse_request_type(text))


def _seconds(text: str) -> float:
    try:
        seconds = parse_seconds(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        msg = f"{text!r} is not a non-negative number of seconds"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def _balloon(args: argparse.Namespace) -> dict[str, object]:
    return {"command": "balloon", "mb": args.mb}


def _stats_interval(args: argparse.Namespace) -> dict[str, object]:
    return {"command": "stats_interval", "seconds": args.seconds}


def _prop_set(args: argparse.Namespace) -> dict[str, object]:
    return {"command": "prop_set", "name": args.name, "value": args.value, "flags": args.flags}


def _prop_get(args: argparse.Namespace) -> dict[str, object]:
    return {"command": "prop_get", "name": args.name}


def _prop_delete(args: argparse.Namespace) -> dict[str, object]:
    return {"command": "prop_delete", "name": args.name}


def _cpu(args: argparse.Namespace) -> dict[str, object]:
    return {"command": "cpu", "action": args.action, "core": args.core, "package": args.package}


def _event(args: argparse.Namespace) -> dict[str, object]:
    return {"command": "event", "mask": args.mask}


def _fault(args: argparse.Namespace) -> dict[str, object]:
    usage: argparse.ArgumentParser = args.usage_parser
    if args.clear:
        for name, given in (("STATUS", args.status), ("--count", args.count)):
            if given is not None:
                usage.error(f"argument --clear: not allowed with argument {name}")
        if args.request is None:
            return {"command": "fault_clear"}
        return {"command": "fault_clear", "request": args.request}
    missing = [
        name
        for name, given in (("REQUEST", args.request), ("STATUS", args.status))
        if given is None
    ]
    if missing:
        usage.error(f"the following arguments are required: {', '.join(missing)}")
    count = 1 if args.count is None else args.count
    return {"command": "fault", "request": args.request, "status": args.status, "count": count}


def _delay(args: argparse.Namespace) -> dict[str, object]:
    return {"command": "delay", "request": args.request, "seconds": args.seconds}


class _UnexpectedResultError(Exception):
    """The host's result lacks what its command answers with (a host that is not ours)."""


def _show_value(args: argparse.Namespace, result: object) -> None:
    if not isinstance(result, dict) or not isinstance(result.get("value"), str):
        raise _UnexpectedResultError
    # As the guest's `prop get` prints it: the host holds bytes a guest set that Python cannot
    # decode as surrogate escapes.
    value, flags = displayed(result["value"]), result.get("flags")
    if args.json:  # the shape and order of `prop get --json`
        shown = {"value": value, "flags": displayed(flags) if isinstance(flags, str) else flags}
        write_line(json.dumps({"name": args.name, **shown, "timestamp": result.get("timestamp")}))
    else:
        write_line(value)


def _show_dropped(_: argparse.Namespace, result: object) -> None:
    if not isinstance(result, dict):
        raise _UnexpectedResultError
    dropped, closing = result.get("dropped"), result.get("closing")
    if not isinstance(dropped, int) or not isinstance(closing, int):
        raise _UnexpectedResultError
    held = (
        f"; {closing} still closing, behind a port write a delay holds (`host status` shows "
        "held_requests; `host delay REQUEST 0` releases them)"
        if closing
        else ""
    )
    write_line(f"dropped {dropped} device connection(s){held}")


def _show_cleared(args: argparse.Namespace, result: object) -> None:
    if not args.clear:
        return
    if not isinstance(result, dict) or not isinstance(cleared := result.get("cleared"), int):
        raise _UnexpectedResultError
    write_line(f"cleared {cleared} queued fault answer(s)")


def _show_status(args: argparse.Namespace, result: object) -> None:
    if args.json or not isinstance(result, dict):
        write_line(json.dumps(result, sort_keys=True))
        return
    for key, value in sorted(result.items()):
        shown = value if isinstance(value, str) else json.dumps(value)  # true, not True
        write_line(f"{key}: {shown}")
