"""``FieldRun``: adjacent layout members read and written with one struct call."""

from __future__ import annotations

import pytest

from agent.protocol import layouts as L  # noqa: N812 - the layout table

_P = L.HgcmParameter64


def test_a_run_reads_and_writes_what_its_fields_do() -> None:
    members = L.run(_P.type, _P.value32)
    buf = bytearray(2 * _P.size)
    members.set(buf, 1, 0xDEADBEEF, base=_P.size)
    second = memoryview(buf)[_P.size :]
    assert (_P.type.get(second), _P.value32.get(second)) == (1, 0xDEADBEEF)
    assert members.get(buf, _P.size) == (1, 0xDEADBEEF)
    assert buf[: _P.size] == bytes(_P.size)


def test_a_run_takes_each_fields_own_format() -> None:
    header = L.run(
        L.HgcmCallIoctl.interruptible, L.HgcmCallIoctl.reserved, L.HgcmCallIoctl.parm_count
    )
    assert header.offset == L.HgcmCallIoctl.interruptible.offset
    assert header.codec.size == L.HgcmCallIoctl.parm_count.end - header.offset


@pytest.mark.parametrize(
    "fields",
    [(_P.type, _P.pointer_linear_addr), (_P.value32, _P.value64), ()],
    ids=["gap", "overlap", "empty"],
)
def test_fields_that_do_not_follow_each_other_are_refused(fields: tuple[L.IntField, ...]) -> None:
    with pytest.raises(ValueError, match=r"does not follow|at least one field"):
        L.run(*fields)


@pytest.mark.parametrize("layout", [L.IoctlHeader, L.RequestHeader, L.HgcmCallIoctl])
def test_whole_reads_every_member_at_once(layout: type[L.Layout]) -> None:
    whole = layout.whole()
    buf = bytearray(range(layout.size))
    members = sorted(layout.fields().values(), key=lambda member: member.offset)
    assert (whole.offset, whole.codec.size) == (0, layout.size)
    assert whole.get(buf) == tuple(member.get(buf) for member in members)


def test_whole_refuses_a_struct_with_a_string_member() -> None:
    with pytest.raises(ValueError, match="not integers"):
        L.HgcmServiceLocation.whole()
