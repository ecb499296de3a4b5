"""Guest-capability ioctls: CHANGE_GUEST_CAPABILITIES (set mode) and ACQUIRE (acquire mode)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from agent.host.driver._util import U32_MAX, check_sizes, fail, fail_status
from agent.protocol import layouts as L  # noqa: N812 - the layout table
from agent.protocol.constants import (
    AGC_FLAGS_CONFIG_ACQUIRE_MODE,
    AGC_FLAGS_VALID_MASK,
    GUEST_CAPABILITIES_MASK,
    HEADER_SIZE,
    REQUESTOR_KERNEL,
    Event,
    GuestCapability,
    RequestType,
)

if TYPE_CHECKING:
    from agent.host.driver._core import Driver
    from agent.host.driver._session import DriverSession
    from agent.host.memory import GuestMemory


async def change(drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory) -> None:
    """Set or clear capabilities for this session; report the session's and the device's."""
    del memory
    layout = L.SetGuestCapsIoctl
    check_sizes(kbuf, layout.size, layout.size)
    or_mask, not_mask = layout.or_mask.get(kbuf), layout.not_mask.get(kbuf)
    if (or_mask | not_mask) & ~GUEST_CAPABILITIES_MASK:
        raise fail(errno.EINVAL)
    await set_session_caps(drv, session, or_mask, not_mask, termination=False)
    layout.session_caps.set(kbuf, session.set_guest_caps)
    layout.global_caps.set(kbuf, drv.guest_caps_host)


async def acquire(
    drv: Driver, session: DriverSession, kbuf: bytearray, memory: GuestMemory
) -> None:
    """Take (or drop) capabilities exclusively for this session."""
    del memory
    layout = L.AcquireGuestCapsIoctl
    check_sizes(kbuf, layout.size, HEADER_SIZE)
    flags = layout.flags.get(kbuf)
    or_mask, not_mask = layout.or_mask.get(kbuf), layout.not_mask.get(kbuf)
    if flags & ~AGC_FLAGS_VALID_MASK or (or_mask | not_mask) & ~GUEST_CAPABILITIES_MASK:
        raise fail(errno.EINVAL)
    await acquire_session_caps(drv, session, or_mask, not_mask, flags, termination=False)


async def set_session_caps(
    drv: Driver, session: DriverSession, or_mask: int, not_mask: int, *, termination: bool
) -> None:
    """``vbg_set_session_capabilities``."""
    async with drv.session_mutex:
        if or_mask & drv.acquire_mode_caps:
            raise fail(errno.EBUSY)
        previous = session.set_guest_caps
        wanted = (previous | or_mask) & ~not_mask & U32_MAX
        changed = previous ^ wanted
        if not changed:
            return
        drv.set_caps_tracker.update(changed, previous)
        session.set_guest_caps = wanted
        try:
            await _push_caps(drv, session, termination=termination)
        except OSError:
            if not termination:
                drv.set_caps_tracker.update(changed, wanted)
                session.set_guest_caps = previous
            raise


async def acquire_session_caps(
    drv: Driver,
    session: DriverSession,
    or_mask: int,
    not_mask: int,
    flags: int,
    *,
    termination: bool,
) -> None:
    """``vbg_acquire_session_capabilities``: nothing to add or drop reports nothing, but on
    Oracle's driver (``Driver.acquire_reports_unknown_caps``) while the host's capabilities
    are unknown (a refused report left them so), as ``vgdrvAcquireSessionCapabilities``."""
    async with drv.session_mutex:
        if drv.acquire_refuses_set_caps and drv.set_caps_tracker.mask & or_mask:
            raise fail(errno.EINVAL)
        drv.acquire_mode_caps |= or_mask
        if flags & AGC_FLAGS_CONFIG_ACQUIRE_MODE:
            return
        not_mask &= ~or_mask & session.acquired_guest_caps
        or_mask &= ~session.acquired_guest_caps
        unknown = drv.acquire_reports_unknown_caps and drv.guest_caps_host == U32_MAX
        if not or_mask and not not_mask and not unknown:
            return
        if drv.acquired_caps & or_mask:
            raise fail(errno.EBUSY)
        saved = (drv.acquired_caps, session.acquired_guest_caps)
        drv.acquired_caps = (drv.acquired_caps | or_mask) & ~not_mask
        session.acquired_guest_caps = (session.acquired_guest_caps | or_mask) & ~not_mask
        try:
            await _push_caps(drv, session, termination=termination)
        except OSError:
            if not termination:
                drv.acquired_caps, session.acquired_guest_caps = saved
            raise
    # The driver's "HACK ALERT": make the new owner resync its seamless state.
    drv.post_events(
        int(Event.SEAMLESS_MODE_CHANGE_REQUEST) if or_mask & GuestCapability.SEAMLESS else 0
    )


async def _push_caps(drv: Driver, session: DriverSession, *, termination: bool) -> None:
    """``vbg_set_host_capabilities``: report acquired | set caps if they changed."""
    caps = drv.acquired_caps | drv.set_caps_tracker.mask
    if caps == drv.guest_caps_host:
        return
    req = drv.mask_request(
        RequestType.SET_GUEST_CAPABILITIES,
        caps,
        REQUESTOR_KERNEL if termination else session.requestor,
    )
    rc = await drv.perform(req)
    drv.guest_caps_host = caps if rc >= 0 else U32_MAX
    if rc < 0:
        raise fail_status(rc)
