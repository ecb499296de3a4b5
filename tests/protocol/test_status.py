"""VBox status codes: names, parsing and the mainline errno mapping.

Rules of this test module:

- The errno table is the reference's (linux-vboxguest.md §13), written out here as
  (status name, value, errno name) rows, independent of ``status._TO_ERRNO``.
- The check of every code against ``linux/vbox_err.h`` is in ``test_abi.py`` (it needs gcc).
"""

from __future__ import annotations

import errno

import pytest

from agent.protocol.constants import parse_event_mask
from agent.protocol.errors import VBoxStatusError
from agent.protocol.status import (
    STATUS_CODES,
    VERR_HGCM_SERVICE_NOT_FOUND,
    VINF_HGCM_ASYNC_EXECUTE,
    parse_status,
    status_name,
    status_to_errno,
)

ERRNO_TABLE = [
    ("VERR_ACCESS_DENIED", -38, "EPERM"),
    ("VERR_FILE_NOT_FOUND", -102, "ENOENT"),
    ("VERR_PROCESS_NOT_FOUND", -50, "ESRCH"),
    ("VERR_INTERRUPTED", -39, "EINTR"),
    ("VERR_DEV_IO_ERROR", -250, "EIO"),
    ("VERR_TOO_MUCH_DATA", -42, "E2BIG"),
    ("VERR_BAD_EXE_FORMAT", -608, "ENOEXEC"),
    ("VERR_INVALID_HANDLE", -4, "EBADF"),
    ("VERR_TRY_AGAIN", -52, "EAGAIN"),
    ("VERR_NO_MEMORY", -8, "ENOMEM"),
    ("VERR_INVALID_POINTER", -6, "EFAULT"),
    ("VERR_RESOURCE_BUSY", -138, "EBUSY"),
    ("VERR_ALREADY_EXISTS", -105, "EEXIST"),
    ("VERR_NOT_SAME_DEVICE", -119, "EXDEV"),
    ("VERR_NOT_A_DIRECTORY", -126, "ENOTDIR"),
    ("VERR_PATH_NOT_FOUND", -103, "ENOTDIR"),
    ("VERR_INVALID_NAME", -104, "ENOENT"),
    ("VERR_IS_A_DIRECTORY", -127, "EISDIR"),
    ("VERR_INVALID_PARAMETER", -2, "EINVAL"),
    ("VERR_TOO_MANY_OPEN_FILES", -106, "ENFILE"),
    ("VERR_INVALID_FUNCTION", -36, "ENOTTY"),
    ("VERR_SHARING_VIOLATION", -114, "ETXTBSY"),
    ("VERR_FILE_TOO_BIG", -128, "EFBIG"),
    ("VERR_DISK_FULL", -152, "ENOSPC"),
    ("VERR_SEEK_ON_DEVICE", -109, "ESPIPE"),
    ("VERR_WRITE_PROTECT", -113, "EROFS"),
    ("VERR_BROKEN_PIPE", -301, "EPIPE"),
    ("VERR_DEADLOCK", -365, "EDEADLK"),
    ("VERR_FILENAME_TOO_LONG", -120, "ENAMETOOLONG"),
    ("VERR_FILE_LOCK_FAILED", -115, "ENOLCK"),
    ("VERR_NOT_IMPLEMENTED", -12, "ENOSYS"),
    ("VERR_NOT_SUPPORTED", -37, "ENOSYS"),
    ("VERR_DIR_NOT_EMPTY", -125, "ENOTEMPTY"),
    ("VERR_TOO_MANY_SYMLINKS", -156, "ELOOP"),
    ("VERR_NO_MORE_FILES", -201, "ENODATA"),
    ("VERR_NO_DATA", -304, "ENODATA"),
    ("VERR_NET_NO_NETWORK", -405, "ENONET"),
    ("VERR_NET_NOT_UNIQUE_NAME", -406, "ENOTUNIQ"),
    ("VERR_NO_TRANSLATION", -58, "EILSEQ"),
    ("VERR_NET_NOT_SOCKET", -438, "ENOTSOCK"),
    ("VERR_NET_DEST_ADDRESS_REQUIRED", -439, "EDESTADDRREQ"),
    ("VERR_NET_MSG_SIZE", -440, "EMSGSIZE"),
    ("VERR_NET_PROTOCOL_TYPE", -441, "EPROTOTYPE"),
    ("VERR_NET_PROTOCOL_NOT_AVAILABLE", -442, "ENOPROTOOPT"),
    ("VERR_NET_PROTOCOL_NOT_SUPPORTED", -443, "EPROTONOSUPPORT"),
    ("VERR_NET_SOCKET_TYPE_NOT_SUPPORTED", -444, "ESOCKTNOSUPPORT"),
    ("VERR_NET_OPERATION_NOT_SUPPORTED", -445, "EOPNOTSUPP"),
    ("VERR_NET_PROTOCOL_FAMILY_NOT_SUPPORTED", -446, "EPFNOSUPPORT"),
    ("VERR_NET_ADDRESS_FAMILY_NOT_SUPPORTED", -447, "EAFNOSUPPORT"),
    ("VERR_NET_ADDRESS_IN_USE", -448, "EADDRINUSE"),
    ("VERR_NET_ADDRESS_NOT_AVAILABLE", -449, "EADDRNOTAVAIL"),
    ("VERR_NET_DOWN", -450, "ENETDOWN"),
    ("VERR_NET_UNREACHABLE", -451, "ENETUNREACH"),
    ("VERR_NET_CONNECTION_RESET", -452, "ENETRESET"),
    ("VERR_NET_CONNECTION_ABORTED", -453, "ECONNABORTED"),
    ("VERR_NET_CONNECTION_RESET_BY_PEER", -454, "ECONNRESET"),
    ("VERR_NET_NO_BUFFER_SPACE", -455, "ENOBUFS"),
    ("VERR_NET_ALREADY_CONNECTED", -456, "EISCONN"),
    ("VERR_NET_NOT_CONNECTED", -457, "ENOTCONN"),
    ("VERR_NET_SHUTDOWN", -458, "ESHUTDOWN"),
    ("VERR_NET_TOO_MANY_REFERENCES", -459, "ETOOMANYREFS"),
    ("VERR_TIMEOUT", -40, "ETIMEDOUT"),
    ("VERR_NET_CONNECTION_REFUSED", -461, "ECONNREFUSED"),
    ("VERR_NET_HOST_DOWN", -464, "EHOSTDOWN"),
    ("VERR_NET_HOST_UNREACHABLE", -465, "EHOSTUNREACH"),
    ("VERR_NET_ALREADY_IN_PROGRESS", -437, "EALREADY"),
    ("VERR_NET_IN_PROGRESS", -436, "EINPROGRESS"),
    ("VERR_MEDIA_NOT_PRESENT", -121, "ENOMEDIUM"),
    ("VERR_MEDIA_NOT_RECOGNIZED", -122, "EMEDIUMTYPE"),
]


