"""Linux ``_IOC`` ioctl number arithmetic (asm-generic encoding, used on x86 and arm64).

Bits 0-7 hold the function number, 8-15 the type character, 16-29 the argument size and
30-31 the direction. Architectures with their own encoding (alpha, mips, powerpc, sparc)
are out of scope: VirtualBox guests run on x86 and arm64.
"""

from __future__ import annotations

from typing import Final

IOC_NONE: Final = 0
IOC_WRITE: Final = 1
IOC_READ: Final = 2

_NRBITS: Final = 8
_TYPEBITS: Final = 8
_SIZEBITS: Final = 14
_NRSHIFT: Final = 0
_TYPESHIFT: Final = _NRSHIFT + _NRBITS
_SIZESHIFT: Final = _TYPESHIFT + _TYPEBITS
_DIRSHIFT: Final = _SIZESHIFT + _SIZEBITS

IOC_SIZE_MAX: Final = (1 << _SIZEBITS) - 1
"""Largest size an ioctl number can encode (16383 bytes)."""


def ioc(direction: int, type_char: str, nr: int, size: int) -> int:
    """Return the ioctl number ``_IOC(direction, type_char, nr, size)``."""
    if not 0 <= size <= IOC_SIZE_MAX:
        msg = f"ioctl size {size} does not fit the {_SIZEBITS}-bit size field"
        raise ValueError(msg)
    return (
        (direction << _DIRSHIFT)
        | (ord(type_char) << _TYPESHIFT)
        | (nr << _NRSHIFT)
        | (size << _SIZESHIFT)
    )


def iowr(type_char: str, nr: int, size: int) -> int:
    """Return ``_IOWR(type_char, nr, size)``: read-write with an encoded size."""
    return ioc(IOC_READ | IOC_WRITE, type_char, nr, size)


def io(type_char: str, nr: int) -> int:
    """Return ``_IO(type_char, nr)``: no direction and no size."""
    return ioc(IOC_NONE, type_char, nr, 0)


def ioc_nr(code: int) -> int:
    """Return the function number of an ioctl code."""
    return (code >> _NRSHIFT) & ((1 << _NRBITS) - 1)


def ioc_type(code: int) -> int:
    """Return the type character (as an int) of an ioctl code."""
    return (code >> _TYPESHIFT) & ((1 << _TYPEBITS) - 1)


def ioc_size(code: int) -> int:
    """Return the encoded argument size of an ioctl code."""
    return (code >> _SIZESHIFT) & IOC_SIZE_MAX


def ioc_dir(code: int) -> int:
    """Return the direction bits of an ioctl code."""
    return (code >> _DIRSHIFT) & 0x3


def without_size(code: int) -> int:
    """Return the ioctl code with its size field cleared (the driver's size-stripped match)."""
    return code & ~(IOC_SIZE_MAX << _SIZESHIFT)
