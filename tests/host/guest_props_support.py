"""Helpers for the guest-property service tests: a fake call handle and call builders."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.host.guest_props import GuestFunction, GuestPropertyService
from agent.host.hgcm_service import HostBuffer, HostParm, HostU32, HostU64

START_NS = 1_700_000_000_000_000_000
"""Where the fake clock starts, in ns since the epoch."""


@dataclass
class FakeCall:
    """An ``HgcmCallHandle`` that records its completion status."""

    client_id: int
    function: int
    params: list[HostParm]
    cancelled: bool = False
    status: int | None = field(default=None, init=False)

    def complete(self, status: int) -> None:
        """Record ``status``; a second completion is a bug in the service."""
        assert self.status is None, f"completed twice: {self.status} then {status}"
        self.status = status

    @property
    def pending(self) -> bool:
        """Whether the service still holds the call."""
        return self.status is None


@dataclass
class FakeClock:
    """A clock the test sets; each reading returns ``now``."""

    now: int = START_NS

    def __call__(self) -> int:
        return self.now


def string(text: str | bytes) -> HostBuffer:
    """An in buffer holding ``text`` and its NUL, as VbglR3 sends strings."""
    raw = text.encode() if isinstance(text, str) else text
    return HostBuffer(bytearray(raw + b"\0"), writable=False)


def raw_in(data: bytes) -> HostBuffer:
    """An in buffer holding exactly ``data``."""
    return HostBuffer(bytearray(data), writable=False)


def out(size: int) -> HostBuffer:
    """An out buffer of ``size`` zero bytes."""
    return HostBuffer(bytearray(size), readable=False)


def get_call(name: str | HostBuffer, size: int = 1024, client_id: int = 1) -> FakeCall:
    """A GET_PROP call."""
    name_parm = string(name) if isinstance(name, str) else name
    params: list[HostParm] = [name_parm, out(size), HostU64(0), HostU32(0)]
    return FakeCall(client_id, GuestFunction.GET_PROP, params)


def set_call(
    name: str | HostBuffer,
    value: str | HostBuffer,
    flags: str | None = None,
    function: int = GuestFunction.SET_PROP,
) -> FakeCall:
    """A SET_PROP call, with the flags parameter only when ``flags`` is given."""
    params: list[HostParm] = [
        string(name) if isinstance(name, str) else name,
        string(value) if isinstance(value, str) else value,
    ]
    if flags is not None:
        params.append(string(flags))
    return FakeCall(1, function, params)


def del_call(name: str | HostBuffer) -> FakeCall:
    """A DEL_PROP call."""
    return FakeCall(1, GuestFunction.DEL_PROP, [string(name) if isinstance(name, str) else name])


def enum_call(patterns: bytes = b"\0", size: int = 4096) -> FakeCall:
    """An ENUM_PROPS call; ``patterns`` is the whole buffer, NULs included."""
    return FakeCall(1, GuestFunction.ENUM_PROPS, [raw_in(patterns), out(size), HostU32(0)])


def notify_call(
    patterns: str = "", timestamp: int = 0, size: int = 1024, client_id: int = 1
) -> FakeCall:
    """A GET_NOTIFICATION call."""
    params: list[HostParm] = [string(patterns), HostU64(timestamp), out(size), HostU32(0)]
    return FakeCall(client_id, GuestFunction.GET_NOTIFICATION, params)


def run(service: GuestPropertyService, call: FakeCall) -> FakeCall:
    """Hand ``call`` to ``service`` and return it."""
    service.call(call)
    return call


def guest_set(service: GuestPropertyService, name: str, value: str, flags: str = "") -> int:
    """Set a property as the guest (fn 3 with flags); return the status."""
    status = run(service, set_call(name, value, flags, GuestFunction.SET_PROP_VALUE)).status
    assert status is not None
    return status


def strings(call: FakeCall, index: int) -> list[bytes]:
    """Split the reported part (``size`` bytes) of buffer parameter ``index`` at NULs."""
    buffer = call.params[index]
    size = call.params[-1]
    assert isinstance(buffer, HostBuffer)
    assert isinstance(size, HostU32)
    return bytes(buffer.data[: size.value]).split(b"\0")[:-1]


def u32_value(call: FakeCall, index: int) -> int:
    """The value of 32-bit parameter ``index``."""
    parm = call.params[index]
    assert isinstance(parm, HostU32)
    return parm.value


def u64_value(call: FakeCall, index: int) -> int:
    """The value of 64-bit parameter ``index``."""
    parm = call.params[index]
    assert isinstance(parm, HostU64)
    return parm.value


def notification(call: FakeCall) -> tuple[str, str, str, str]:
    """``(name, value, flags, deleted)`` a completed GET_NOTIFICATION wrote."""
    name, value, flags, deleted = (part.decode() for part in strings(call, 2))
    return name, value, flags, deleted