class TestStatusName:
    """``status_name``."""

    def test_every_code_names_itself(self) -> None:
        """Each known code maps back to its own name (no two names share a value)."""
        for name, value in STATUS_CODES.items():
            assert status_name(value) == name

    def test_unknown_failure_gets_a_generic_label(self) -> None:
        """An unknown negative code is labelled ``VERR_UNKNOWN(rc)``."""
        assert status_name(-99999) == "VERR_UNKNOWN(-99999)"

    def test_unknown_information_gets_a_generic_label(self) -> None:
        """An unknown non-negative code is labelled ``VINF_UNKNOWN(rc)``."""
        assert status_name(31337) == "VINF_UNKNOWN(31337)"

    def test_hgcm_codes_outside_the_uapi_are_known(self) -> None:
        """The HGCM framework's codes have names."""
        assert status_name(VERR_HGCM_SERVICE_NOT_FOUND) == "VERR_HGCM_SERVICE_NOT_FOUND"
        assert status_name(VINF_HGCM_ASYNC_EXECUTE) == "VINF_HGCM_ASYNC_EXECUTE"


class TestParseStatus:
    """``parse_status``."""

    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("VERR_NO_MEMORY", -8),
            ("  verr_not_found ", -78),
            ("VINF_SUCCESS", 0),
            ("-2", -2),
            ("0x10", 16),
            ("2903", 2903),
        ],
    )
    def test_names_and_numbers_parse(self, text: str, value: int) -> None:
        """Names (any case, padded) and decimal or hex numbers give the code."""
        assert parse_status(text) == value

    @pytest.mark.parametrize("text", ["VERR_NOPE", "", "twelve", "0xZZ"])
    def test_garbage_is_refused(self, text: str) -> None:
        """Text that is neither a known name nor a number raises ``ValueError``."""
        with pytest.raises(ValueError, match="unknown VBox status"):
            parse_status(text)

    @pytest.mark.parametrize("text", ["2147483648", "-2147483649", "0x100000000"])
    def test_beyond_32_bits_is_refused(self, text: str) -> None:
        """A number no ``int32_t rc`` holds is refused: as a fault it ended the simulated host
        when the host wrote it into the request."""
        with pytest.raises(ValueError, match=r"outside -2147483648\.\.2147483647"):
            parse_status(text)

    def test_the_32_bit_bounds_parse(self) -> None:
        """The most negative and most positive 32-bit statuses are statuses."""
        assert parse_status("-2147483648") == -(1 << 31)
        assert parse_status("0x7fffffff") == (1 << 31) - 1


