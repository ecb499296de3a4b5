"""Which balloon the driver lets the agent run, decided from what the device answers.

1. ``GET_MEMBALLOON_CHANGE_REQ`` passes through (without acknowledging): the driver leaves
   the balloon to trusted userspace, the agent owns it (*owned*). Only the driver's own
   refusal (:func:`_driver_refused`) rules this out; a failure the host answered proves the
   request passed, so the probe fails and is retried.
2. ``CHANGE_BALLOON`` with a padding byte set (:class:`~agent.protocol.ChangeBalloonProbe`):
   Oracle's driver refuses it with VERR_INVALID_PARAMETER in the reply before it looks at
   the balloon (no owner claimed, no ``fUseKernelAPI`` test, no deflate of an empty
   balloon, which a VBOX_STRICT build asserts on); the in-tree driver has no such ioctl
   (ENOTTY). On Oracle's driver the next call may move the balloon (while the driver still
   allocates the chunks itself, ``fUseKernelAPI``, which no side-effect-free call reveals),
   so the caller's gate runs before it.
3. ``CHECK_BALLOON`` (which, on Oracle's driver, makes this session the balloon's owner and
   applies the target): ``handle_in_r3`` means the agent allocates the chunks and hands them
   over (*allocated*). Otherwise the kernel allocates: on Oracle's driver the agent triggers
   each change with ``CHECK_BALLOON`` (*triggered*; a build without the allocator answers
   ``handle_in_r3`` from its first inflate on, and the service switches to *allocated*); the
   in-tree driver's kernel work item balloons by itself while event 0x40 is in some filter
   (*kernel*).
"""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING, Final

from agent.protocol import ChangeBalloonProbe, GetMemBalloonChangeRequest, VBoxStatusError
from agent.protocol.constants import BALLOON_CHUNK_SIZE
from agent.protocol.status import VERR_PERMISSION_DENIED
from agent.records import record

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.device import Device

CHUNK_MB: Final = BALLOON_CHUNK_SIZE >> 20
"""MiB in a balloon chunk, the unit every mode counts the balloon in."""


class BalloonMode(enum.StrEnum):
    """Who allocates the chunks and who moves the balloon."""

    KERNEL = "kernel"
    """In-tree driver: the kernel balloons while 0x40 is filtered; the agent only holds it."""
    TRIGGERED = "triggered"
    """Oracle's driver, kernel allocation: the agent calls CHECK_BALLOON on every 0x40."""
    ALLOCATED = "allocated"
    """Oracle's driver, ``handle_in_r3``: the agent locks chunks, CHANGE_BALLOON hands them over."""
    OWNED = "owned"
    """Passthrough: the agent sends CHANGE_MEMBALLOON with each chunk's physical pages."""

    @property
    def agent_holds_chunks(self) -> bool:
        """Whether the chunks are the agent's own memory (so it can walk and give back)."""
        return self in (BalloonMode.ALLOCATED, BalloonMode.OWNED)


@record
class Detected:
    """The mode, and the balloon size the probe saw (chunks; the target where the agent walks)."""

    mode: BalloonMode
    chunks: int


def _driver_refused(device: Device, exc: VBoxStatusError) -> bool:
    """Whether the driver itself kept a VMMDev request from the host, as it does one it
    leaves to the kernel: the in-tree driver's ``vbg_req_allowed`` fails the ioctl with
    EPERM; Oracle's ``vgdrvCheckIfVmmReqIsAllowed`` answers VERR_PERMISSION_DENIED in the
    reply. Any other failure (a status the host answered, which reaches the agent in the
    reply on both drivers) says nothing about who owns the balloon."""
    if device.oracle_driver:
        return exc.errno is None and exc.rc == VERR_PERMISSION_DENIED
    return exc.errno == errno.EPERM


async def detect_mode(device: Device, before_check: Callable[[bool], Awaitable[None]]) -> Detected:
    """Probe the driver (see the module docstring).

    Args:
        before_check: awaited just before ``CHECK_BALLOON``, with whether that call may
            allocate or free chunks in the kernel (Oracle's driver: it does while it still
            uses its own allocator).

    Raises:
        VBoxStatusError: ``GET_MEMBALLOON_CHANGE_REQ`` failed otherwise than by the
            driver's refusal (the host failed it), or ``CHECK_BALLOON`` failed (for example
            another session owns the balloon on Oracle's driver).
        RemoteProtocolError: a reply broke the ABI.
    """
    try:
        target = await device.request(GetMemBalloonChangeRequest(acknowledge=False))
    except VBoxStatusError as exc:
        if not _driver_refused(device, exc):
            raise
    else:
        return Detected(BalloonMode.OWNED, target.chunks)
    try:
        await device.request(ChangeBalloonProbe())
    except VBoxStatusError as exc:  # a status in the reply is Oracle's; an errno the in-tree's
        may_allocate = exc.errno is None
    else:  # no known driver accepts it: assume the worst
        may_allocate = True
    await before_check(may_allocate)
    status = await device.check_balloon()
    if status.handle_in_r3:
        return Detected(BalloonMode.ALLOCATED, status.chunks)
    mode = BalloonMode.TRIGGERED if may_allocate else BalloonMode.KERNEL
    return Detected(mode, status.chunks)
