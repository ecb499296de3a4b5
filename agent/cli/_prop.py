"""``vbox-agent prop``: read, write and wait for guest properties, as ``VBoxControl guestproperty``.

``prop [--device SPEC] get NAME | set NAME VALUE [--flags F] | delete NAME | enum [PATTERN ...]
| wait PATTERN [--timeout S]``, each with ``--json``. ``--device`` takes what ``run`` takes
(``/dev/vboxguest``, ``unix:PATH`` for a simulated host). Exit codes: 0 done; 1 not found,
wait timed out, or the host refused (one line naming the VBox status); 64 bad arguments or
a name, value, pattern or flags the service would refuse (checked before the device is
opened, so whatever the device); 69 no device, or a host that does not answer
(VERR_TIMEOUT); 70 anything else; 75 properties the host added faster than they could be
listed (try again); 78 a device path that cannot be the device (a directory, or a file
that does not answer the vboxguest handshake), as ``run`` says it.
Only warnings are logged, on stderr: stdout holds the answer alone, and a failure is one
line on stderr. A set or delete the host ignored (``VINF_PERMISSION_DENIED``: it made every
property read-only for the guest) exits 0, as VBoxControl does, with one line on stderr.
``set --json`` prints the property as it stands after the write (null fields when none
does) and ``"ignored"``; ``delete --json`` ``"deleted"`` (a property was removed) and
``"ignored"``.
A property named "" (any guest process may set one with a two-byte name buffer, which the
host takes) is listed by ``enum`` (``Name: , value: ...``; VBoxControl fails to list while
one stands) and is a change for ``wait`` only where the pattern matches "" as the host
matches it (``*``); ``get``, ``set`` and ``delete`` refuse the empty name (exit 64), as
the host refuses the one-byte buffer VBoxControl would send for it.
Text the host holds that is not valid Unicode (IPRT's UTF-8 takes code points past U+10FFFF
and five- and six-byte sequences) prints, in text and JSON, with each byte Python cannot
decode as ``\\xNN`` (:func:`agent.protocol.host_text.displayed`), as ``host prop get`` prints
it; a value the output's encoding cannot hold prints backslash-escaped.
"""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Final

import trio

from agent.cli._arguments import device_spec, positive_seconds
from agent.cli._exit import (
    EX_CONFIG,
    EX_OK,
    EX_REFUSED,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
)
from agent.cli._output import escape_unencodable, say, write_line
from agent.config import DEFAULT_DEVICE, DeviceConfig, LogConfig
from agent.device import (
    DeviceLostError,
    DeviceUnavailableError,
    NotTheDeviceError,
    open_device,
    opener_for_spec,
)
from agent.logconfig import configure_logging
from agent.protocol import AgentError, RemoteProtocolError, VBoxStatusError
from agent.protocol.errors import escaped, shown
from agent.protocol.guest_props import PropertyArgumentError
from agent.protocol.host_text import displayed
from agent.protocol.status import VERR_TIMEOUT, VINF_SUCCESS, status_name, status_text
from agent.services.guest_props import (
    PropertiesGrowingError,
    Property,
    PropertyChange,
    enum_patterns,
    name_param,
    open_guest_properties,
    open_property_watch,
    set_params,
    wait_patterns,
)

if TYPE_CHECKING:
    import argparse

    from agent.device import Device, DeviceOpener
    from agent.services.guest_props import GuestProperties

PROGRAM: Final = "vbox-agent prop"
_STATUS_HINTS: Final = {
    "VERR_PERMISSION_DENIED": "the property is read-only for the guest "
    "(RDONLYGUEST, or a name under a host-reserved prefix)",
    "VERR_TOO_MUCH_DATA": "the host holds its maximum of properties, or the value is longer "
    "than this host allows",
    "VERR_HGCM_SERVICE_NOT_FOUND": "the host offers no guest-property service",
}


class _NotFoundError(Exception):
    """The property does not exist or the wait timed out: exit 1 with this message."""


