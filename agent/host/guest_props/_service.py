"""``GuestPropertyService``: the simulated host's VBoxGuestPropSvc."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from agent.host._release import RELEASE_REVISION, RELEASE_VERSION
from agent.protocol.errors import VBoxStatusError, escaped
from agent.protocol.guest_props import (
    ALLFLAGS,
    ENUM_TERMINATOR,
    MAX_CALLS_PER_CLIENT,
    MAX_PATTERN_SIZE,
    MAX_PROPS,
    MAX_VALUE_SIZE,
    NILFLAG,
    RDONLYGUEST,
    SERVICE_NAME,
    TRANSIENT,
    TRANSRESET,
    FlagsParseError,
    GuestFunction,
    format_flags,
    parse_flags,
)
from agent.protocol.host_text import host_bytes
from agent.protocol.iprt_numbers import U64_MASK, read_number
from agent.protocol.iprt_utf8 import validate_utf8
from agent.protocol.prop_patterns import patterns_match
from agent.protocol.status import (
    VERR_BUFFER_OVERFLOW,
    VERR_NOT_FOUND,
    VERR_NOT_IMPLEMENTED,
    VERR_PARSE_ERROR,
    VERR_PERMISSION_DENIED,
    VERR_TOO_MUCH_DATA,
    VINF_SUCCESS,
)

from . import _host, _params
from ._limits import (
    RESET_COUNTER,
    RESUME_COUNTER,
    SYSPREP_ARGS,
    SYSPREP_EXEC,
    VBOX_REV,
    VBOX_VER,
    VBOX_VER_EXT,
)
from ._notify import write_out
from ._params import GuestCallError
from ._store import PropertyStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.host.hgcm_service import HgcmCallHandle

_HOST_PROP_FLAGS: Final = TRANSIENT | RDONLYGUEST
"""The flags of every property the service sets itself (§5.9)."""


@dataclass(frozen=True, slots=True)
class HostVersion:
    """What the ``/VirtualBox/HostInfo/VBox*`` properties report."""

    version: str = RELEASE_VERSION
    version_ext: str = RELEASE_VERSION
    revision: str = RELEASE_REVISION


class GuestPropertyService:
    """The guest-property HGCM service, with the host-side calls of Main and VBoxManage.

    Guest calls arrive through the :class:`~agent.host.hgcm_service.HgcmService` methods.
    VM life-cycle events come from the simulated host:

    - :meth:`power_on` at VM start (and again after a power-off), before any guest call;
    - :meth:`reset` for a VM reset only (the RESET notification plus Console's TRANSRESET
      cleanup). It must not be called for a restore: it bumps ResetCounter;
    - :meth:`restore` when the VM is restored from a saved state, *before* the framework
      re-submits the pending calls through :meth:`call`. It forgets pending waits without
      completing them; the re-submitted GET_NOTIFICATION calls then wait again (timestamp
      0) or get VWRN_NOT_FOUND (any other timestamp, as the new queue does not know it);
    - :meth:`resume` after the re-submission and whenever else the VM resumes.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], int] = time.time_ns,
        max_value_size: int = MAX_VALUE_SIZE,
        host_version: HostVersion = HostVersion(),
    ) -> None:
        self._max_value_size = max_value_size
        self._host_version = host_version
        self._store = PropertyStore(clock)
        self._host_version_set = False
        self._functions: dict[int, Callable[[HgcmCallHandle], int | None]] = {
            GuestFunction.GET_PROP: self._get_prop,
            GuestFunction.SET_PROP: self._set_prop,
            GuestFunction.SET_PROP_VALUE: self._set_prop,
            GuestFunction.DEL_PROP: self._del_prop,
            GuestFunction.ENUM_PROPS: self._enum_props,
            GuestFunction.GET_NOTIFICATION: self._get_notification,
        }
        """The guest functions by number."""

    # -- HgcmService -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name guests connect to."""
        return SERVICE_NAME

    @property
    def max_calls_per_client(self) -> int:
        """Pending calls one client may have."""
        return MAX_CALLS_PER_CLIENT

    def connect(self, client_id: int, requestor: int) -> int:
        """Accept every client: the service keeps no per-client data."""
        return VINF_SUCCESS

    def disconnect(self, client_id: int) -> None:
        """Complete the client's waits with VERR_INTERRUPTED."""
        self._store.notifier.interrupt(client_id)

    def call(self, call: HgcmCallHandle) -> None:
        """Run a guest call; GET_NOTIFICATION may stay pending."""
        handler = self._functions.get(call.function)
        try:
            status = VERR_NOT_IMPLEMENTED if handler is None else handler(call)
        except GuestCallError as exc:
            status = exc.rc
        if status is not None:
            call.complete(status)

    def cancel(self, call: HgcmCallHandle) -> None:
        """Do nothing: the real service has no cancel hook (``pfnCancelled`` is NULL).

        A cancelled wait stays queued, and counted by the framework, until the client's
        next GET_NOTIFICATION sweeps it, a change matches it, or the client disconnects.
        """

    def reset(self) -> None:
        """VM reset: waits end with VERR_INTERRUPTED, TRANSRESET properties go, ResetCounter + 1.

        Console deletes TRANSRESET properties through the host API, so one that is also
        RDONLYHOST is refused and stays.
        """
        self._store.notifier.interrupt()
        for prop in self._store.in_order():
            if prop.flags & TRANSRESET:
                self._store.delete(prop.name, is_guest=False)
        self._increment(RESET_COUNTER)

    # -- VM life cycle ---------------------------------------------------------------------

    def power_on(self) -> None:
        """VM start: TRANSIENT properties are gone, a new instance sets the host properties."""
        self._store.notifier.interrupt()
        self._store.drop(TRANSIENT | TRANSRESET)
        self._restart()
        self._ensure_host_version()

    def restore(self) -> None:
        """Restore from a saved state: a new instance, properties reloaded as they were.

        Pending waits are forgotten without completion: the framework re-submits them.
        """
        self._restart()

    def resume(self) -> None:
        """The VM resumes: version properties unless set since the restart; ResumeCounter + 1."""
        self._ensure_host_version()
        self._increment(RESUME_COUNTER)

    # -- host side (Main, VBoxManage) ------------------------------------------------------

    def host_set(self, name: str, value: str, flags: str = "") -> None:
        """Set a property as the host; its flags are replaced by ``flags``.

        Raises:
            ValueError: invalid name, value or flags.
            VBoxStatusError: the service refused it: VERR_PERMISSION_DENIED (the property
                is RDONLYHOST) or VERR_TOO_MUCH_DATA (the service is full).
        """
        if not name:
            _host.check_name(name)  # Main's session refuses it: the service never sees it
        timestamp = self._store.timestamp()  # setProperty's first step: a refusal uses it up
        _host.check_name(name)
        _host.check_value(value, self._max_value_size)
        bits = parse_flags(flags)
        status = self._store.set(name, value, bits, timestamp, is_guest=False)
        _raise_for_host("setting", name, status)

    def host_get(self, name: str) -> tuple[str, str, int] | None:
        """Return ``(value, flags, timestamp)`` of a property, or None when it does not exist.

        Raises:
            ValueError: invalid name.
        """
        _host.check_name(name)
        prop = self._store.get(name)
        if prop is None:
            return None
        return prop.value, format_flags(prop.flags), prop.timestamp

    def host_delete(self, name: str) -> None:
        """Delete a property as the host; deleting a missing one does nothing.

        Raises:
            ValueError: invalid name.
            VBoxStatusError: the service refused it: VERR_PERMISSION_DENIED (the property
                is RDONLYHOST).
        """
        _host.check_name(name)
        _raise_for_host("deleting", name, self._store.delete(name, is_guest=False))

    def host_enumerate(self, patterns: str = "") -> list[tuple[str, str, int, str]]:
        """Return ``(name, value, timestamp, flags)`` of the properties matching ``patterns``.

        ``patterns`` is a ``|``-separated list of ``*``/``?`` patterns; empty matches all.

        Raises:
            ValueError: ``patterns`` is too long.
        """
        raw = _host.check_patterns(patterns)
        return [
            (prop.name, prop.value, prop.timestamp, format_flags(prop.flags))
            for prop in self._store.in_order()
            if patterns_match(raw, host_bytes(prop.name))
        ]

    def set_global_flags(self, flags: int) -> None:
        """Set the service-wide flags; RDONLYGUEST makes guest writes succeed as no-ops.

        Raises:
            ValueError: ``flags`` has unknown bits.
        """
        if flags < 0 or flags & ~ALLFLAGS:
            msg = f"unknown global flags {flags:#x}: only {ALLFLAGS:#x} are defined"
            raise ValueError(msg)
        self._store.global_flags = flags

    # -- guest functions -------------------------------------------------------------------

    def _del_prop(self, call: HgcmCallHandle) -> int:
        params = call.params
        _params.check_count(params, 1)
        name, raw_name = _params.c_string(params[0])
        _params.check_name(raw_name)
        return self._store.delete(name, is_guest=True)

    def _get_prop(self, call: HgcmCallHandle) -> int:
        name, out, timestamp, size = _params.get_prop_params(call.params)
        prop = self._store.get(name)
        if prop is None:
            return VERR_NOT_FOUND
        data = prop.answer
        size.value = len(data)
        if len(data) > len(out.data):
            return VERR_BUFFER_OVERFLOW
        out.data[: len(data)] = data
        timestamp.value = prop.timestamp
        return VINF_SUCCESS

    def _set_prop(self, call: HgcmCallHandle) -> int:
        timestamp = self._store.timestamp()  # before any check: a refused set uses it up
        params = call.params
        _params.check_count(params, 2, 3)
        strings = [_params.c_string(parm) for parm in params]
        (name, raw_name), (value, raw_value) = strings[0], strings[1]
        _params.check_name(raw_name)
        _params.check_value(raw_value, self._max_value_size)
        flags = NILFLAG  # the two-parameter form resets the flags
        if len(strings) == 3:
            try:
                flags = parse_flags(strings[2][0])
            except FlagsParseError:
                return VERR_PARSE_ERROR
        return self._store.set(name, value, flags, timestamp, is_guest=True)

    def _enum_props(self, call: HgcmCallHandle) -> int:
        params = call.params
        _params.check_count(params, 3)
        _, patterns = _params.c_string(params[0])
        out = _params.buffer(params[1])
        size = _params.u32(params[2])
        if len(patterns) > MAX_PATTERN_SIZE:
            return VERR_TOO_MUCH_DATA
        status = _check_later_patterns(patterns)
        if status != VINF_SUCCESS:
            return status
        # Inner NULs separate patterns too (double-NUL lists); the last byte ends the string.
        packed = bytes(patterns[:-1]).replace(b"\0", b"|")
        needed = offset = 0
        room = len(out.data)
        for prop in self._store.in_order():
            name = host_bytes(prop.name)
            if not patterns_match(packed, name):
                continue
            entry = b"%s\0%s\0%d\0%s\0" % (
                name,
                host_bytes(prop.value),
                prop.timestamp,
                format_flags(prop.flags).encode(),
            )
            needed += len(entry)
            if len(entry) > room:
                room = 0  # entries after the first that does not fit are skipped too
                continue
            out.data[offset : offset + len(entry)] = entry
            offset += len(entry)
            room -= len(entry)
        size.value = needed + len(ENUM_TERMINATOR)
        if room < len(ENUM_TERMINATOR):
            return VERR_BUFFER_OVERFLOW
        out.data[offset : offset + len(ENUM_TERMINATOR)] = ENUM_TERMINATOR
        return VINF_SUCCESS

    def _get_notification(self, call: HgcmCallHandle) -> int | None:
        params = call.params
        _params.check_count(params, 4)
        patterns = host_bytes(_params.c_string(params[0])[0])
        timestamp = _params.u64(params[1])
        _params.buffer(params[2])
        _params.u32(params[3])
        status, entry = VINF_SUCCESS, None
        if timestamp.value != 0:
            status, entry = self._store.notifier.find_old(patterns, timestamp.value)
        if entry is None:
            return self._store.notifier.add_wait(call, patterns, status)
        written = write_out(params, entry, deleted=self._store.get(entry.name) is None)
        return written if written < 0 else status

    # -- helpers -------------------------------------------------------------------------

    def _increment(self, name: str) -> None:
        """``incrementCounterProp``: the value as ``RTStrToUInt64`` reads it, plus one (a
        u64, in decimal), which is 0 when it has no number to read; 1 when there is no such
        property."""
        prop = self._store.get(name)
        number = None if prop is None else read_number(prop.value)
        count = ((0 if number is None else number.value) + 1) & U64_MASK
        self._store.set(name, str(count), _HOST_PROP_FLAGS, self._store.timestamp(), is_guest=False)

    def _set_host_props(self, *props: tuple[str, str]) -> None:
        """Set ``props`` as the host, dated one timestamp and the nanoseconds after it."""
        timestamp = self._store.timestamp()
        for offset, (name, value) in enumerate(props):
            self._store.set(name, value, _HOST_PROP_FLAGS, timestamp + offset, is_guest=False)

    def _ensure_host_version(self) -> None:
        """The POWER_ON/RESUME notification: set the version properties once per instance."""
        if not self._host_version_set:
            self._set_host_version()
            self._host_version_set = True

    def _set_host_version(self) -> None:
        """``setHostVersionProps``: one timestamp T, the three properties dated T, T+1, T+2."""
        version = self._host_version
        self._set_host_props(
            (VBOX_VER, version.version),
            (VBOX_VER_EXT, version.version_ext),
            (VBOX_REV, version.revision),
        )

    def _restart(self) -> None:
        """A new service instance: ``initialize()`` sets the host properties, then Main
        bulk-loads the properties the old instance held.

        The counters and Sysprep properties take a timestamp of their own after the version
        properties', so with a coarse clock the first seven changes are dated C, C+1, C+2,
        C+1, C+2, C+3, C+4: the notification queue is not in timestamp order.
        """
        saved = self._store.restart()
        self._set_host_version()
        self._set_host_props(
            (RESET_COUNTER, "0"),
            (RESUME_COUNTER, "0"),
            (SYSPREP_EXEC, ""),
            (SYSPREP_ARGS, ""),
        )
        self._store.bulk_load(saved)
        self._host_version_set = False