class TestStatusToErrno:
    """``status_to_errno`` (``vbg_status_code_to_errno``)."""

    @pytest.mark.parametrize(("name", "rc", "errno_name"), ERRNO_TABLE)
    def test_table_row(self, name: str, rc: int, errno_name: str) -> None:
        """Each row of the kernel's table maps the status to its errno."""
        assert STATUS_CODES[name] == rc
        assert status_to_errno(rc) == getattr(errno, errno_name)

    def test_table_is_complete(self) -> None:
        """The reference's table has every row the kernel has (69 of them)."""
        assert len(ERRNO_TABLE) == 69
        assert len({rc for _, rc, _ in ERRNO_TABLE}) == 69

    @pytest.mark.parametrize("rc", [-1, -10, -54, -78, -225, -2900, -(2**31)])
    def test_unlisted_failure_is_eproto(self, rc: int) -> None:
        """A failure the table does not list maps to ``EPROTO``."""
        assert status_to_errno(rc) == errno.EPROTO

    @pytest.mark.parametrize("rc", [0, 1, 78, 2903, 2**31 - 1])
    def test_success_and_information_map_to_zero(self, rc: int) -> None:
        """Success and informational codes map to 0."""
        assert status_to_errno(rc) == 0


class TestVBoxStatusError:
    """``VBoxStatusError``."""

    def test_carries_rc_name_and_operation(self) -> None:
        """The error keeps the code, its name and the operation, and says all three."""
        error = VBoxStatusError(-37, "VMMDEVREQ_GET_HOST_TIME")
        assert (error.rc, error.name, error.operation) == (
            -37,
            "VERR_NOT_SUPPORTED",
            "VMMDEVREQ_GET_HOST_TIME",
        )
        assert str(error) == "VMMDEVREQ_GET_HOST_TIME failed: VERR_NOT_SUPPORTED (-37)"


class TestParseNumbersStrictly:
    """``parse_status`` and ``parse_event_mask`` read ASCII decimal or ``0x`` hex numbers only."""

    @pytest.mark.parametrize(
        "text", ["-\u0668", "0x1_0", "1_0", "\u0660x10", "\uff11\uff16", "0o17", "0b1", "010"]
    )
    def test_a_status_in_other_digits_or_with_underscores_is_refused(self, text: str) -> None:
        """``int(text, 0)`` took these; a status is a name or a plain number."""
        with pytest.raises(ValueError, match="unknown VBox status"):
            parse_status(text)

    @pytest.mark.parametrize("text", ["0x1_0", "\u0660x10", "\uff11\uff16", "1_6", "0o20"])
    def test_an_event_mask_in_other_digits_or_with_underscores_is_refused(self, text: str) -> None:
        """The same for the numbers of an event mask."""
        with pytest.raises(ValueError, match="unknown event"):
            parse_event_mask(text)

    @pytest.mark.parametrize(("text", "value"), [("-0x10", -16), ("0X1f", 31), ("0", 0)])
    def test_plain_numbers_still_parse(self, text: str, value: int) -> None:
        """Hex takes either case of its prefix and digits, and a sign."""
        assert parse_status(text) == value
