"""``_IOC`` number arithmetic and the ioctl numbers of ``constants.Ioctl``.

Rules of this test module:

- Expected numbers are the hex values of the reference's ioctl table (linux-vboxguest.md
  §5.2, verified there with gcc), written out literally, never recomputed with ``_ioc``.
- The gcc comparison of every number lives in ``test_abi.py``; this module checks the
  arithmetic on its own, including its edges.
"""

from __future__ import annotations

import pytest

from agent.protocol._ioc import (
    IOC_NONE,
    IOC_READ,
    IOC_SIZE_MAX,
    IOC_WRITE,
    io,
    ioc,
    ioc_dir,
    ioc_nr,
    ioc_size,
    ioc_type,
    iowr,
    without_size,
)
from agent.protocol.constants import Ioctl, IoctlFunction


class TestIoc:
    """``ioc`` and its decomposition helpers."""

    def test_iowr_sets_read_write_direction(self) -> None:
        """``iowr`` encodes direction 3, the type, the number and the size."""
        assert iowr("V", 10, 32) == 0xC020560A

    def test_io_has_no_direction_and_no_size(self) -> None:
        """``io`` encodes only the type and the number."""
        assert io("V", 3) == 0x00005603

    def test_direction_constants(self) -> None:
        """The direction bits are the asm-generic ones."""
        assert (IOC_NONE, IOC_WRITE, IOC_READ) == (0, 1, 2)

    def test_largest_size_fits(self) -> None:
        """A size of 16383 is the largest the 14-bit field holds."""
        assert IOC_SIZE_MAX == 16383
        assert ioc_size(ioc(3, "V", 2, IOC_SIZE_MAX)) == IOC_SIZE_MAX

    @pytest.mark.parametrize("size", [-1, IOC_SIZE_MAX + 1, 1 << 20])
    def test_size_out_of_range_is_refused(self, size: int) -> None:
        """A size that does not fit the size field raises ``ValueError``."""
        with pytest.raises(ValueError, match="does not fit"):
            ioc(3, "V", 2, size)

    @pytest.mark.parametrize(
        ("code", "parts"),
        [
            (0xC02C5600, (0, ord("V"), 44, 3)),
            (0x00005609, (9, ord("V"), 0, 0)),
            (0xC2285607, (7, ord("V"), 552, 3)),
        ],
    )
    def test_fields_decompose(self, code: int, parts: tuple[int, int, int, int]) -> None:
        """``ioc_nr``, ``ioc_type``, ``ioc_size`` and ``ioc_dir`` take a number apart."""
        assert (ioc_nr(code), ioc_type(code), ioc_size(code), ioc_dir(code)) == parts

    def test_without_size_clears_only_the_size(self) -> None:
        """``without_size`` keeps direction, type and number."""
        assert without_size(0xC0285607) == 0xC0005607
        assert without_size(0x00005603) == 0x00005603


class TestIoctlNumbers:
    """``constants.Ioctl`` against the reference's table."""

    @pytest.mark.parametrize(
        ("code", "expected"),
        [
            (Ioctl.DRIVER_VERSION_INFO, 0xC02C5600),
            (Ioctl.VMMDEV_REQUEST_BIG, 0x00005603),
            (Ioctl.VMMDEV_REQUEST_BIG_ALT, 0xC0005603),
            (Ioctl.HGCM_CONNECT, 0xC09C5604),
            (Ioctl.HGCM_DISCONNECT, 0xC01C5605),
            (Ioctl.LOG, 0x00005609),
            (Ioctl.WAIT_FOR_EVENTS, 0xC020560A),
            (Ioctl.INTERRUPT_ALL_WAIT_FOR_EVENTS, 0xC018560B),
            (Ioctl.CHANGE_FILTER_MASK, 0xC020560C),
            (Ioctl.ACQUIRE_GUEST_CAPABILITIES, 0xC024560D),
            (Ioctl.CHANGE_GUEST_CAPABILITIES, 0xC020560E),
            (Ioctl.CHECK_BALLOON, 0xC0205611),
            (Ioctl.CHANGE_BALLOON, 0xC0285612),
            (Ioctl.WRITE_CORE_DUMP, 0xC01C5613),
        ],
    )
    def test_fixed_numbers(self, code: int, expected: int) -> None:
        """Each fixed ioctl has the reference's number."""
        assert code == expected

    @pytest.mark.parametrize(
        ("size", "expected"),
        [
            (24, 0xC0185602),
            (28, 0xC01C5602),
            (32, 0xC0205602),
            (36, 0xC0245602),
            (40, 0xC0285602),
            (168, 0xC0A85602),
            (1024, 0xC4005602),
            (2080, 0xC8205602),
        ],
    )
    def test_vmmdev_request_sizes(self, size: int, expected: int) -> None:
        """``VMMDEV_REQUEST(s)`` carries the size."""
        assert Ioctl.vmmdev_request(size) == expected

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            (0, 0xC0285607),
            (1, 0xC0385607),
            (2, 0xC0485607),
            (3, 0xC0585607),
            (4, 0xC0685607),
            (32, 0xC2285607),
        ],
    )
    def test_hgcm_call_64_sizes(self, params: int, expected: int) -> None:
        """``HGCM_CALL_64(40 + 16n)`` matches the table."""
        assert Ioctl.hgcm_call_64(40 + 16 * params) == expected

    @pytest.mark.parametrize(
        ("params", "expected"),
        [(0, 0xC0285606), (1, 0xC0345606), (2, 0xC0405606), (3, 0xC04C5606), (4, 0xC0585606)],
    )
    def test_hgcm_call_32_sizes(self, params: int, expected: int) -> None:
        """``HGCM_CALL_32(40 + 12n)`` matches the table."""
        assert Ioctl.hgcm_call_32(40 + 12 * params) == expected

    def test_log_alt_carries_the_size(self) -> None:
        """``LOG_ALT(s)`` is the sized read-write alias of function 9."""
        assert Ioctl.log_alt(30) == 0xC0005609 | 30 << 16

    def test_function_numbers(self) -> None:
        """Function numbers are those of the header, with Oracle's 18 among them."""
        numbers = {function.name: int(function) for function in IoctlFunction}
        assert numbers["CHANGE_BALLOON"] == 18
        assert numbers["HGCM_CALL_64"] == 7
        assert numbers["WRITE_CORE_DUMP"] == 19
