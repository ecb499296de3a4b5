"""The simulated host's logger: each of its lines says ``component=simulated-host``.

The in-process transport runs the driver model in a task started with the calling task's
context; the component, bound on the logger, makes each line the host's own: the agent's
log chain merges no context variables into a line naming its component
(``agent.logconfig.OWN_CONTEXT_KEY``), so the caller's ``service=balloon`` does not make a
host line read as the balloon's.
"""

from __future__ import annotations

from typing import Final

import structlog

LOG_COMPONENT: Final = "simulated-host"

host_log = structlog.get_logger("agent.host", component=LOG_COMPONENT)
