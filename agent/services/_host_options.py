"""VBoxService's options, as the host sets them in guest properties.

Admins tune VBoxService from the host (``VBoxManage guestproperty set VM
/VirtualBox/GuestAdd/VBoxService/--timesync-set-threshold 60000``): VBoxService reads every
``/VirtualBox/GuestAdd/VBoxService/--*`` property at start as if it were on its command line
(``vgsvcProcessHostOpts`` in ``VBoxService.cpp``). :func:`host_options` turns the ones a
service takes (a :class:`HostOptionTable`: :data:`TIMESYNC_OPTIONS`,
:data:`VMINFO_OPTIONS`) into settings of its section:

- numbers in VBoxService's units (s, ms, or a factor) and bounds, written as IPRT reads them
  (base 0: decimal, ``0x`` hexadecimal, a leading ``0`` octal), then converted (ms to s)
  and held to the section's own bounds; stricter than IPRT, a value with a sign, spaces or
  trailing characters is refused rather than read in part;
- the global ``--interval`` (seconds) is the default of a service's own interval option
  (``--timesync-interval``, ``--vminfo-interval``, in ms), which wins where the host sets
  both (``vgsvcTimeSyncInit``, ``vbsvcVMInfoInit``);
- ``set-start``, ``no-set-start``, ``set-on-restore`` and ``no-set-on-restore`` act by
  existing, a ``no-`` one winning over its pair, as VBoxService checks them.

A value it cannot take is refused with one line naming the property and why; the setting
falls back (to the global ``--interval``'s, or the section's). Only the host (``VBoxManage``,
Main) can set these properties: the property service keeps names under
``/VirtualBox/GuestAdd/VBoxService/`` for the host and refuses a guest's write there
(``checkHostReserved`` in ``VBoxGuestPropSvc.cpp``;
:data:`agent.protocol.guest_props.HOST_RESERVED_PREFIXES`). A section's ``host_options =
false`` is for an admin who wants the guest's config to win over the host's options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Generic, TypeVar

import structlog
from pydantic import ValidationError

from agent.protocol import AgentError, DeviceLostError
from agent.protocol.iprt_numbers import read_number
from agent.records import record
from agent.services._base import ServiceSection
from agent.services.guest_props import open_guest_properties
from agent.units import MS_PER_S

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from agent.device import Device

log = structlog.get_logger(__name__)

OPTION_PREFIX: Final = "/VirtualBox/GuestAdd/VBoxService/--"
"""Where the host sets VBoxService's options (the option's name without ``--`` follows)."""
MAX_SHOWN_CHARS: Final = 40
"""How much of a refused value a log line shows."""
MAX_SET_THRESHOLD_MS: Final = 7 * 24 * 3600 * MS_PER_S
"""VBoxService's bound on ``--timesync-set-threshold``: a week."""
MIN_INTERVAL_MS: Final = 50
MAX_INTERVAL_MS: Final = 0xFFFF_FFFE
"""VBoxService's bounds on ``--timesync-interval`` and ``--vminfo-interval`` (50 ms to
UINT32_MAX - 1 ms, 49.7 days)."""
MAX_GLOBAL_INTERVAL_S: Final = 0xFFFF_FFFF // MS_PER_S - 1
"""VBoxService's bound on the global ``--interval`` (1 s to UINT32_MAX / 1000 - 1 s)."""


@record
class NumberOption:
    """A numeric option: the section's key, VBoxService's bounds, and whether ms become s."""

    key: str
    minimum: int
    maximum: int
    to_seconds: bool = False


@record
class HostOptionTable:
    """The options a service takes from the host.

    ``numbers`` maps an option's name (without ``--``) to its setting, in the order they
    apply: a later one taken for the same key wins (the global ``interval`` comes first).
    ``flags`` are (name, key, value) of the options that act by existing, a later one
    winning.
    """

    numbers: Mapping[str, NumberOption]
    flags: Sequence[tuple[str, str, bool]] = ()


