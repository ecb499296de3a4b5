"""Sans-IO framing of the simulated-host socket protocol (``docs/simulator-socket.md``).

Both ends use it: the agent's :mod:`agent.device.unix` client and the simulated host's
:mod:`agent.host.server`. A frame is a u32 little-endian body length followed by the body;
the body starts with a u8 :class:`FrameKind`. Frames are frozen dataclasses;
:func:`encode_frame` turns one into bytes and :class:`FrameDecoder` turns bytes back into
frames, h11 style (``feed`` then ``next_frame`` until it returns ``None``).

Decoding a malformed frame raises :class:`WireError` (a ``RemoteProtocolError``: the peer
broke the protocol) and nothing else. Encoding a frame that breaks a limit raises
:class:`WireLimitError` (a ``LocalProtocolError``).
"""

from __future__ import annotations

import enum
import itertools
import json
import struct
from typing import Final, assert_never

from agent.protocol.constants import HGCM_MAX_PARMS, HGCM_MAX_USER_PARM, MAX_IOCTL_SIZE
from agent.protocol.errors import LocalProtocolError, RemoteProtocolError, shown
from agent.records import record

WIRE_VERSION: Final = 1
"""The ``wire`` value every HELLO carries; a peer speaking another version is refused."""
MAX_FRAME_SIZE: Final = MAX_IOCTL_SIZE + 2 * HGCM_MAX_USER_PARM
"""Largest frame body (64 MiB): a 16 MiB ioctl buffer plus two 24 MiB user buffers.

Every single limit of the driver fits (the largest ioctl buffer, the largest user buffer
with its call); the sum of 32 maximal user buffers (768 MiB) does not, and the client
refuses such a call with ``E2BIG``.
"""
MAX_USER_BUFFERS: Final = HGCM_MAX_PARMS
"""User buffers per ioctl: one per HGCM parameter at most."""
MAX_JSON_SIZE: Final = 1 << 20
"""Largest CONTROL or ERROR body (1 MiB)."""
MAX_HELLO_SIZE: Final = 1 << 10
"""Largest HELLO body (1 KiB): its three JSON fields take under 60 bytes."""
MAX_HELLO_FRAME_SIZE: Final = 1 + MAX_HELLO_SIZE
"""Largest frame length (kind byte and body) of a HELLO: all a receiver awaiting the peer's
HELLO admits, so a connection that has not said who it is cannot make it buffer more."""
MAX_CONTROL_FRAME_SIZE: Final = 1 + MAX_JSON_SIZE
"""Largest frame length of a CONTROL request or reply, or an ERROR: all a control
connection carries."""
MAX_ERRNO: Final = 4095
"""Largest errno Linux returns from a system call (``MAX_ERRNO``)."""

_LENGTH: Final = struct.Struct("<I")
_KIND: Final = struct.Struct("<B")
_IOCTL_REQUEST: Final = struct.Struct("<IIII")  # seq, code, buffer length, user buffer count
_IOCTL_REPLY: Final = struct.Struct("<IIII")  # seq, errno, buffer length, user buffer count
_REQUEST_USER_BUFFER: Final = struct.Struct("<QI")  # address, length
_REPLY_USER_BUFFER: Final = struct.Struct("<I")  # length
_SEQ: Final = struct.Struct("<I")
_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF


class WireError(RemoteProtocolError):
    """The peer sent a malformed frame; the connection cannot go on."""


class WireLimitError(LocalProtocolError):
    """A frame we were asked to encode breaks a limit of the wire protocol."""


class FrameKind(enum.IntEnum):
    """The first body byte of every frame."""

    HELLO = 1
    IOCTL_REQUEST = 2
    IOCTL_REPLY = 3
    CONTROL_REQUEST = 4
    CONTROL_REPLY = 5
    ERROR = 6
    CANCEL = 7


class Role(enum.StrEnum):
    """Who says HELLO: a device session, a control client, or the host answering either."""

    DEVICE = "device"
    CONTROL = "control"
    HOST = "host"


@record
class Hello:
    """The first frame each side sends; ``user_device`` opens ``/dev/vboxuser`` instead."""

    role: Role
    user_device: bool = False


@record
class UserMemory:
    """One user buffer of an ioctl request: its synthetic address and its contents."""

    address: int
    data: bytes


@record
class IoctlRequest:
    """One ioctl: ``seq`` tags the reply, since several may be in flight on one session."""

    seq: int
    code: int
    buffer: bytes
    user_buffers: tuple[UserMemory, ...] = ()


