"""The daemon layer: supervisor, signals, reload, sd_notify; ``Daemon`` is the process root."""

from __future__ import annotations

from agent.daemon.daemon import Daemon as Daemon, DaemonStatistics as DaemonStatistics
from agent.daemon.supervisor import (
    ServiceFailedError as ServiceFailedError,
    Supervisor as Supervisor,
)
