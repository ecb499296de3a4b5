"""Factors between time units, for every layer (stdlib only: nothing to import)."""

from __future__ import annotations

from typing import Final

NS_PER_S: Final = 1_000_000_000
NS_PER_MS: Final = 1_000_000
MS_PER_S: Final = 1000
