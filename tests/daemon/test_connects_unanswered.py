"""The daemon's log while the host answers no HGCM connect: one warning, not one per retry.

Rules of this test module:
- A real ``SimulatedHost`` (mainline) behind ``SimOpener`` and the whole daemon with its
  default services; the host holds every HGCM connect (``set_delay``) for the whole test.
- Pure trio: ``autojump_clock``; bounded by ``fail_after``; the daemon runs for
  ``RUN_S`` of virtual time, then is cancelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import structlog
import structlog.testing
import trio

from agent.config import AgentConfig
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimOpener, SimulatedHost
from agent.protocol import RequestType

if TYPE_CHECKING:
    from collections.abc import MutableMapping
    from typing import Any

RUN_S: Final = 1200.0
"""Twenty minutes: thirty tries of each property client's connect (30 s, then 10 s)."""
PROPERTY_CLIENTS: Final = ("properties", "network", "users")


def _lines(logs: list[MutableMapping[str, Any]], event: str, level: str) -> list[str]:
    return [e.get("service", "-") for e in logs if e["event"] == event and e["log_level"] == level]


async def test_connects_the_host_never_answers_log_one_warning(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Each property client retries its connect every 40 s and logs its failure once
    (``property_service_unavailable``); the transport's ``ioctl_abandoned`` and
    ``close_deferred`` for each abandoned connect are warnings once for the whole episode,
    debug lines after that, where they were a warning pair at every retry of each client."""
    host = SimulatedHost(personality="mainline")
    daemon = Daemon(AgentConfig(), SimOpener(host), notifier=Notifier(None))
    with (
        trio.fail_after(2 * RUN_S),
        structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]
        ) as logs,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            host.set_delay(RequestType.HGCM_CONNECT, 10 * RUN_S)
            with trio.move_on_after(RUN_S):
                await daemon.run()
            nursery.cancel_scope.cancel()
    unavailable = _lines(logs, "property_service_unavailable", "warning")
    assert sorted(unavailable) == sorted(PROPERTY_CLIENTS)
    assert len(_lines(logs, "ioctl_abandoned", "warning")) == 1
    assert len(_lines(logs, "close_deferred", "warning")) == 1
    retried = _lines(logs, "ioctl_abandoned", "debug")
    assert all(retried.count(name) >= RUN_S // 40 - 1 for name in PROPERTY_CLIENTS)