@record
class IoctlReply:
    """The result of the ioctl ``seq``: ``errno`` 0 with the buffers written back, or an errno.

    ``user_buffers`` holds the contents of the request's user buffers after the call, in the
    request's order. A failed ioctl (``errno != 0``) carries no buffers.
    """

    seq: int
    errno: int
    buffer: bytes = b""
    user_buffers: tuple[bytes, ...] = ()


@record
class Cancel:
    """The caller of ioctl ``seq`` was cancelled: the host abandons the call, sends no reply."""

    seq: int


@record
class ControlRequest:
    """A control command (a JSON object) for the host, as ``vbox-agent host`` sends it."""

    payload: dict[str, object]


@record
class ControlReply:
    """The host's answer to one control command (a JSON object)."""

    payload: dict[str, object]


@record
class ErrorFrame:
    """The peer sent something malformed; the sender closes the connection after this."""

    message: str


Frame = Hello | IoctlRequest | IoctlReply | Cancel | ControlRequest | ControlReply | ErrorFrame


_KIND_OF: Final[dict[type[Frame], FrameKind]] = {
    Hello: FrameKind.HELLO,
    IoctlRequest: FrameKind.IOCTL_REQUEST,
    IoctlReply: FrameKind.IOCTL_REPLY,
    ControlRequest: FrameKind.CONTROL_REQUEST,
    ControlReply: FrameKind.CONTROL_REPLY,
    ErrorFrame: FrameKind.ERROR,
    Cancel: FrameKind.CANCEL,
}


def describe_frame(frame: Frame) -> str:
    """Name ``frame`` for an error message (``an IOCTL_REPLY frame (seq 7)``): its kind and
    tag, never its contents, which may be megabytes."""
    kind = _KIND_OF[type(frame)].name
    article = "an" if kind[0] in "AEIOU" else "a"
    match frame:
        case Hello(role=role):
            detail = f" as {role}"
        case IoctlRequest(seq=seq) | IoctlReply(seq=seq) | Cancel(seq=seq):
            detail = f" frame (seq {seq})"
        case _:
            detail = " frame"
    return f"{article} {kind}{detail}"


# --- encoding ----------------------------------------------------------------------------


def encode_frame(frame: Frame) -> bytes:
    """Return ``frame`` as bytes, length prefix included.

    Raises:
        WireLimitError: the frame breaks a limit (size, counts, field ranges, JSON).
    """
    kind, parts = _encode_body(frame)
    size = _KIND.size + sum(len(part) for part in parts)
    if size > MAX_FRAME_SIZE:
        msg = f"{kind.name} frame of {size} bytes exceeds MAX_FRAME_SIZE ({MAX_FRAME_SIZE})"
        raise WireLimitError(msg)
    return b"".join((_LENGTH.pack(size), _KIND.pack(kind), *parts))


def _encode_body(frame: Frame) -> tuple[FrameKind, list[bytes]]:
    match frame:
        case Hello(role=role, user_device=user_device):
            body = {"wire": WIRE_VERSION, "role": str(role), "user_device": user_device}
            encoded = FrameKind.HELLO, [_encode_json(body)]
        case IoctlRequest():
            encoded = FrameKind.IOCTL_REQUEST, _encode_ioctl_request(frame)
        case IoctlReply():
            encoded = FrameKind.IOCTL_REPLY, _encode_ioctl_reply(frame)
        case Cancel(seq=seq):
            _check_u32("seq", seq)
            encoded = FrameKind.CANCEL, [_SEQ.pack(seq)]
        case ControlRequest(payload=payload):
            encoded = FrameKind.CONTROL_REQUEST, [_encode_json(payload)]
        case ControlReply(payload=payload):
            encoded = FrameKind.CONTROL_REPLY, [_encode_json(payload)]
        case ErrorFrame(message=message):
            encoded = FrameKind.ERROR, [_encode_text(message)]
        case _:
            assert_never(frame)
    return encoded


def _encode_ioctl_request(frame: IoctlRequest) -> list[bytes]:
    _check_u32("seq", frame.seq)
    _check_u32("code", frame.code)
    _check_count(len(frame.user_buffers))
    head = _IOCTL_REQUEST.pack(frame.seq, frame.code, len(frame.buffer), len(frame.user_buffers))
    parts = [head, bytes(frame.buffer)]
    for memory in frame.user_buffers:
        if not 0 <= memory.address <= _U64_MAX:
            msg = f"user buffer address {memory.address:#x} is not a u64"
            raise WireLimitError(msg)
        parts += [_REQUEST_USER_BUFFER.pack(memory.address, len(memory.data)), memory.data]
    _check_user_buffer_ranges(frame.user_buffers, WireLimitError)
    return parts