class _UsageError(Exception):
    """An argument the command cannot use: exit 64 with this message."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Give the ``prop`` parser its description, arguments and handler."""
    parser.description = (
        "Guest properties through the host's VBoxGuestPropSvc. Text that is not valid "
        "Unicode prints (text and JSON) with each undecodable byte as \\xNN."
    )
    parser.epilog = (
        "Exit status: 0 done; 1 not found, wait timed out or refused by the host; 64 bad "
        "arguments, or a name, value, pattern or flags the service would refuse (whatever "
        "the device: checked before it opens); 69 no "
        "device, or a host that does not answer; 70 anything else; 75 properties the host "
        "added faster than they could be listed (try again); 78 a --device path that cannot "
        "be the device (a directory, or a file that does not answer the vboxguest handshake)."
    )
    parser.add_argument(
        "--device",
        type=device_spec,
        metavar="SPEC",
        default=DEFAULT_DEVICE,
        help=f"device path or unix:PATH of a simulated host (default {DEFAULT_DEVICE})",
    )
    actions = parser.add_subparsers(dest="prop_action", required=True, metavar="ACTION")
    get = actions.add_parser("get", help="print a property's value")
    get.add_argument("name", metavar="NAME")
    get.set_defaults(action=_get, check=_check_name)
    set_ = actions.add_parser("set", help="set a property (its flags are replaced)")
    set_.add_argument("name", metavar="NAME")
    set_.add_argument("value", metavar="VALUE")
    set_.add_argument("--flags", help="e.g. TRANSIENT,RDONLYHOST (default: none)")
    set_.set_defaults(action=_set, check=_check_set)
    delete = actions.add_parser("delete", help="delete a property")
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(action=_delete, check=_check_name)
    enum = actions.add_parser("enum", help="list properties matching patterns (all by default)")
    enum.add_argument("patterns", nargs="*", metavar="PATTERN", help="'*' and '?' wildcards")
    enum.set_defaults(action=_enum, check=_check_enum)
    wait = actions.add_parser("wait", help="wait for the next change of a matching property")
    wait.add_argument("pattern", metavar="PATTERN", help="'*', '?', '|' between alternatives")
    wait.add_argument(
        "--timeout",
        type=positive_seconds,
        default=math.inf,
        metavar="S",
        help="give up after S seconds (default: wait until a change)",
    )
    wait.set_defaults(action=_wait, check=_check_wait)
    for action in (get, set_, delete, enum, wait):
        action.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=prop_command)


def prop_command(args: argparse.Namespace) -> int:
    """Run one ``prop`` action; return its exit code."""
    configure_logging(LogConfig(level="warning"), stream=sys.stderr)
    escape_unencodable()
    try:
        # What the service would refuse exits 64 before the device opens: a missing device
        # (69), a path that is none (78) or a wait for a host must not hide it.
        args.check(args)
        try:
            opener = opener_for_spec(args.device, ioctl_threads=DeviceConfig().ioctl_threads)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
        trio.run(_run, args, opener)
    except BrokenPipeError:
        raise  # the output's reader is gone: main's exit code, not a failure of the call
    except (ValueError, _NotFoundError, _UsageError, AgentError, OSError) as exc:
        message, code = _explain(args, exc)
        say(f"{PROGRAM} {args.prop_action}: {message}")
        return code
    return EX_OK


def _explain(args: argparse.Namespace, exc: Exception) -> tuple[str, int]:
    """The one line and the exit code for a failure."""
    if isinstance(exc, PropertyArgumentError | _UsageError):
        return str(exc), EX_USAGE
    if isinstance(exc, _NotFoundError):
        return str(exc), EX_REFUSED
    if isinstance(exc, PropertiesGrowingError):
        # No malformed reply: the host (or another guest process) added properties faster
        # than the listing's tries could follow, which a later try may outrun.
        return f"{_subject(args)}{exc}; try again", EX_TEMPFAIL
    if isinstance(exc, VBoxStatusError | RemoteProtocolError):
        return _host_failure(args, exc)
    if isinstance(exc, DeviceUnavailableError | DeviceLostError):
        # A path that cannot be the device is a mistake no retry mends: 78, as for `run`.
        return str(exc), EX_CONFIG if isinstance(exc, NotTheDeviceError) else EX_UNAVAILABLE
    return f"failed: {exc}", EX_SOFTWARE


def _host_failure(
    args: argparse.Namespace, exc: VBoxStatusError | RemoteProtocolError
) -> tuple[str, int]:
    """A refusal (1), no answer or a malformed one (69), named after the property."""
    subject = _subject(args)
    if isinstance(exc, RemoteProtocolError):
        # The host (or driver) answered against the ABI: a misbehaving host, as one that
        # broke the socket protocol, not a fault of this command.
        return f"{subject}the host's reply was malformed: {exc}", EX_UNAVAILABLE
    if exc.rc == VERR_TIMEOUT:
        # the device gave up on the host (the connect after 30 s): no answer, no refusal
        return f"{subject}the host did not answer {exc.operation} ({exc.name})", EX_UNAVAILABLE
    hint = _STATUS_HINTS.get(exc.name)
    detail = status_text(exc.rc) + (f": {hint}" if hint else "")
    return f"{subject}refused by the host: {detail}", EX_REFUSED


def _subject(args: argparse.Namespace) -> str:
    """``NAME: `` (or the wait's ``PATTERN: ``), escaped to one printable line."""
    name = getattr(args, "name", None) or getattr(args, "pattern", None)
    return f"{escaped(name)}: " if name else ""


