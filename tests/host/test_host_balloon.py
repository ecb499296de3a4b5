"""HostBalloon's page bookkeeping against a model that keeps every ballooned page in one set.

The balloon keeps chunk-aligned MiBs ballooned whole as one number and every other page by
its frame; whatever mix of whole, shifted, reversed, overlapping and repeated chunks a guest
sends, its answers and its page count must be the model's.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from agent.host._balloon import HostBalloon
from agent.protocol.balloon_pages import CHUNK_PAGES, aligned_chunk_index, consecutive_pages
from agent.protocol.constants import BALLOON_CHUNK_PAGES, PAGE_SIZE
from agent.protocol.status import (
    VERR_ALREADY_EXISTS,
    VERR_INVALID_PARAMETER,
    VERR_NOT_FOUND,
    VINF_SUCCESS,
)

MIB = BALLOON_CHUNK_PAGES * PAGE_SIZE
BASE = 1 << 32


class SetModel:
    """Every ballooned page's address in one set; the statuses HostBalloon documents."""

    def __init__(self) -> None:
        self.pages: set[int] = set()

    def change(self, inflate: bool, addresses: list[int]) -> int:
        chosen = set(addresses)
        if any(a % PAGE_SIZE for a in addresses) or len(chosen) != BALLOON_CHUNK_PAGES:
            return VERR_INVALID_PARAMETER
        if inflate:
            if chosen & self.pages:
                return VERR_ALREADY_EXISTS
            self.pages |= chosen
        else:
            if not chosen <= self.pages:
                return VERR_NOT_FOUND
            self.pages -= chosen
        return VINF_SUCCESS


@st.composite
def chunks(draw: st.DrawFn) -> list[int]:
    """Arrays around three MiBs: whole ones, shifted by pages, reversed, mixed or repeated."""
    mib = draw(st.integers(0, 2))
    shift = draw(st.sampled_from([0, 0, 0, 1, 128, 255]))
    pages = [BASE + mib * MIB + (shift + i) * PAGE_SIZE for i in range(BALLOON_CHUNK_PAGES)]
    shape = draw(st.sampled_from(["as is", "as is", "reversed", "halves", "repeat", "unaligned"]))
    if shape == "reversed":
        pages.reverse()
    elif shape == "halves":  # half of this MiB, half of the next one
        other = [p + MIB for p in pages]
        pages = pages[:128] + other[128:]
    elif shape == "repeat":
        pages[-1] = pages[0]
    elif shape == "unaligned":
        pages[draw(st.integers(0, 255))] += 8
    return pages


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), chunks()), max_size=30))
def test_answers_and_pages_match_a_set_of_pages(steps: list[tuple[bool, list[int]]]) -> None:
    balloon, model, chunks_held = HostBalloon(8192), SetModel(), 0
    for inflate, addresses in steps:
        expected = model.change(inflate, addresses)
        assert balloon.change(inflate, CHUNK_PAGES.pack(*addresses)) == expected
        if expected == VINF_SUCCESS:
            chunks_held += 1 if inflate else -1
        assert (balloon.chunks, balloon.pages) == (chunks_held, len(model.pages))


def test_whole_mib_recognised_only_for_its_own_array() -> None:
    """Only the 256 pages of one aligned MiB, in order, count as that MiB."""
    first = BASE + 3 * MIB
    assert aligned_chunk_index(consecutive_pages(first)) == first // MIB
    assert aligned_chunk_index(consecutive_pages(first + PAGE_SIZE)) is None
    reversed_pages = CHUNK_PAGES.pack(*reversed(CHUNK_PAGES.unpack(consecutive_pages(first))))
    assert aligned_chunk_index(reversed_pages) is None
    assert aligned_chunk_index(consecutive_pages(first)[:-8]) is None


def test_a_whole_mib_given_back_page_by_page() -> None:
    """Two MiBs inflated whole, given back as every other page of both (twice)."""
    balloon = HostBalloon(8192)
    first, second = BASE, BASE + MIB
    assert balloon.change(True, consecutive_pages(first)) == VINF_SUCCESS
    assert balloon.change(True, consecutive_pages(second)) == VINF_SUCCESS
    pages = [*CHUNK_PAGES.unpack(consecutive_pages(first))]
    pages += CHUNK_PAGES.unpack(consecutive_pages(second))
    assert balloon.change(False, CHUNK_PAGES.pack(*reversed(pages[::2]))) == VINF_SUCCESS
    assert (balloon.chunks, balloon.pages) == (1, 256)
    assert balloon.change(False, consecutive_pages(first)) == VERR_NOT_FOUND
    assert balloon.change(False, CHUNK_PAGES.pack(*pages[1::2])) == VINF_SUCCESS
    assert (balloon.chunks, balloon.pages) == (0, 0)