def _encode_ioctl_reply(frame: IoctlReply) -> list[bytes]:
    _check_u32("seq", frame.seq)
    if not 0 <= frame.errno <= MAX_ERRNO:
        msg = f"errno {frame.errno} is outside 0..{MAX_ERRNO}"
        raise WireLimitError(msg)
    if frame.errno and (frame.buffer or frame.user_buffers):
        msg = "a failed ioctl reply carries no buffers"
        raise WireLimitError(msg)
    _check_count(len(frame.user_buffers))
    head = _IOCTL_REPLY.pack(frame.seq, frame.errno, len(frame.buffer), len(frame.user_buffers))
    parts = [head, bytes(frame.buffer)]
    for data in frame.user_buffers:
        parts += [_REPLY_USER_BUFFER.pack(len(data)), data]
    return parts


def _encode_json(payload: dict[str, object]) -> bytes:
    try:
        text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        msg = f"payload is not JSON: {exc}"
        raise WireLimitError(msg) from exc
    return _encode_text(text)


def _encode_text(text: str) -> bytes:
    data = text.encode()
    if len(data) > MAX_JSON_SIZE:
        msg = f"text body of {len(data)} bytes exceeds MAX_JSON_SIZE ({MAX_JSON_SIZE})"
        raise WireLimitError(msg)
    return data


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        msg = f"{name} {value} is not a u32"
        raise WireLimitError(msg)


def _check_count(count: int) -> None:
    if count > MAX_USER_BUFFERS:
        msg = f"{count} user buffers exceed MAX_USER_BUFFERS ({MAX_USER_BUFFERS})"
        raise WireLimitError(msg)


def _check_user_buffer_ranges(
    user_buffers: tuple[UserMemory, ...], error: type[WireError | WireLimitError]
) -> None:
    ordered = sorted(user_buffers, key=lambda memory: memory.address)
    for memory in ordered:
        if memory.address == 0 or memory.address + len(memory.data) > _U64_MAX + 1:
            msg = f"user buffer at {memory.address:#x} is not addressable"
            raise error(msg)
    for before, after in itertools.pairwise(ordered):
        if before.address + max(len(before.data), 1) > after.address:
            msg = f"user buffers at {before.address:#x} and {after.address:#x} overlap"
            raise error(msg)


# --- decoding ----------------------------------------------------------------------------


class FrameDecoder:
    """Turns received bytes into frames: ``feed`` what arrived, then ``next_frame`` until None.

    Memory is bounded by :attr:`max_frame_size`: a length prefix above it is refused at once,
    before its body arrives. After a :class:`WireError` the decoder stays broken and every
    later ``next_frame`` raises the same error.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self.max_frame_size = max_frame_size
        """The largest frame length taken. A receiver sets it as its connection's state
        narrows the frames that may come (:data:`MAX_HELLO_FRAME_SIZE` until the peer's
        HELLO); it applies to every frame not yet returned."""
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (non-zero at EOF: a torn frame)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` when more bytes are needed.

        Raises:
            WireError: the next frame is malformed.
        """
        if self._error is not None:
            raise self._error
        if len(self._buffer) < _LENGTH.size:
            return None
        (size,) = _LENGTH.unpack_from(self._buffer)
        if size > self.max_frame_size or size == 0:
            self._error = WireError(f"frame length {size} is outside 1..{self.max_frame_size}")
            raise self._error
        end = _LENGTH.size + size
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_LENGTH.size : end])
        del self._buffer[:end]
        try:
            return _decode_body(body)
        except WireError as exc:
            self._error = exc
            raise