# The checks the client makes before a call sends anything (PropertyArgumentError).


def _check_name(args: argparse.Namespace) -> None:
    name_param(args.name)


def _check_set(args: argparse.Namespace) -> None:
    set_params(args.name, args.value, args.flags)


def _check_enum(args: argparse.Namespace) -> None:
    enum_patterns(args.patterns)


def _check_wait(args: argparse.Namespace) -> None:
    wait_patterns([args.pattern])


async def _run(args: argparse.Namespace, opener: DeviceOpener) -> None:
    async with open_device(opener) as device:
        if args.action is _wait:  # the watch's own client: none for short calls
            await _wait(args, device)
            return
        async with open_guest_properties(device) as props:
            await args.action(args, props)


async def _get(args: argparse.Namespace, props: GuestProperties) -> None:
    prop = await props.get(args.name)
    if prop is None:
        msg = f"guest property {shown(args.name)} is not set"  # as `host prop get` says
        raise _NotFoundError(msg)
    write_line(json.dumps(_property_json(prop)) if args.json else displayed(prop.value))


async def _set(args: argparse.Namespace, props: GuestProperties) -> None:
    status = await props.set(args.name, args.value, args.flags)
    _note_ignored(args, status)
    if args.json:
        # What the property holds now: an ignored write (VINF_PERMISSION_DENIED) left the
        # old value, or none.
        stored = await props.get(args.name)
        shown = _property_json(stored) if stored else dict.fromkeys(_PROPERTY_FIELDS)
        write_line(
            json.dumps({**shown, "name": displayed(args.name), "ignored": status != VINF_SUCCESS})
        )


async def _delete(args: argparse.Namespace, props: GuestProperties) -> None:
    # The service deletes a missing property with success too: only a read tells them apart.
    existed = args.json and await props.get(args.name) is not None
    status = await props.delete(args.name)
    _note_ignored(args, status)
    if args.json:
        # An ignored delete (VINF_PERMISSION_DENIED) left the property standing.
        ignored = status != VINF_SUCCESS
        deleted = existed and not ignored
        write_line(
            json.dumps({"name": displayed(args.name), "deleted": deleted, "ignored": ignored})
        )


async def _enum(args: argparse.Namespace, props: GuestProperties) -> None:
    listed = await props.enumerate(args.patterns)
    if args.json:
        write_line(json.dumps([_property_json(prop) for prop in listed]))
        return
    for prop in listed:
        write_line(_property_line(prop))


def _note_ignored(args: argparse.Namespace, status: int) -> None:
    """Say on stderr that the host ignored a write it answered with success.

    With the host's global RDONLYGUEST the service answers ``VINF_PERMISSION_DENIED`` and
    changes nothing; VBoxControl counts that as success, and so does the exit code.
    """
    if status != VINF_SUCCESS:
        message = f"{_subject(args)}the host ignored the write ({status_name(status)})"
        say(f"{PROGRAM} {args.prop_action}: {message}")


async def _wait(args: argparse.Namespace, device: Device) -> None:
    """The next change of a property matching the pattern, within the timeout: the watch's
    connect and snapshot count, as the device's opening, a failure of its own, does not."""
    timeout: float = args.timeout
    change: PropertyChange | None = None
    with trio.move_on_after(timeout):
        # Read inside the block: a deadline that expires while the channel closes must
        # not lose a change already received.
        async with open_property_watch(device, [args.pattern], unseen_deletes=False) as watch:
            change = await watch.next()
    if change is None:
        msg = f"no property matching {shown(args.pattern)} changed within {timeout:g} s"
        raise _NotFoundError(msg)
    if args.json:
        write_line(json.dumps(_change_json(change)))
    elif change.deleted:
        write_line(f"Name: {displayed(change.name)}, deleted, timestamp: {change.timestamp}")
    else:
        write_line(_property_line(change))


_PROPERTY_FIELDS: Final = ("name", "value", "flags", "timestamp")
"""The keys of a property in ``--json``, in their order."""


def _property_line(prop: Property | PropertyChange) -> str:
    return (
        f"Name: {displayed(prop.name)}, value: {displayed(prop.value)}, "
        f"timestamp: {prop.timestamp}, flags: {displayed(prop.flags)}"
    )


def _property_json(prop: Property | PropertyChange) -> dict[str, object]:
    texts = (displayed(prop.name), displayed(prop.value), displayed(prop.flags))
    return dict(zip(_PROPERTY_FIELDS, (*texts, prop.timestamp), strict=True))


def _change_json(change: PropertyChange) -> dict[str, object]:
    return {**_property_json(change), "deleted": change.deleted}
