"""What the tests of the publishing services (``network``, ``users``) share."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class GuestSource(Generic[T]):
    """What a publishing service reads: items the test changes, or an error it raises."""

    def __init__(self, *items: T) -> None:
        self.now: tuple[T, ...] = items
        self.error: OSError | None = None

    def __call__(self) -> tuple[T, ...]:
        if self.error is not None:
            raise self.error
        return self.now
