"""Tests of the simulated-host socket framing (``agent.protocol.wire``).

Rules of this test module:
- pure sans-IO: no sockets, no trio; bytes in, frames out;
- malformed input may raise ``WireError`` and nothing else (the fuzz tests check this);
- byte layouts are spelled out in hex where the document ``docs/simulator-socket.md`` fixes them.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, strategies as st

from agent.protocol import LocalProtocolError, RemoteProtocolError
from agent.protocol.wire import (
    MAX_CONTROL_FRAME_SIZE,
    MAX_ERRNO,
    MAX_FRAME_SIZE,
    MAX_HELLO_FRAME_SIZE,
    MAX_HELLO_SIZE,
    MAX_JSON_SIZE,
    MAX_USER_BUFFERS,
    Cancel,
    ControlReply,
    ControlRequest,
    ErrorFrame,
    Frame,
    FrameDecoder,
    Hello,
    IoctlReply,
    IoctlRequest,
    Role,
    UserMemory,
    WireError,
    WireLimitError,
    encode_frame,
)

u32 = st.integers(0, 0xFFFFFFFF)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@st.composite
def user_memories(draw: st.DrawFn) -> tuple[UserMemory, ...]:
    """Non-overlapping user buffers at page-aligned addresses."""
    sizes = draw(st.lists(st.integers(0, 64), max_size=4))
    return tuple(
        UserMemory(0x10000 * (index + 1), draw(st.binary(min_size=size, max_size=size)))
        for index, size in enumerate(sizes)
    )


frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, st.sampled_from(Role), st.booleans()),
    st.builds(IoctlRequest, u32, u32, st.binary(max_size=64), user_memories()),
    st.builds(
        IoctlReply,
        u32,
        st.just(0),
        st.binary(max_size=64),
        st.lists(st.binary(max_size=64), max_size=4).map(tuple),
    ),
    st.builds(IoctlReply, u32, st.integers(1, 4095)),
    st.builds(ControlRequest, json_objects),
    st.builds(ControlReply, json_objects),
    st.builds(ErrorFrame, st.text()),
)


def decode_all(data: bytes) -> list[Frame]:
    """Feed ``data`` at once and return every complete frame."""
    decoder = FrameDecoder()
    decoder.feed(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


class TestRoundTrip:
    """Encoding then decoding gives the frame back."""

    @given(frames)
    def test_any_frame(self, frame: Frame) -> None:
        """Every frame survives encode then decode unchanged."""
        assert [frame] == decode_all(encode_frame(frame))

    @given(st.lists(frames, max_size=5), st.integers(1, 7))
    def test_byte_by_byte(self, sent: list[Frame], chunk: int) -> None:
        """Frames split at any byte boundary decode the same."""
        data = b"".join(encode_frame(frame) for frame in sent)
        decoder = FrameDecoder()
        received = []
        for start in range(0, len(data), chunk):
            decoder.feed(data[start : start + chunk])
            while (frame := decoder.next_frame()) is not None:
                received.append(frame)
        assert sent == received
        assert decoder.buffered == 0

    def test_ioctl_request_layout(self) -> None:
        """An IOCTL request is length, kind, seq, code, sizes, buffer, (address, size, data)."""
        frame = IoctlRequest(7, 0xC0185603, b"\xaa\xbb", (UserMemory(0x1000, b"xyz"),))
        expected = (
            struct.pack("<IB", 1 + 16 + 2 + 12 + 3, 2)
            + struct.pack("<IIII", 7, 0xC0185603, 2, 1)
            + b"\xaa\xbb"
            + struct.pack("<QI", 0x1000, 3)
            + b"xyz"
        )
        assert expected == encode_frame(frame)

    def test_ioctl_reply_layout(self) -> None:
        """An IOCTL reply is length, kind, seq, errno, sizes, buffer, then (size, data)."""
        frame = IoctlReply(7, 0, b"\x01", (b"ab",))
        expected = struct.pack("<IBIIII", 1 + 16 + 1 + 4 + 2, 3, 7, 0, 1, 1) + b"\x01"
        assert expected + struct.pack("<I", 2) + b"ab" == encode_frame(frame)

    def test_hello_is_json(self) -> None:
        """HELLO carries the wire version, the role and the device option as JSON."""
        body = b'{"wire":1,"role":"device","user_device":true}'
        expected = struct.pack("<IB", 1 + len(body), 1) + body
        assert expected == encode_frame(Hello(Role.DEVICE, user_device=True))


class TestLimits:
    """Frames that break a limit are refused on both sides."""

    def test_oversized_length_prefix(self) -> None:
        """A length above the decoder's limit fails before the body arrives."""
        decoder = FrameDecoder(max_frame_size=100)
        decoder.feed(struct.pack("<I", 101))
        with pytest.raises(WireError, match=r"outside 1\.\.100"):
            decoder.next_frame()

    def test_default_limit_admits_a_full_ioctl_buffer(self) -> None:
        """The largest ioctl buffer of the driver (16 MiB) fits in one frame."""
        frame = IoctlRequest(1, 2, bytes(16 << 20))
        assert [frame] == decode_all(encode_frame(frame))

    def test_encode_refuses_oversized_frames(self) -> None:
        """Encoding a frame above MAX_FRAME_SIZE raises WireLimitError."""
        with pytest.raises(WireLimitError, match="MAX_FRAME_SIZE"):
            encode_frame(IoctlRequest(1, 2, bytes(MAX_FRAME_SIZE)))

    def test_too_many_user_buffers(self) -> None:
        """More user buffers than HGCM parameters (32) are refused."""
        memories = tuple(UserMemory(0x1000 * (i + 1), b"") for i in range(33))
        with pytest.raises(WireLimitError, match=r"33 user buffers exceed MAX_USER_BUFFERS \(32\)"):
            encode_frame(IoctlRequest(1, 2, b"", memories))

    def test_overlapping_user_buffers(self) -> None:
        """User buffers that overlap are refused."""
        memories = (UserMemory(0x1000, b"ab"), UserMemory(0x1001, b"c"))
        with pytest.raises(WireLimitError, match="overlap"):
            encode_frame(IoctlRequest(1, 2, b"", memories))

    def test_failed_reply_carries_no_buffers(self) -> None:
        """A reply with an errno may not carry buffers."""
        with pytest.raises(WireLimitError, match="no buffers"):
            encode_frame(IoctlReply(1, 22, b"x"))

    def test_json_size(self) -> None:
        """A control payload above MAX_JSON_SIZE (1 MiB) is refused."""
        with pytest.raises(WireLimitError, match=r"MAX_JSON_SIZE \(1048576\)"):
            encode_frame(ControlRequest({"x": "a" * (1 << 20)}))

    def test_not_json(self) -> None:
        """A payload JSON cannot carry is refused."""
        with pytest.raises(WireLimitError, match="not JSON"):
            encode_frame(ControlRequest({"x": float("nan")}))

    @pytest.mark.parametrize(
        "frame",
        [
            IoctlRequest(
                0xFFFFFFFF,
                0xFFFFFFFF,
                b"",
                tuple(UserMemory(0x1000 * (i + 1), b"u") for i in range(MAX_USER_BUFFERS)),
            ),
            IoctlRequest(1, 2, b"", (UserMemory(2**64 - 16, bytes(16)),)),
            IoctlReply(0xFFFFFFFF, MAX_ERRNO),
            IoctlReply(1, 0, b"", tuple(b"r" for _ in range(MAX_USER_BUFFERS))),
            Cancel(0xFFFFFFFF),
            ControlRequest({"x": "a" * (MAX_JSON_SIZE - len('{"x":""}'))}),
            ErrorFrame("e" * MAX_JSON_SIZE),
        ],
        ids=[
            "32 user buffers",
            "buffer ending at 2**64",
            "largest errno",
            "32 reply buffers",
            "largest seq",
            "largest JSON",
            "largest error",
        ],
    )
    def test_frames_at_the_limits_round_trip(self, frame: Frame) -> None:
        """A frame on every limit (but over none) is encoded and decoded as it was."""
        assert decode_all(encode_frame(frame)) == [frame]

    @pytest.mark.parametrize(
        ("frame", "match"),
        [
            (IoctlRequest(2**32, 2, b""), "seq 4294967296 is not a u32"),
            (IoctlRequest(1, -1, b""), "code -1 is not a u32"),
            (IoctlReply(-1, 0), "seq -1 is not a u32"),
            (Cancel(2**32), "seq 4294967296 is not a u32"),
            (IoctlReply(1, MAX_ERRNO + 1), "errno 4096 is outside 0..4095"),
            (IoctlReply(1, 0, b"", (b"",) * (MAX_USER_BUFFERS + 1)), "MAX_USER_BUFFERS"),
            (IoctlRequest(1, 2, b"", (UserMemory(2**64, b""),)), "is not a u64"),
            (IoctlRequest(1, 2, b"", (UserMemory(2**64 - 16, bytes(17)),)), "not addressable"),
        ],
    )
    def test_encode_refuses_fields_out_of_range(self, frame: Frame, match: str) -> None:
        """A field the wire cannot carry is the caller's error, named, not a struct.error."""
        with pytest.raises(WireLimitError, match=match):
            encode_frame(frame)

    def test_a_frame_of_the_decoder_s_limit_is_taken(self) -> None:
        """A body of exactly ``max_frame_size`` bytes is a frame."""
        frame = ErrorFrame("e" * 99)
        decoder = FrameDecoder(max_frame_size=100)
        decoder.feed(encode_frame(frame))
        assert decoder.next_frame() == frame

    def test_a_lowered_limit_applies_to_the_next_frame(self) -> None:
        """A receiver narrowing ``max_frame_size`` after a frame (a HELLO) refuses a longer
        frame that follows by its length prefix alone, even one buffered already."""
        decoder = FrameDecoder(MAX_HELLO_FRAME_SIZE)
        decoder.feed(encode_frame(Hello(Role.CONTROL)))
        decoder.feed(struct.pack("<IB", MAX_CONTROL_FRAME_SIZE + 1, 4))
        assert decoder.next_frame() == Hello(Role.CONTROL)
        decoder.max_frame_size = MAX_CONTROL_FRAME_SIZE
        with pytest.raises(WireError, match=rf"outside 1\.\.{MAX_CONTROL_FRAME_SIZE}$"):
            decoder.next_frame()

    def test_hello_size(self) -> None:
        """A HELLO body of MAX_HELLO_SIZE (JSON padded with spaces) is taken; one byte more
        is refused whatever the decoder's frame limit."""
        text = b'{"wire":1,"role":"device"}'
        body = text.ljust(MAX_HELLO_SIZE)
        assert decode_all(struct.pack("<IB", 1 + len(body), 1) + body) == [Hello(Role.DEVICE)]
        body += b" "
        with pytest.raises(WireError, match=r"HELLO body of 1025 bytes exceeds MAX_HELLO_SIZE"):
            decode_all(struct.pack("<IB", 1 + len(body), 1) + body)

    def test_error_classes(self) -> None:
        """Decoding errors blame the peer, encoding errors blame the caller."""
        assert issubclass(WireError, RemoteProtocolError)
        assert issubclass(WireLimitError, LocalProtocolError)


