"""Long-lived services of the agent and the framework they plug into (``_base``, ``registry``)."""

from __future__ import annotations

from agent.services._base import (
    BalloonGauge as BalloonGauge,
    DrainTime as DrainTime,
    Service as Service,
    ServiceContext as ServiceContext,
    ServiceSection as ServiceSection,
    ServiceSpec as ServiceSpec,
    SessionLedger as SessionLedger,
    Statistics as Statistics,
)
from agent.services._leftovers import Leftovers as Leftovers, Remnant as Remnant
from agent.services.event_pump import (
    EventPump as EventPump,
    EventPumpStatistics as EventPumpStatistics,
    SubscriberStatistics as SubscriberStatistics,
    Subscription as Subscription,
)
from agent.services.session_monitor import (
    SessionMonitor as SessionMonitor,
    SessionMonitorSection as SessionMonitorSection,
    SessionMonitorStatistics as SessionMonitorStatistics,
)
