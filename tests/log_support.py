"""A log stream for tests of what the agent does when its log cannot be written."""

from __future__ import annotations

import io


class Refusing(io.StringIO):
    """A log stream that refuses every write while ``error`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        if self.error is not None:
            raise self.error
        return super().write(text)
