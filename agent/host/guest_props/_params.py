"""Reading guest call parameters the way ``HGCMSvcGet*`` does, and the name and value checks.

Strings are checked as IPRT checks UTF-8 (:mod:`agent.protocol.iprt_utf8`), which takes
more than Python's decoder (code points past U+10FFFF, five- and six-byte sequences) and
refuses U+FFFE and U+FFFF. The service holds the text a guest sent as a ``str`` whose bytes
Python cannot decode are escaped (``surrogateescape``: the host refuses real surrogates, so
none is ambiguous: :mod:`agent.protocol.host_text`, as the client holds it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.host.hgcm_service import HostBuffer, HostParm, HostU32, HostU64
from agent.protocol.guest_props import MAX_NAME_SIZE, MIN_NAME_SIZE, NAME_FORBIDDEN_BYTES_RE
from agent.protocol.host_text import host_str
from agent.protocol.iprt_utf8 import utf8_fault
from agent.protocol.status import VERR_INVALID_PARAMETER, VERR_TOO_MUCH_DATA

if TYPE_CHECKING:
    from collections.abc import Sequence

_find_forbidden_byte: Final = NAME_FORBIDDEN_BYTES_RE.search
"""Bound once: a method call on an imported name is not specialised (see
:mod:`agent.host._header_fields`), and every property call checks a name."""


class GuestCallError(Exception):
    """A guest call fails with the VBox status ``rc``."""

    def __init__(self, rc: int) -> None:
        super().__init__(rc)
        self.rc = rc


CString = tuple[str, bytearray]
"""A string parameter: its text up to the first NUL, and the whole buffer (raw)."""


def check_count(params: Sequence[HostParm], *counts: int) -> None:
    """Fail with VERR_INVALID_PARAMETER unless there are ``counts`` parameters."""
    if len(params) not in counts:
        raise GuestCallError(VERR_INVALID_PARAMETER)


def get_prop_params(params: Sequence[HostParm]) -> tuple[str, HostBuffer, HostU64, HostU32]:
    """Return GET_PROP's name, value buffer, timestamp and size, checked as ``getProperty``
    does: four parameters, the name as :func:`c_string` and :func:`check_name` read it, the
    value buffer as :func:`buffer` checks it. Every refusal is VERR_INVALID_PARAMETER, so
    their order does not show.

    Stricter than ``getProperty`` in one respect, deliberately: it also refuses a timestamp
    that is not a 64-bit value or a size that is not a 32-bit one, which upstream sets
    (``HGCMSvcSetU64``, ``HGCMSvcSetU32``) without checking their types. The agent sends
    those types; code that sends others finds out here rather than on a real host.

    Those checks written out in one function: every guest-property read passes here.
    """
    if len(params) != 4:
        raise GuestCallError(VERR_INVALID_PARAMETER)
    name, out, timestamp, size = params
    # ``type(x) is``: the parameter classes are final (see ``write_back``).
    if (
        type(name) is not HostBuffer
        or type(out) is not HostBuffer
        or not out.data
        or type(timestamp) is not HostU64
        or type(size) is not HostU32
    ):
        raise GuestCallError(VERR_INVALID_PARAMETER)
    raw = bytes(name.data)
    text = _NAMES.get(raw)
    if text is None:
        text = _checked_name(raw)
    return text, out, timestamp, size


MAX_NAMES: Final = 256
"""Name buffers whose check :func:`get_prop_params` remembers: far more than an agent reads,
few enough that names a guest makes up cannot grow the table; others are checked each time."""
_NAMES: Final[dict[bytes, str]] = {}
"""The name buffers that passed the check (each whole, past its NUL too) and the names they
hold: the check depends on the bytes alone, so a buffer that passed once passes again."""


def _checked_name(raw: bytes) -> str:
    """The name in a GET_PROP name buffer, checked as :func:`c_string` and :func:`check_name`
    do; remembered while :data:`MAX_NAMES` are not."""
    end = raw.find(0)
    if end < 0 or not MIN_NAME_SIZE <= len(raw) <= MAX_NAME_SIZE or _find_forbidden_byte(raw):
        raise GuestCallError(VERR_INVALID_PARAMETER)
    text = _text(raw[:end])
    if len(_NAMES) < MAX_NAMES:
        _NAMES[raw] = text
    return text


def c_string(parm: HostParm) -> CString:
    """Return a string parameter: a non-empty buffer, a NUL inside, UTF-8 as IPRT takes it
    up to the NUL."""
    if not isinstance(parm, HostBuffer):
        raise GuestCallError(VERR_INVALID_PARAMETER)
    raw = parm.data  # not copied: the callers only read it, and keep what they decode
    end = raw.find(0)
    if end < 0:
        raise GuestCallError(VERR_INVALID_PARAMETER)
    return _text(raw[:end]), raw


def _text(raw: bytes | bytearray) -> str:
    """The text of a string (its bytes before the NUL) IPRT takes, as the service holds it:
    what IPRT refuses is VERR_INVALID_PARAMETER, as ``HGCMSvcGetCStr``'s callers answer."""
    if utf8_fault(raw) is not None:
        raise GuestCallError(VERR_INVALID_PARAMETER)
    return host_str(raw)


def buffer(parm: HostParm) -> HostBuffer:
    """Return a non-empty buffer parameter: ``HGCMSvcGetBuf`` refuses size 0.

    So a guest cannot ask for the needed size with an empty buffer; it must offer at least
    one byte and read the size that comes back with VERR_BUFFER_OVERFLOW.
    """
    if not isinstance(parm, HostBuffer) or not parm.data:
        raise GuestCallError(VERR_INVALID_PARAMETER)
    return parm


def u32(parm: HostParm) -> HostU32:
    """Return a 32-bit parameter."""
    if not isinstance(parm, HostU32):
        raise GuestCallError(VERR_INVALID_PARAMETER)
    return parm


def u64(parm: HostParm) -> HostU64:
    """Return a 64-bit parameter."""
    if not isinstance(parm, HostU64):
        raise GuestCallError(VERR_INVALID_PARAMETER)
    return parm


def check_name(raw: bytes | bytearray) -> None:
    """``GuestPropValidateName`` of a name's ``raw`` buffer: size 2..64, no ``*?|`` anywhere."""
    if not MIN_NAME_SIZE <= len(raw) <= MAX_NAME_SIZE:
        raise GuestCallError(VERR_INVALID_PARAMETER)
    if _find_forbidden_byte(raw):
        raise GuestCallError(VERR_INVALID_PARAMETER)


def check_value(raw: bytes | bytearray, max_size: int) -> None:
    """``GuestPropValidateValue`` of a value's ``raw`` buffer: NUL included, at most
    ``max_size`` bytes."""
    if len(raw) > max_size:
        raise GuestCallError(VERR_TOO_MUCH_DATA)