_GLOBAL_INTERVAL: Final = NumberOption("interval_s", 1, MAX_GLOBAL_INTERVAL_S)
"""``--interval`` (``vgsvcProcessGlobalOption``): seconds, the default of every interval."""
TIMESYNC_OPTIONS: Final = HostOptionTable(
    {
        "interval": _GLOBAL_INTERVAL,
        "timesync-interval": NumberOption(
            "interval_s", MIN_INTERVAL_MS, MAX_INTERVAL_MS, to_seconds=True
        ),
        "timesync-min-adjust": NumberOption("min_adjust_ms", 0, 3_600_000),
        "timesync-latency-factor": NumberOption("latency_factor", 1, 1024),
        "timesync-max-latency": NumberOption("max_latency_ms", 1, 3_600_000),
        "timesync-set-threshold": NumberOption(
            "set_threshold_s", 0, MAX_SET_THRESHOLD_MS, to_seconds=True
        ),
    },
    (
        ("timesync-set-start", "set_on_start", True),
        ("timesync-no-set-start", "set_on_start", False),
        ("timesync-set-on-restore", "set_on_restore", True),
        ("timesync-no-set-on-restore", "set_on_restore", False),
    ),
)
"""``[timesync]``'s, with VBoxService's bounds (``vgsvcTimeSyncOption``)."""
VMINFO_OPTIONS: Final = HostOptionTable(
    {
        "interval": _GLOBAL_INTERVAL,
        "vminfo-interval": NumberOption(
            "interval_s", MIN_INTERVAL_MS, MAX_INTERVAL_MS, to_seconds=True
        ),
    }
)
"""``[network]``'s and ``[users]``', VBoxService's VM-info service's (``vbsvcVMInfoOption``)."""


@record
class HostOptions:
    """The settings the host's options give, and one line per option that was refused."""

    settings: dict[str, float | bool]
    refused: list[str]


def host_options(
    properties: Mapping[str, str], section: type[ServiceSection], table: HostOptionTable
) -> HostOptions:
    """The ``section`` settings the ``table`` options in ``properties`` (name -> value) give.

    An option outside the section's bounds is refused only if no later option sets its key:
    a global ``--interval`` over ``[network]``'s bound is moot beside ``--vminfo-interval``.
    """
    settings: dict[str, float | bool] = {}
    refused: list[str] = []
    out_of_bounds: dict[str, str] = {}
    for suffix, option in table.numbers.items():
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
        value = number / MS_PER_S if option.to_seconds else number
        try:
            section.model_validate({option.key: value})
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].lower()
            exact = repr(value).removesuffix(".0")  # 3600.001, not :g's 3600
            out_of_bounds[option.key] = f"{name} = {shown}: {option.key} {exact}: {reason}"
            continue
        settings[option.key] = value
        out_of_bounds.pop(option.key, None)
    refused += out_of_bounds.values()
    settings |= {
        key: value for suffix, key, value in table.flags if OPTION_PREFIX + suffix in properties
    }
    return HostOptions(settings, refused)


async def read_host_options(
    device: Device, section: type[ServiceSection], table: HostOptionTable
) -> dict[str, float | bool] | None:
    """The settings the host's options give now, each refused one logged; None (logged) if
    the host would not list them."""
    try:
        async with open_guest_properties(device) as props:
            found = await props.enumerate([f"{OPTION_PREFIX}*"])
    except DeviceLostError:
        raise
    except AgentError as exc:  # a refusal, a broken reply, no thread free for the call
        log.warning("host_options_unreadable", error=str(exc))
        return None
    options = host_options({p.name: p.value for p in found}, section, table)
    for problem in options.refused:
        log.warning("host_option_refused", problem=problem)
    return options.settings


class HostTunedSection(ServiceSection):
    """A section the host's VBoxService options may tune (its subclass says which)."""

    host_options: bool = True


S = TypeVar("S", bound=HostTunedSection)


class HostSettings(Generic[S]):
    """The settings a service's ``table`` of host options gave at their last read, and its
    section with them over it."""

    def __init__(self, table: HostOptionTable) -> None:
        self._table = table
        self._settings: dict[str, float | bool] = {}

    async def read(self, device: Device, configured: S) -> bool:
        """Read the host's options again, unless ``configured`` turns them off; True if they
        were read (one line when what they give changed), False if not."""
        if not configured.host_options:
            return False
        settings = await read_host_options(device, type(configured), self._table)
        if settings is None:
            return False
        if settings != self._settings:
            log.info("host_options_applied", **settings)
        self._settings = settings
        return True

    def over(self, configured: S) -> S:
        """``configured`` with the host's settings over it, if it takes them."""
        return configured.model_copy(update=self._settings if configured.host_options else {})


def iprt_number(text: str) -> int | None:
    """``text`` as IPRT reads an unsigned number in base 0, or None unless it is one plain
    number: no sign, space or trailing characters (which IPRT would skip or stop at), below
    2**64."""
    number = read_number(text)
    return number.value if number is not None and number.exact else None