def _check_later_patterns(raw: bytes | bytearray) -> int:
    """ENUM_PROPS' check of the patterns after the first (``HGCMSvcGetCStr`` checked that).

    After each inner NUL the rest of the buffer must hold a NUL-terminated string IPRT
    takes (``RTStrValidateEncodingEx`` with ``ZERO_TERMINATED``), and the call fails with
    that function's own status: IPRT's for bad UTF-8 before a NUL
    (:func:`~agent.protocol.iprt_utf8.validate_utf8`), VERR_BUFFER_OVERFLOW when no NUL
    follows. So a buffer with inner NULs must end with one.
    """
    start = raw.find(0)
    while 0 <= start < len(raw) - 1:
        rest = raw[start + 1 :]
        end = rest.find(0)
        status = validate_utf8(rest if end < 0 else rest[:end])
        if status != VINF_SUCCESS:
            return status
        if end < 0:
            return VERR_BUFFER_OVERFLOW
        start += 1 + end
    return VINF_SUCCESS


def _raise_for_host(action: str, name: str, status: int) -> None:
    """Raise the failure status the service answered a host ``action`` on ``name`` with, as
    VBoxGuestPropSvc returns it to the host's caller (the VM runs on); a success returns."""
    if status == VERR_PERMISSION_DENIED:
        why = "read-only for the host"
    elif status == VERR_TOO_MUCH_DATA:
        why = f"the service holds {MAX_PROPS} properties"
    else:
        return
    raise VBoxStatusError(status, f"{action} guest property {escaped(name)} ({why})")