def _decode_body(body: bytes) -> Frame:
    kind_byte = body[0]
    reader = _Reader(body, 1)
    match kind_byte:
        case FrameKind.HELLO if len(body) > MAX_HELLO_FRAME_SIZE:
            msg = f"HELLO body of {len(body) - 1} bytes exceeds MAX_HELLO_SIZE ({MAX_HELLO_SIZE})"
            raise WireError(msg)
        case FrameKind.HELLO:
            frame: Frame = _decode_hello(reader.json_object())
        case FrameKind.IOCTL_REQUEST:
            frame = _decode_ioctl_request(reader)
        case FrameKind.IOCTL_REPLY:
            frame = _decode_ioctl_reply(reader)
        case FrameKind.CANCEL:
            frame = Cancel(*reader.unpack(_SEQ))
        case FrameKind.CONTROL_REQUEST:
            frame = ControlRequest(reader.json_object())
        case FrameKind.CONTROL_REPLY:
            frame = ControlReply(reader.json_object())
        case FrameKind.ERROR:
            frame = ErrorFrame(reader.text())
        case _:
            msg = f"unknown frame kind {kind_byte}"
            raise WireError(msg)
    reader.expect_end()
    return frame


def _decode_hello(body: dict[str, object]) -> Hello:
    if body.get("wire") != WIRE_VERSION:
        msg = f"HELLO speaks wire version {shown(body.get('wire'))}, expected {WIRE_VERSION}"
        raise WireError(msg)
    role = body.get("role")
    if not isinstance(role, str) or role not in Role.__members__.values():
        msg = f"HELLO role {shown(role)} is not one of {', '.join(Role)}"
        raise WireError(msg)
    user_device = body.get("user_device", False)
    if not isinstance(user_device, bool) or set(body) - {"wire", "role", "user_device"}:
        msg = f"HELLO fields are malformed: {shown(sorted(body))}"
        raise WireError(msg)
    return Hello(Role(role), user_device)


def _decode_ioctl_request(reader: _Reader) -> IoctlRequest:
    seq, code, buffer_len, count = reader.unpack(_IOCTL_REQUEST)
    _check_decoded_count(count)
    buffer = reader.take(buffer_len)
    user_buffers = []
    for _ in range(count):
        address, length = reader.unpack(_REQUEST_USER_BUFFER)
        user_buffers.append(UserMemory(address, reader.take(length)))
    memories = tuple(user_buffers)
    _check_user_buffer_ranges(memories, WireError)
    return IoctlRequest(seq, code, buffer, memories)


def _decode_ioctl_reply(reader: _Reader) -> IoctlReply:
    seq, errno, buffer_len, count = reader.unpack(_IOCTL_REPLY)
    _check_decoded_count(count)
    if errno > MAX_ERRNO:
        msg = f"errno {errno} is outside 0..{MAX_ERRNO}"
        raise WireError(msg)
    if errno and (buffer_len or count):
        msg = "a failed ioctl reply carries buffers"
        raise WireError(msg)
    buffer = reader.take(buffer_len)
    contents = tuple(reader.take(reader.unpack(_REPLY_USER_BUFFER)[0]) for _ in range(count))
    return IoctlReply(seq, errno, buffer, contents)


def _check_decoded_count(count: int) -> None:
    if count > MAX_USER_BUFFERS:
        msg = f"{count} user buffers exceed MAX_USER_BUFFERS ({MAX_USER_BUFFERS})"
        raise WireError(msg)


class _Reader:
    """A cursor over one frame body that raises :class:`WireError` on a short read."""

    def __init__(self, body: bytes, offset: int) -> None:
        self._body = body
        self._offset = offset

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        fields: tuple[int, ...] = layout.unpack_from(self.take(layout.size))
        return fields

    def take(self, size: int) -> bytes:
        end = self._offset + size
        if end > len(self._body):
            msg = f"frame body ends at {len(self._body)} bytes, field needs {end}"
            raise WireError(msg)
        data = self._body[self._offset : end]
        self._offset = end
        return data

    def text(self) -> str:
        data = self.take(len(self._body) - self._offset)
        if len(data) > MAX_JSON_SIZE:
            msg = f"text body of {len(data)} bytes exceeds MAX_JSON_SIZE ({MAX_JSON_SIZE})"
            raise WireError(msg)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            msg = f"text body is not UTF-8: {exc}"
            raise WireError(msg) from None

    def json_object(self) -> dict[str, object]:
        text = self.text()
        try:
            value: object = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            msg = f"body is not JSON: {exc}"
            raise WireError(msg) from None
        if not isinstance(value, dict):
            msg = f"JSON body is a {type(value).__name__}, expected an object"
            raise WireError(msg)
        return value

    def expect_end(self) -> None:
        if self._offset != len(self._body):
            msg = f"{len(self._body) - self._offset} unexpected bytes after the frame's fields"
            raise WireError(msg)


def _refuse_constant(name: str) -> object:
    msg = f"{name} is not JSON"
    raise ValueError(msg)
