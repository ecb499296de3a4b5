"""``@record``: what a frozen, slotted dataclass does, with its methods shared between classes."""

from __future__ import annotations

import dataclasses
from dataclasses import field

import pytest

from agent.protocol.messages import DriverVersion, HgcmU32, HostTime, InterruptAllWaits
from agent.records import record


@record
class Point:
    x: int
    y: int = 0


@record
class Tagged:
    name: str
    cache: bytes = field(default=b"", repr=False, compare=False)
    weight: float = field(default=0.0, hash=False)


@record(init=False)
class Doubled:
    value: int

    def __init__(self, value: int) -> None:
        object.__setattr__(self, "value", 2 * value)


@record
class Empty:
    pass


@record
class Named:
    name: str

    def __repr__(self) -> str:
        return f"<{self.name}>"


@record
class Unhashable:
    items: list[int]


def test_a_record_is_built_shown_and_compared_as_a_dataclass_is() -> None:
    point = Point(1, y=2)
    assert (point.x, point.y) == (1, 2)
    assert repr(point) == "Point(x=1, y=2)"
    assert point == Point(1, 2)
    assert point != Point(1, 3)
    assert hash(point) == hash(Point(1, 2)) == hash((1, 2))
    assert Point.__match_args__ == ("x", "y")
    assert not hasattr(point, "__dict__")


def test_equality_needs_the_same_class() -> None:
    same_values: object = (1, 2)
    assert Point(1, 2) != same_values
    assert Point.__eq__(Point(1, 2), same_values) is NotImplemented
    assert HostTime(5) != type("Other", (), {"ms": 5})()


def test_field_options_choose_what_is_shown_compared_and_hashed() -> None:
    tagged = Tagged("a", b"kept", 1.5)
    assert repr(tagged) == "Tagged(name='a', weight=1.5)"
    assert tagged == Tagged("a", b"other", 1.5)
    assert tagged != Tagged("a", b"kept", 2.5)
    assert hash(tagged) == hash(Tagged("a", b"", 2.5)) == hash(("a",))


def test_a_record_without_fields_equals_its_kind() -> None:
    assert Empty() == Empty()
    assert repr(Empty()) == "Empty()"
    assert hash(Empty()) == hash(())
    assert InterruptAllWaits() == InterruptAllWaits()


def test_a_field_that_cannot_be_hashed_fails_the_hash_as_a_dataclass_does() -> None:
    with pytest.raises(TypeError, match="unhashable"):
        hash(Unhashable([1]))
    assert Unhashable([1]) == Unhashable([1])


def test_a_record_cannot_be_changed() -> None:
    point = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'x'"):
        point.x = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'x'"):
        del point.x
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'z'"):
        point.z = 3  # type: ignore[attr-defined]
    assert point == Point(1, 0)


def test_init_false_leaves_init_to_the_class() -> None:
    assert Doubled(2).value == 4
    assert Doubled(2) == Doubled(2)
    assert repr(Doubled(2)) == "Doubled(value=4)"


def test_a_method_the_class_writes_itself_stays() -> None:
    assert repr(Named("a")) == "<a>"
    assert Named("a") == Named("a")


def test_dataclass_functions_work_on_a_record() -> None:
    point = Point(1, 2)
    assert dataclasses.is_dataclass(point)
    assert [item.name for item in dataclasses.fields(point)] == ["x", "y"]
    assert dataclasses.replace(point, y=5) == Point(1, 5)
    assert dataclasses.asdict(point) == {"x": 1, "y": 2}
    assert dataclasses.astuple(point) == (1, 2)


def test_records_share_their_methods_other_than_init() -> None:
    """The point of a record: one function serves every class, none is compiled per class."""
    for name in ("__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
        shared = getattr(Point, name)
        assert getattr(DriverVersion, name) is shared
        assert getattr(HgcmU32, name) is shared
        assert getattr(HostTime, name) is shared
    assert vars(Point)["__init__"] is not vars(HostTime)["__init__"]
