"""HostBalloon's page bookkeeping against a model that keeps every ballooned page in one set.

The balloon keeps chunk-aligned MiBs ballooned whole as one number and every other page by
its frame; whatever mix of whole, shifted, reversed, overlapping, repeated and unaligned
chunks a guest sends, its answers, its page states and GMM's count must be the model's, the
real host's rules written out plainly (``pgmR3PhysChangeMemBalloonRendezvous``,
``GMMR0BalloonedPages``).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from structlog.testing import capture_logs

from agent.host._balloon import HANDY_PAGES, HostBalloon
from agent.protocol.balloon_pages import CHUNK_PAGES, aligned_chunk_index, consecutive_pages
from agent.protocol.constants import BALLOON_CHUNK_PAGES, PAGE_SIZE
from agent.protocol.status import (
    VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH,
    VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH,
    VERR_INVALID_PARAMETER,
    VINF_SUCCESS,
)

MIB = BALLOON_CHUNK_PAGES * PAGE_SIZE
BASE = 1 << 32
RAM_MB = 8192


class SetModel:
    """Every ballooned page's frame in one set, GMM's count beside it; one vCPU's answers."""

    def __init__(self) -> None:
        self.frames: set[int] = set()
        self.counted = 0

    def change(self, inflate: bool, addresses: list[int]) -> int:
        if addresses[0] % PAGE_SIZE:
            return VERR_INVALID_PARAMETER
        chosen = {a // PAGE_SIZE for a in addresses}
        if inflate:
            self.frames |= chosen
            allocated = RAM_MB * BALLOON_CHUNK_PAGES - len(self.frames) + HANDY_PAGES
            reserved = RAM_MB * BALLOON_CHUNK_PAGES + HANDY_PAGES
            if allocated + self.counted + BALLOON_CHUNK_PAGES > reserved:
                return VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH
            self.counted += BALLOON_CHUNK_PAGES
        else:
            self.frames -= chosen
            if self.counted < BALLOON_CHUNK_PAGES:
                return VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH
            self.counted -= BALLOON_CHUNK_PAGES
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
@given(st.lists(st.tuples(st.booleans(), chunks()), max_size=30), st.sampled_from([1, 4]))
def test_answers_and_pages_match_a_set_of_pages(
    steps: list[tuple[bool, list[int]]], cpus: int
) -> None:
    """One vCPU answers what the model answers, several answer success; the page states
    and the count are the model's either way."""
    balloon, model = HostBalloon(RAM_MB, cpus=cpus), SetModel()
    for inflate, addresses in steps:
        expected = model.change(inflate, addresses)
        if cpus > 1 and expected != VERR_INVALID_PARAMETER:
            expected = VINF_SUCCESS
        assert balloon.change(inflate, CHUNK_PAGES.pack(*addresses)) == expected
        assert (balloon.pages, balloon.counted_pages) == (len(model.frames), model.counted)
        assert balloon.chunks == model.counted // BALLOON_CHUNK_PAGES


def test_whole_mib_recognised_only_for_its_own_array() -> None:
    """Only the 256 pages of one aligned MiB, in order, count as that MiB."""
    first = BASE + 3 * MIB
    assert aligned_chunk_index(consecutive_pages(first)) == first // MIB
    assert aligned_chunk_index(consecutive_pages(first + PAGE_SIZE)) is None
    reversed_pages = CHUNK_PAGES.pack(*reversed(CHUNK_PAGES.unpack(consecutive_pages(first))))
    assert aligned_chunk_index(reversed_pages) is None
    assert aligned_chunk_index(consecutive_pages(first)[:-8]) is None


def test_a_whole_mib_given_back_page_by_page() -> None:
    """Two MiBs inflated whole, given back as every other page of both (twice): the first
    array of the two takes back half of each, the count a chunk; the second array leaves
    the page states empty, and deflating a MiB again only takes the last chunk off the
    count, the one after it is refused."""
    balloon = HostBalloon(RAM_MB, cpus=1)
    first, second = BASE, BASE + MIB
    assert balloon.change(True, consecutive_pages(first)) == VINF_SUCCESS
    assert balloon.change(True, consecutive_pages(second)) == VINF_SUCCESS
    pages = [*CHUNK_PAGES.unpack(consecutive_pages(first))]
    pages += CHUNK_PAGES.unpack(consecutive_pages(second))
    assert balloon.change(False, CHUNK_PAGES.pack(*reversed(pages[::2]))) == VINF_SUCCESS
    assert (balloon.chunks, balloon.pages) == (1, 256)
    assert balloon.change(False, CHUNK_PAGES.pack(*pages[1::2])) == VINF_SUCCESS
    assert (balloon.chunks, balloon.pages) == (0, 0)
    refused = balloon.change(False, consecutive_pages(first))
    assert (refused, balloon.chunks, balloon.pages) == (VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH, 0, 0)


class TestWhatARealHostLetsThrough:
    """The answers the simulated host once made up (a page ballooned twice refused, one
    never ballooned refused on deflate, an unaligned page past the first refused) are gone:
    the real host checks the first page only and keeps count, not pages."""

    @pytest.mark.parametrize("cpus", [1, 2])
    def test_a_chunk_inflated_twice_is_counted_once_more_than_its_pages(self, cpus: int) -> None:
        """The second inflate of a chunk marks nothing new; GMM refuses to count it, which
        one vCPU answers and several only log: its reservation adds PGM's 128 handy pages to
        RAM, but they are allocated (a full set), so a guest that touched all its memory has
        no spare page. Half a chunk again is refused too, the 128 new pages ballooned
        uncounted; a fresh chunk then is counted."""
        balloon = HostBalloon(RAM_MB, cpus=cpus)
        chunk = consecutive_pages(BASE)
        assert balloon.change(True, chunk) == VINF_SUCCESS
        with capture_logs() as logs:
            again = balloon.change(True, chunk)
        assert again == (VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH if cpus == 1 else VINF_SUCCESS)
        assert [(e["event"], e["rc"], e["seen_by_guest"]) for e in logs] == [
            ("balloon_change_failed", "VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH", cpus == 1)
        ]
        assert (balloon.pages, balloon.counted_pages) == (256, 256)
        half_over = [*CHUNK_PAGES.unpack(consecutive_pages(BASE + MIB))][:128]
        half_over += CHUNK_PAGES.unpack(chunk)[:128]
        refused = balloon.change(True, CHUNK_PAGES.pack(*half_over))
        assert refused == (VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH if cpus == 1 else VINF_SUCCESS)
        assert (balloon.pages, balloon.counted_pages) == (384, 256)
        assert balloon.change(True, consecutive_pages(BASE + 2 * MIB)) == VINF_SUCCESS
        assert (balloon.pages, balloon.counted_pages) == (640, 512)

    @pytest.mark.parametrize("cpus", [1, 2])
    def test_a_chunk_never_inflated_is_deflated_from_the_count(self, cpus: int) -> None:
        """A deflate of pages never ballooned succeeds while the count covers a chunk,
        taking another chunk's share of it; with the count at 0 it is refused (one vCPU)
        or logged (several), and the pages it named are not ballooned either way."""
        balloon = HostBalloon(RAM_MB, cpus=cpus)
        held, never = consecutive_pages(BASE), consecutive_pages(BASE + MIB)
        assert balloon.change(True, held) == VINF_SUCCESS
        assert balloon.change(False, never) == VINF_SUCCESS
        assert (balloon.pages, balloon.counted_pages) == (256, 0)
        with capture_logs() as logs:
            refused = balloon.change(False, held)
        assert refused == (VERR_GMM_ATTEMPT_TO_DEFLATE_TOO_MUCH if cpus == 1 else VINF_SUCCESS)
        assert [e["seen_by_guest"] for e in logs] == [cpus == 1]
        assert (balloon.pages, balloon.counted_pages) == (0, 0)

    @pytest.mark.parametrize("cpus", [1, 2])
    def test_only_the_first_page_must_be_aligned(self, cpus: int) -> None:
        """An unaligned first page is refused whatever the vCPUs (before the work is
        queued); any other page names the page it falls in, and a page named twice is one:
        255 pages ballooned, which GMM refuses to count as 256 (no spare page)."""
        balloon = HostBalloon(RAM_MB, cpus=cpus)
        pages = [*CHUNK_PAGES.unpack(consecutive_pages(BASE))]
        unaligned = [pages[0] + 8, *pages[1:]]
        assert balloon.change(True, CHUNK_PAGES.pack(*unaligned)) == VERR_INVALID_PARAMETER
        assert (balloon.pages, balloon.counted_pages) == (0, 0)
        odd = [*pages[:-2], pages[-2] + 0x800, pages[0]]
        refused = balloon.change(True, CHUNK_PAGES.pack(*odd))
        assert refused == (VERR_GMM_ATTEMPT_TO_FREE_TOO_MUCH if cpus == 1 else VINF_SUCCESS)
        assert (balloon.pages, balloon.counted_pages) == (255, 0)

    def test_reset_empties_both(self) -> None:
        """A VM reset frees every page and resets GMM's count (``pgmR3PhysRamReset``)."""
        balloon = HostBalloon(RAM_MB, cpus=1)
        assert balloon.change(True, consecutive_pages(BASE)) == VINF_SUCCESS
        assert balloon.change(False, consecutive_pages(BASE + MIB)) == VINF_SUCCESS
        assert balloon.change(True, consecutive_pages(BASE + 2 * MIB)) == VINF_SUCCESS
        assert (balloon.pages, balloon.counted_pages) == (512, 256)
        balloon.reset()
        assert (balloon.pages, balloon.counted_pages) == (0, 0)
