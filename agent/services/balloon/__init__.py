"""The memory balloon service (see :mod:`agent.services.balloon._service`).

The chunks the agent allocates itself (:mod:`._chunks`) are not re-exported here: only the
modes where the agent holds chunks load that module.
"""

from __future__ import annotations

from agent.services._base import ServiceContext, ServiceSpec
from agent.services.balloon._config import BalloonSection as BalloonSection
from agent.services.balloon._mode import BalloonMode as BalloonMode
from agent.services.balloon._pressure import (
    PressureReading as PressureReading,
    PressureSource as PressureSource,
    PsiMonitor as PsiMonitor,
)
from agent.services.balloon._service import (
    BalloonService as BalloonService,
    BalloonStatistics as BalloonStatistics,
)


def _build(ctx: ServiceContext, section: BalloonSection) -> BalloonService:
    return BalloonService(
        ctx.device,
        ctx.pump,
        section,
        status_changed=ctx.status_changed,
        gauge=ctx.balloon,
        agent_stopping=ctx.agent_stopping,
        drain_time=ctx.drain_time,
        leftovers=ctx.leftovers,
    )


SPEC: ServiceSpec[BalloonSection] = ServiceSpec("balloon", BalloonSection, _build)
