"""VBoxService's timesync options, as the host sets them in guest properties.

Admins tune VBoxService's timesync from the host (``VBoxManage guestproperty set VM
/VirtualBox/GuestAdd/VBoxService/--timesync-set-threshold 60000``); VBoxService reads the
properties at start. :func:`host_options` turns them into ``[timesync]`` settings:

- numbers in VBoxService's units (ms, or a factor) and bounds, written as IPRT reads them
  (base 0: decimal, ``0x`` hexadecimal, a leading ``0`` octal), then converted (ms to s)
  and held to the section's own bounds; stricter than IPRT, a value with a sign, spaces or
  trailing characters is refused rather than read in part;
- ``set-start``, ``no-set-start``, ``set-on-restore`` and ``no-set-on-restore`` act by
  existing, a ``no-`` one winning over its pair, as VBoxService checks them.

A value it cannot take is refused with one line saying why; the section's value stays. Only
the host (``VBoxManage``, Main) can set these properties: the property service keeps names
under ``/VirtualBox/GuestAdd/VBoxService/`` for the host and refuses a guest's write there
(``checkHostReserved`` in ``VBoxGuestPropSvc.cpp``;
:data:`agent.protocol.guest_props.HOST_RESERVED_PREFIXES`). ``[timesync] host_options =
false`` is for an admin who wants the guest's config to win over the host's options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from pydantic import ValidationError

from agent.protocol.iprt_numbers import read_number
from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Mapping

    from agent.services._base import ServiceSection

OPTION_PREFIX: Final = "/VirtualBox/GuestAdd/VBoxService/--timesync-"
"""Where the host sets VBoxService's timesync options."""
MAX_SHOWN_CHARS: Final = 40
"""How much of a refused value a log line shows."""
_MS_PER_S: Final = 1000
MAX_SET_THRESHOLD_MS: Final = 7 * 24 * 3600 * _MS_PER_S
"""VBoxService's bound on ``--timesync-set-threshold``: a week."""
MIN_INTERVAL_MS: Final = 50
MAX_INTERVAL_MS: Final = 0xFFFF_FFFE
"""VBoxService's bounds on ``--timesync-interval`` (50 ms to UINT32_MAX - 1 ms, 49.7 days)."""


@record
class _NumberOption:
    """A numeric option: the section's key, VBoxService's bounds, and whether ms become s."""

    key: str
    minimum: int
    maximum: int
    to_seconds: bool = False


_NUMBER_OPTIONS: Final = {
    "interval": _NumberOption("interval_s", MIN_INTERVAL_MS, MAX_INTERVAL_MS, to_seconds=True),
    "min-adjust": _NumberOption("min_adjust_ms", 0, 3_600_000),
    "latency-factor": _NumberOption("latency_factor", 1, 1024),
    "max-latency": _NumberOption("max_latency_ms", 1, 3_600_000),
    "set-threshold": _NumberOption("set_threshold_s", 0, MAX_SET_THRESHOLD_MS, to_seconds=True),
}
"""Property suffix -> option, with VBoxService's bounds (``vgsvcTimeSyncOption``)."""
_FLAG_OPTIONS: Final = (
    ("set-start", "set_on_start", True),
    ("no-set-start", "set_on_start", False),
    ("set-on-restore", "set_on_restore", True),
    ("no-set-on-restore", "set_on_restore", False),
)
"""Options that act by existing, in VBoxService's order (the later one wins)."""


@record
class HostOptions:
    """The settings the host's options give, and one line per option that was refused."""

    settings: dict[str, float | bool]
    refused: list[str]


def host_options(properties: Mapping[str, str], section: type[ServiceSection]) -> HostOptions:
    """The ``section`` settings VBoxService's options in ``properties`` (name -> value) give."""
    settings: dict[str, float | bool] = {}
    refused: list[str] = []
    for suffix, option in _NUMBER_OPTIONS.items():
        name = OPTION_PREFIX + suffix
        text = properties.get(name)
        if text is None:
            continue
        shown = repr(text[:MAX_SHOWN_CHARS])
        number = iprt_number(text)
        if number is None or not option.minimum <= number <= option.maximum:
            refused.append(
                f"{name} = {shown}: not a whole number in {option.minimum}..{option.maximum}"
            )
            continue
        value = number / _MS_PER_S if option.to_seconds else number
        try:
            section.model_validate({option.key: value})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].lower()
            exact = repr(value).removesuffix(".0")  # 3600.001, not :g's 3600
            refused.append(f"{name} = {shown}: {option.key} {exact}: {reason}")
            continue
        settings[option.key] = value
    settings |= {
        key: value for suffix, key, value in _FLAG_OPTIONS if OPTION_PREFIX + suffix in properties
    }
    return HostOptions(settings, refused)


def iprt_number(text: str) -> int | None:
    """``text`` as IPRT reads an unsigned number in base 0, or None unless it is one plain
    number: no sign, space or trailing characters (which IPRT would skip or stop at), below
    2**64."""
    number = read_number(text)
    return number.value if number is not None and number.exact else None
