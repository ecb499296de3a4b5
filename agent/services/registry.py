"""Every service the daemon knows: adding one is its module's import and ``SPEC`` here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from agent.services import (
    balloon,
    cpuhotplug,
    guest_stats,
    heartbeat,
    network,
    properties,
    session_monitor,
    timesync,
    users,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.services._base import ServiceSection, ServiceSpec

SERVICES: Final[tuple[ServiceSpec[Any], ...]] = (
    session_monitor.SPEC,
    heartbeat.SPEC,
    guest_stats.SPEC,
    properties.SPEC,
    network.SPEC,
    users.SPEC,
    timesync.SPEC,
    cpuhotplug.SPEC,
    balloon.SPEC,
)
"""In the order of their ``STATUS=`` fragments; the daemon starts them all at once and stops
them all at once (see ``agent.daemon.daemon``)."""


def section_models(
    registry: Sequence[ServiceSpec[Any]] = SERVICES,
) -> dict[str, type[ServiceSection]]:
    """Each service's section model by name: what ``agent.config.load_config`` takes."""
    return {spec.name: spec.section for spec in registry}
