"""The simulated host's logger: each of its lines says ``component=simulated-host``.

The in-process transport runs the driver model in a task started with the calling task's
context, so the caller's context (``service=balloon``...) is merged in too; the component,
bound on the logger, tells the simulated driver's and host's lines from the agent's own.
"""

from __future__ import annotations

from typing import Final

import structlog

LOG_COMPONENT: Final = "simulated-host"

host_log = structlog.get_logger("agent.host", component=LOG_COMPONENT)