class TestMalformed:
    """Malformed frames raise WireError and break the decoder for good."""

    @pytest.mark.parametrize(
        ("body", "match"),
        [
            (b"\x09", "unknown frame kind 9"),
            (b"\x02\x01\x00", "frame body ends"),
            (b"\x01[]", "expected an object"),
            (b'\x01{"wire":2,"role":"device"}', "wire version 2"),
            (b'\x01{"wire":1,"role":"root"}', "role 'root'"),
            (b'\x01{"wire":1,"role":["device"]}', "role"),
            (b'\x01{"wire":1,"role":"device","user_device":1}', "malformed"),
            (b"\x04{", "not JSON"),
            (b'\x04{"x":NaN}', "not JSON"),
            (b"\x06\xff", "not UTF-8"),
            (b"\x03" + struct.pack("<IIII", 1, 5000, 0, 0), "errno 5000"),
            (b"\x03" + struct.pack("<IIII", 1, 5, 1, 0) + b"x", "carries buffers"),
            (b"\x03" + struct.pack("<IIII", 1, 0, 0, 0) + b"tail", "unexpected bytes"),
            (b"\x02" + struct.pack("<IIII", 1, 2, 0, 33), "MAX_USER_BUFFERS"),
            (b"\x03" + struct.pack("<IIII", 1, 0, 0, 33), "MAX_USER_BUFFERS"),
            (b"\x02" + struct.pack("<IIIIQI", 1, 2, 0, 1, 0, 0), "not addressable"),
            (b"\x04" + b"[" * 100_000, "not JSON"),
        ],
    )
    def test_rejected(self, body: bytes, match: str) -> None:
        """Each malformed body raises WireError naming the problem."""
        decoder = FrameDecoder()
        decoder.feed(struct.pack("<I", len(body)) + body)
        with pytest.raises(WireError, match=match):
            decoder.next_frame()
        with pytest.raises(WireError, match=match):
            decoder.next_frame()

    def test_zero_length(self) -> None:
        """A frame needs at least its kind byte."""
        decoder = FrameDecoder()
        decoder.feed(bytes(4))
        with pytest.raises(WireError, match="length 0"):
            decoder.next_frame()

    @given(st.binary(max_size=300))
    def test_fuzz_raw_bytes(self, data: bytes) -> None:
        """Arbitrary bytes decode to frames or raise WireError, nothing else."""
        with contextlib.suppress(WireError):
            decode_all(data)

    @given(st.integers(0, 7), st.binary(max_size=300))
    def test_fuzz_framed_bodies(self, kind: int, body: bytes) -> None:
        """Arbitrary bodies behind a valid length and kind decode or raise WireError."""
        data = struct.pack("<IB", len(body) + 1, kind) + body
        with contextlib.suppress(WireError):
            decode_all(data)

    @given(frames, st.data())
    def test_fuzz_mutated_frames(self, frame: Frame, data: st.DataObject) -> None:
        """A valid frame with one byte changed decodes or raises WireError."""
        encoded = bytearray(encode_frame(frame))
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
        with contextlib.suppress(WireError):
            decode_all(bytes(encoded))
