"""The ABI the protocol layer speaks, as data: ioctl numbers and struct sizes and offsets.

:func:`describe_abi` is what ``vbox-agent abi --json`` prints and what the gcc ABI test
(``tests/protocol/test_abi.py``) compiles against the kernel headers. Its shape::

    {
      "ioctls":  {C expression: number},
      "structs": {C struct name: {"size": N, "offsets": {C member path: offset}}},
      "sources": {"ioctls": {C expression: source}, "structs": {C struct name: source}},
    }

Every ``ioctls`` key is a C expression that evaluates to the number with the uapi header
(plus, for Oracle's ``VBGL_IOCTL_CHANGE_BALLOON``, the test's C mirror header):

- the fixed ioctls by macro name (``VBG_IOCTL_WAIT_FOR_EVENTS``);
- the sized ioctls once for every size the agent sends, written with that size:
  ``VBG_IOCTL_VMMDEV_REQUEST(N)`` for each VMMDev request below 1 KiB,
  ``VBG_IOCTL_HGCM_CALL_64(N)`` and ``VBG_IOCTL_HGCM_CALL(N)`` for N = 40 + 16n, n = 0..32
  (``VBG_IOCTL_HGCM_CALL`` is the 64-bit userspace ABI, which is the agent's);
- ``VBG_IOCTL_LOG(s)`` once, with the literal argument ``s``: the macro is ``_IO`` and
  ignores its argument, so the number does not depend on the message length, and the
  expression compiles as written.

``sources`` says where each entry comes from: ``uapi`` (``linux/vboxguest.h``,
``linux/vbox_vmmdev_types.h``), ``vmmdev`` (the driver-private ``vmmdev.h``) or ``oracle``
(only in Oracle's headers). All numbers describe 64-bit (x86-64/arm64) userspace.
"""

from __future__ import annotations

from typing import Any, Final, TypedDict

from agent.protocol import (
    layouts as L,  # noqa: N812 - short name for the layout table
    messages,
)
from agent.protocol.constants import (
    HGCM_CALL_HEADER_SIZE,
    HGCM_MAX_PARMS,
    HGCM_PARM64_SIZE,
    VMMDEV_REQUEST_SMALL_LIMIT,
    Ioctl,
)

_FIXED_IOCTLS: Final[dict[str, int]] = {
    "VBG_IOCTL_DRIVER_VERSION_INFO": Ioctl.DRIVER_VERSION_INFO,
    "VBG_IOCTL_VMMDEV_REQUEST_BIG": Ioctl.VMMDEV_REQUEST_BIG,
    "VBG_IOCTL_HGCM_CONNECT": Ioctl.HGCM_CONNECT,
    "VBG_IOCTL_HGCM_DISCONNECT": Ioctl.HGCM_DISCONNECT,
    "VBG_IOCTL_WAIT_FOR_EVENTS": Ioctl.WAIT_FOR_EVENTS,
    "VBG_IOCTL_INTERRUPT_ALL_WAIT_FOR_EVENTS": Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS,
    "VBG_IOCTL_CHANGE_FILTER_MASK": Ioctl.CHANGE_FILTER_MASK,
    "VBG_IOCTL_ACQUIRE_GUEST_CAPABILITIES": Ioctl.ACQUIRE_GUEST_CAPABILITIES,
    "VBG_IOCTL_CHANGE_GUEST_CAPABILITIES": Ioctl.CHANGE_GUEST_CAPABILITIES,
    "VBG_IOCTL_CHECK_BALLOON": Ioctl.CHECK_BALLOON,
    "VBG_IOCTL_WRITE_CORE_DUMP": Ioctl.WRITE_CORE_DUMP,
    "VBG_IOCTL_LOG(s)": Ioctl.LOG,
}

_ORACLE_IOCTLS: Final[dict[str, int]] = {
    "VBGL_IOCTL_CHANGE_BALLOON": Ioctl.CHANGE_BALLOON,
}


class StructInfo(TypedDict):
    """A struct's ``sizeof`` and ``{C member path: offsetof}``."""

    size: int
    offsets: dict[str, int]


class AbiSources(TypedDict):
    """Where each ioctl and struct comes from: ``uapi``, ``vmmdev`` or ``oracle``."""

    ioctls: dict[str, str]
    structs: dict[str, str]


class AbiDescription(TypedDict):
    """What :func:`describe_abi` returns (a plain ``dict`` at run time)."""

    ioctls: dict[str, int]
    sources: AbiSources
    structs: dict[str, StructInfo]


def vmmdev_request_sizes() -> list[int]:
    """Return the sizes of the VMMDev requests the agent sends with ``VMMDEV_REQUEST(s)``.

    These are the fixed sizes of every VMMDev request class below 1 KiB; larger requests
    go through ``VMMDEV_REQUEST_BIG``, whose number carries no size.
    """
    sizes: set[int] = set()
    pending: list[type[messages._VmmdevRequest[Any]]] = list(
        messages._VmmdevRequest.__subclasses__()
    )
    while pending:
        klass = pending.pop()
        pending.extend(klass.__subclasses__())
        size = getattr(klass, "layout_size", None)
        if isinstance(size, int) and size < VMMDEV_REQUEST_SMALL_LIMIT:
            sizes.add(size)
    return sorted(sizes)


def hgcm_call_sizes() -> list[int]:
    """Return the ``HGCM_CALL_64`` sizes the agent sends: 40 + 16n for n = 0..32."""
    return [HGCM_CALL_HEADER_SIZE + HGCM_PARM64_SIZE * n for n in range(HGCM_MAX_PARMS + 1)]


def _ioctls() -> tuple[dict[str, int], dict[str, str]]:
    numbers: dict[str, int] = {}
    sources: dict[str, str] = {}
    for name, number in _FIXED_IOCTLS.items():
        numbers[name] = int(number)
        sources[name] = "uapi"
    for name, number in _ORACLE_IOCTLS.items():
        numbers[name] = int(number)
        sources[name] = "oracle"
    for size in vmmdev_request_sizes():
        numbers[f"VBG_IOCTL_VMMDEV_REQUEST({size})"] = Ioctl.vmmdev_request(size)
    for size in hgcm_call_sizes():
        numbers[f"VBG_IOCTL_HGCM_CALL_64({size})"] = Ioctl.hgcm_call_64(size)
        numbers[f"VBG_IOCTL_HGCM_CALL({size})"] = Ioctl.hgcm_call_64(size)
    for name in numbers:
        sources.setdefault(name, "uapi")
    return numbers, sources


def describe_abi() -> AbiDescription:
    """Return the ioctl numbers and struct layouts of the protocol layer (see the module doc).

    Keys are sorted, so ``json.dumps`` of the result is deterministic.
    """
    numbers, ioctl_sources = _ioctls()
    structs: dict[str, StructInfo] = {}
    struct_sources: dict[str, str] = {}
    for layout in sorted(L.ALL_LAYOUTS, key=lambda layout: layout.c_name):
        offsets = layout.offsets()
        structs[layout.c_name] = {
            "size": layout.size,
            "offsets": {path: offsets[path] for path in sorted(offsets)},
        }
        struct_sources[layout.c_name] = layout.source
    return {
        "ioctls": {name: numbers[name] for name in sorted(numbers)},
        "sources": {
            "ioctls": {name: ioctl_sources[name] for name in sorted(ioctl_sources)},
            "structs": struct_sources,
        },
        "structs": structs,
    }
