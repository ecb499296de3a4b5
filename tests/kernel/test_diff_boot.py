"""Differential: the load sequence, clean and with the host refusing each of its requests."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Final

import pytest

from agent.protocol.constants import RequestType
from agent.protocol.status import (
    VERR_GENERAL_FAILURE,
    VERR_NOT_IMPLEMENTED,
    VERR_NOT_SUPPORTED,
    status_name,
)
from tests.kernel.differential import Fault, assert_agree, differ

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tests.kernel.differential import Rig

pytestmark = pytest.mark.usefixtures("kernel_library")

LoadStep = tuple[RequestType, int]
"""A request of the load and which of its type it is (from 1)."""

LOAD_STEPS: Final[tuple[LoadStep, ...]] = (
    (RequestType.GET_HOST_VERSION, 1),
    (RequestType.REPORT_GUEST_INFO2, 1),
    (RequestType.REPORT_GUEST_INFO, 1),
    (RequestType.CTL_GUEST_FILTER_MASK, 1),
    (RequestType.SET_GUEST_CAPABILITIES, 1),
    (RequestType.SET_MOUSE_STATUS, 1),
    (RequestType.GET_HYPERVISOR_INFO, 1),
    (RequestType.HEARTBEAT_CONFIGURE, 1),
    (RequestType.HEARTBEAT_CONFIGURE, 2),
    (RequestType.REPORT_GUEST_STATUS, 1),
)
"""A clean load's requests, in ``vbg_core_init``'s order (:func:`test_boot` checks them
against the real driver's)."""
OLD_HOST: Final = Fault(RequestType.REPORT_GUEST_INFO2, 1, VERR_NOT_SUPPORTED)
"""INFO2 refused as a host older than 3.2.51 refuses it: the driver sends INFO, then INFO2."""
OLD_HOST_STEPS: Final[tuple[LoadStep, ...]] = (
    (RequestType.REPORT_GUEST_INFO, 1),
    (RequestType.REPORT_GUEST_INFO2, 2),
)
"""The old protocol's own steps: INFO after the refused INFO2, then INFO2 again."""
STATUSES: Final = (VERR_GENERAL_FAILURE, VERR_NOT_SUPPORTED, VERR_NOT_IMPLEMENTED)
"""What the load tells apart: the two statuses of an older host, and any other failure."""
FAULT_CASES: Final[list[tuple[Fault, ...]]] = [
    (*before, Fault(request_type, nth, status))
    for before, steps in (((), LOAD_STEPS), ((OLD_HOST,), OLD_HOST_STEPS))
    for request_type, nth in steps
    for status in STATUSES
]
"""Each step of both protocols' loads refused with each status."""


def _case_id(faults: tuple[Fault, ...]) -> str:
    last = faults[-1]
    name = f"{last.request_type.name}#{last.nth}-{status_name(last.status)}"
    return f"old-host-{name}" if len(faults) > 1 else name


def load_steps(requests: Sequence[str]) -> tuple[LoadStep, ...]:
    """The steps of a recorded (normalised) request stream."""
    seen: Counter[str] = Counter()
    steps = []
    for request in requests:
        name = request.split(" ", 1)[0]
        seen[name] += 1
        steps.append((RequestType[name], seen[name]))
    return tuple(steps)


async def test_boot() -> None:
    """The driver's load sequence reaches the host request by request."""

    async def script(rig: Rig) -> None:
        rig.note("filter", rig.host.vmmdev.guest_filter)

    results = await differ(script)
    assert_agree(results)
    assert load_steps(results["kernel"][0].requests) == LOAD_STEPS


@pytest.mark.parametrize("faults", FAULT_CASES, ids=_case_id)
async def test_load_with_a_refused_step(faults: tuple[Fault, ...]) -> None:
    """A step the host refuses: the requests after it, whether the driver loads, and whether
    its heartbeat runs (a loaded driver that set it up beats at once)."""

    async def script(rig: Rig) -> None:
        driver = rig.host.driver
        rig.note("loaded", driver.loaded)
        interval = driver.heartbeat_interval_ns
        rig.note("heartbeat interval", interval)
        if driver.loaded and interval:
            await rig.wait_for_host(lambda: rig.host.vmmdev.heartbeat.beats > 0)
        rig.note("beating", rig.host.vmmdev.heartbeat.beats > 0)

    assert_agree(await differ(script, faults))
