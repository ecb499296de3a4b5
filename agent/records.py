"""``@record``: a frozen, slotted dataclass whose methods other than ``__init__`` are shared.

``@dataclass(frozen=True, slots=True)`` compiles six methods for every class (``__init__``,
``__repr__``, ``__eq__``, ``__hash__``, ``__setattr__``, ``__delattr__``), each its own code
object. A record keeps only the generated ``__init__``, where the speed of building one
lies, and uses one function for each of the others, reading the class's fields. Measured
with tracemalloc on Python 3.11, a class of three fields keeps about 13 KiB as such a
dataclass and about 5 KiB as a record: about 8 KiB less a class, and the agent has about
ninety (the protocol's messages above all).

The results are the dataclass's: the repr (``...`` for an instance within itself), equality
of two instances of the same class on their compared fields (NotImplemented for any other
class), the hash of the hashed fields, field options, a method the class writes itself kept
(a class writing ``__eq__`` without ``__hash__`` is hashed on its fields, as dataclasses
decide), ``dataclasses.fields``, ``replace``, ``asdict``, pickling and copying. What differs,
on purpose:

- the shared ``__eq__`` and ``__hash__`` are slower than the compiled ones (about 3x and 5x
  for three fields: a few hundred nanoseconds more a call), so a record should not be a
  dict key or set member on a hot path;
- ``__dataclass_params__`` says ``eq=False`` and ``repr=False``: those are the options the
  dataclass was made with, the shared methods added after it;
- assigning or deleting an attribute that is no field raises ``FrozenInstanceError``, as for
  a field (the dataclass raises TypeError there on Python 3.11), also on an instance of a plain
  subclass.

:func:`is_record` tells a record class. A leaf module (standard library only), used by every
layer.
"""

from __future__ import annotations

import dataclasses
import reprlib
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast, dataclass_transform, overload

if TYPE_CHECKING:
    from collections.abc import Callable

C = TypeVar("C", bound=type)


@overload
def record(cls: C, /) -> C: ...
@overload
def record(*, init: bool = True) -> Callable[[C], C]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field, dataclasses.Field))
def record(cls: C | None = None, /, *, init: bool = True) -> C | Callable[[C], C]:
    """Make ``cls`` a frozen, slotted dataclass with the shared methods.

    ``init=False`` leaves ``__init__`` to the class, as the dataclass option does.
    """

    def make(cls: C) -> C:
        own = set(vars(cls))
        if vars(cls).get("__hash__", 0) is None and "__eq__" in own:
            # Python's None for a class that writes __eq__ alone: a dataclass hashes it.
            own.discard("__hash__")
        made: Any = dataclasses.dataclass(frozen=True, slots=True, init=init, repr=False, eq=False)(
            cls
        )
        fields = dataclasses.fields(made)
        shown = tuple(field.name for field in fields if field.repr)
        compared = tuple(field.name for field in fields if field.compare)
        hashed = tuple(
            field.name for field in fields if (field.compare if field.hash is None else field.hash)
        )
        # Most records show, compare and hash every field: one tuple then serves all three.
        made._record_repr = shown
        made._record_compare = shown if compared == shown else compared
        made._record_hash = shown if hashed == shown else hashed
        for name, method in _SHARED.items():
            if name not in own:  # a method the class writes itself stays, as in a dataclass
                setattr(made, name, method)
        # The dataclass compiled these (it always does for a frozen class): replaced, they
        # are freed.
        made.__setattr__ = _frozen_setattr
        made.__delattr__ = _frozen_delattr
        return cast("C", made)

    return make if cls is None else make(cls)


def is_record(cls: object) -> bool:
    """Whether ``cls`` is a class that ``@record`` made (not one derived from it)."""
    return isinstance(cls, type) and "_record_repr" in vars(cls)


def _values(instance: object, names: tuple[str, ...]) -> tuple[object, ...]:
    return tuple([getattr(instance, name) for name in names])


@reprlib.recursive_repr()
def _repr(self: Any) -> str:
    shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._record_repr)
    return f"{type(self).__qualname__}({shown})"


def _eq(self: Any, other: object) -> object:
    names: tuple[str, ...] = self._record_compare
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self, names) == _values(other, names)


def _hash(self: Any) -> int:
    return hash(_values(self, self._record_hash))


_SHARED: Final = {"__repr__": _repr, "__eq__": _eq, "__hash__": _hash}


def _frozen_setattr(self: object, name: str, value: object) -> None:
    msg = f"cannot assign to field {name!r}"
    raise dataclasses.FrozenInstanceError(msg)


def _frozen_delattr(self: object, name: str) -> None:
    msg = f"cannot delete field {name!r}"
    raise dataclasses.FrozenInstanceError(msg)
