"""``@record``: what a frozen, slotted dataclass does, with its methods shared between classes.

Every case builds its classes with :func:`frozen` and runs twice, once with ``@record`` and
once with ``@dataclass(frozen=True, slots=True)``: the outcomes (the result's repr, or the
exception's type and message) must be equal. The differences ``agent.records`` names as on
purpose have a table of their own.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import weakref
from dataclasses import KW_ONLY, Field, InitVar, field
from typing import TYPE_CHECKING, Any, ClassVar, dataclass_transform, overload

import pytest

from agent.protocol.messages import DriverVersion, HgcmU32, HostTime
from agent.records import is_record, record

if TYPE_CHECKING:
    from collections.abc import Callable


def as_record(cls: type, *, init: bool = True) -> type:
    return record(init=init)(cls)


def as_dataclass(cls: type, *, init: bool = True) -> type:
    return dataclasses.dataclass(frozen=True, slots=True, init=init)(cls)


_making: list[Callable[..., type]] = [as_record]
"""The decorator :func:`frozen` stands for in the case running now."""


@overload
def frozen(cls: type, /) -> Any: ...
@overload
def frozen(*, init: bool = True) -> Callable[[type], Any]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field, Field))
def frozen(cls: type | None = None, /, *, init: bool = True) -> Any:
    """``@record`` or a frozen slotted dataclass, whichever :func:`outcome` runs."""

    def make(cls: type) -> type:
        return _making[0](cls, init=init)

    return make if cls is None else make(cls)


def outcome(case: Callable[[], object], making: Callable[..., type]) -> str:
    _making[0] = making
    try:
        return repr(case())
    except Exception as exc:  # noqa: BLE001 - the exception is the outcome
        return f"{type(exc).__name__}: {exc}"
    finally:
        _making[0] = as_record


def errors_setting_and_deleting(instance: object, name: str) -> list[str]:
    """What setting and then deleting ``name`` on ``instance`` raise (type and message)."""
    errors: list[str] = []
    changes: list[Callable[[], None]] = [
        lambda: setattr(instance, name, 2),
        lambda: delattr(instance, name),
    ]
    for change in changes:
        try:
            change()
        except Exception as exc:  # noqa: BLE001 - the exception is the outcome
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def built_shown_compared_and_hashed() -> object:
    @frozen
    class Point:
        x: int
        y: int = 0

    point = Point(1, y=2)
    return (
        (point.x, point.y),
        point,
        point == Point(1, 2),
        point != Point(1, 3),
        hash(point) == hash(Point(1, 2)) == hash((1, 2)),
        Point.__match_args__,
        hasattr(point, "__dict__"),
    )


def equality_across_classes() -> object:
    @frozen
    class A:
        x: int

    @frozen
    class B:
        x: int

    class Other:
        x = 1

    same_values: object = (1,)
    b: object = B(1)
    other: object = Other()
    return (
        A(1) == b,
        A(1) == same_values,
        A(1) == other,
        A.__eq__(A(1), b),
        A.__eq__(A(1), other),
        A(1).__ne__(A(1)),
        A(1) != A(2),
    )


def field_options() -> object:
    @frozen
    class Tagged:
        name: str
        cache: bytes = field(default=b"", repr=False, compare=False)
        weight: float = field(default=0.0, hash=False)
        rank: int = field(default=0, compare=False, hash=True)

    tagged = Tagged("a", b"kept", 1.5, 7)
    return (
        tagged,
        tagged == Tagged("a", b"other", 1.5, 8),
        tagged == Tagged("a", b"kept", 2.5, 7),
        hash(tagged) == hash(Tagged("a", b"", 2.5, 7)) == hash(("a", 7)),
        hash(tagged) == hash(Tagged("a", b"", 1.5, 8)),
    )


def no_fields() -> object:
    @frozen
    class Empty:
        pass

    return Empty(), Empty() == Empty(), hash(Empty()) == hash(())


def an_unhashable_field() -> object:
    @frozen
    class Listed:
        items: list[int]

    assert Listed([1]) == Listed([1])
    return hash(Listed([1]))


def nan_is_equal_only_as_the_same_object() -> object:
    @frozen
    class Reading:
        value: float

    nan = math.nan
    return Reading(nan) == Reading(nan), Reading(float("nan")) == Reading(float("nan"))


def a_repr_within_itself() -> object:
    @frozen
    class Holder:
        items: list[object]

    holder = Holder([])
    holder.items.append(holder)
    return holder


def a_field_cannot_be_changed() -> object:
    @frozen
    class Point:
        x: int

    point = Point(1)
    return errors_setting_and_deleting(point, "x"), point


def init_false_leaves_init_to_the_class() -> object:
    @frozen(init=False)
    class Doubled:
        value: int

        def __init__(self, value: int) -> None:
            object.__setattr__(self, "value", 2 * value)

    return Doubled(2), Doubled(2) == Doubled(2), hash(Doubled(2)) == hash((4,))


def a_repr_the_class_writes_stays() -> object:
    @frozen
    class Named:
        name: str

        def __repr__(self) -> str:
            return f"<{self.name}>"

    return Named("a"), Named("a") == Named("a")


def an_eq_without_a_hash_is_hashed_on_the_fields() -> object:
    @frozen
    class Loose:  # noqa: PLW1641 - a dataclass hashes it on its fields
        x: int

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Loose) and self.x % 10 == other.x % 10

    return Loose(1) == Loose(11), hash(Loose(1)) == hash((1,)), hash(Loose(1)) == hash(Loose(11))


def a_hash_the_class_writes_stays() -> object:
    @frozen
    class Fixed:
        x: int

        def __hash__(self) -> int:
            return 42

    return hash(Fixed(1)), Fixed(1) == Fixed(1)


def a_hash_set_to_none_stays() -> object:
    @frozen
    class Unhashed:
        x: int
        __hash__ = None  # type: ignore[assignment]

    assert Unhashed(1) == Unhashed(1)
    return hash(Unhashed(1))


def inheritance() -> object:
    @frozen
    class Base:
        x: int

    @frozen
    class Derived(Base):
        y: int = 0

    @dataclasses.dataclass(frozen=True)
    class Plain(Base):
        z: int = 0

    return (
        Base(1) == Derived(1),
        Derived(1, 2) == Derived(1, 2),
        Base.__eq__(Base(1), Derived(1)),
        Derived(1, 2),
        hash(Derived(1, 2)) == hash((1, 2)),
        Plain(1, 2),
        Plain(1, 2) == Plain(1, 2),
        hash(Plain(1, 2)) == hash((1, 2)),
    )


def initvar_classvar_kw_only_and_post_init() -> object:
    @frozen
    class Scaled:
        unit: ClassVar[int] = 3
        x: int
        scale: InitVar[int] = 1
        _: KW_ONLY
        z: int = 0

        def __post_init__(self, scale: int) -> None:
            object.__setattr__(self, "x", self.x * scale)

    scaled = Scaled(2, 3, z=4)
    return (
        scaled,
        Scaled.__match_args__,
        [item.name for item in dataclasses.fields(scaled)],
        hash(scaled) == hash((6, 4)),
        dataclasses.replace(scaled, scale=2),
    )


@record
class PickledRecord:
    x: int
    items: list[int] = field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True)
class PickledDataclass:
    x: int
    items: list[int] = field(default_factory=list)


def pickled_copied_and_replaced() -> object:
    """On classes a module holds (pickle finds a class by its name)."""
    cls: Any = PickledRecord if _making[0] is as_record else PickledDataclass
    value = cls(1, [2])
    deep = copy.deepcopy(value)
    return (
        pickle.loads(pickle.dumps(value)) == value,  # noqa: S301 - our own bytes
        copy.copy(value) == value,
        deep == value,
        deep.items is not value.items,
        cls(1).items is not cls(1).items,
        dataclasses.asdict(dataclasses.replace(value, x=3)),
        dataclasses.astuple(value),
        dataclasses.is_dataclass(value),
    )


def no_weak_references() -> object:
    @frozen
    class Slotted:
        x: int

    return weakref.ref(Slotted(1))


CASES = [
    built_shown_compared_and_hashed,
    equality_across_classes,
    field_options,
    no_fields,
    an_unhashable_field,
    nan_is_equal_only_as_the_same_object,
    a_repr_within_itself,
    a_field_cannot_be_changed,
    init_false_leaves_init_to_the_class,
    a_repr_the_class_writes_stays,
    an_eq_without_a_hash_is_hashed_on_the_fields,
    a_hash_the_class_writes_stays,
    a_hash_set_to_none_stays,
    inheritance,
    initvar_classvar_kw_only_and_post_init,
    pickled_copied_and_replaced,
    no_weak_references,
]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_a_record_does_what_a_frozen_slotted_dataclass_does(case: Callable[[], object]) -> None:
    assert outcome(case, as_record) == outcome(case, as_dataclass)


def a_non_field_cannot_be_set_nor_deleted() -> object:
    @frozen
    class Point:
        x: int

    return errors_setting_and_deleting(Point(1), "z")


def a_plain_subclass_is_frozen_too() -> object:
    @frozen
    class Base:
        x: int

    class Extended(Base):
        pass

    extended = Extended(1)
    extended.extra = 5  # type: ignore[attr-defined]
    return extended


def the_dataclass_params() -> object:
    @frozen
    class Point:
        x: int

    params = Point.__dataclass_params__  # type: ignore[attr-defined]
    return params.init, params.repr, params.eq, params.frozen


ON_PURPOSE = [
    (
        a_non_field_cannot_be_set_nor_deleted,
        repr(
            [
                "FrozenInstanceError: cannot assign to field 'z'",
                "FrozenInstanceError: cannot delete field 'z'",
            ]
        ),
    ),
    (a_plain_subclass_is_frozen_too, "FrozenInstanceError: cannot assign to field 'extra'"),
    (the_dataclass_params, repr((True, False, False, True))),
]


@pytest.mark.parametrize(
    ("case", "expected"), ON_PURPOSE, ids=[case.__name__ for case, _ in ON_PURPOSE]
)
def test_what_differs_from_the_dataclass_differs_as_documented(
    case: Callable[[], object], expected: str
) -> None:
    assert outcome(case, as_record) == expected
    assert outcome(case, as_dataclass) != expected


def test_is_record_tells_a_class_record_made() -> None:
    class Plain(PickledRecord):
        pass

    assert is_record(PickledRecord)
    assert is_record(HostTime)
    assert not is_record(PickledDataclass)
    assert not is_record(Plain)
    assert not is_record(PickledRecord(1))


def test_records_share_their_methods_other_than_init() -> None:
    """The point of a record: one function serves every class, none is compiled per class."""
    for name in ("__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__"):
        shared = getattr(PickledRecord, name)
        assert getattr(DriverVersion, name) is shared
        assert getattr(HgcmU32, name) is shared
        assert getattr(HostTime, name) is shared
    assert vars(PickledRecord)["__init__"] is not vars(HostTime)["__init__"]
