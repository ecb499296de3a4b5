"""``vbox-agent simulate --socket PATH``: run a simulated VirtualBox host for other processes.

The host (``agent.host``) serves device sessions and control commands on a Unix socket
(``docs/simulator-socket.md``) until SIGINT or SIGTERM, then exits 0 and removes the socket.
Agents reach it with ``--device unix:PATH``; ``vbox-agent host --socket PATH ...`` controls
it. It logs what it does (each control command served, among others) as the agent does:
JSON lines on stdout, console lines on a terminal. ``--personality kernel`` runs the real
Linux driver from the source checkout's test bed (``testbed/``, see
``docs/personalities.md``), imported only then. Exit codes: 0 clean stop, 64 bad arguments,
69 the socket path is unusable or the personality cannot run here, 70 the host failed in a
way nobody expected (one line on stderr saying how, never a traceback).
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Final

import trio

from agent.cli._arguments import (
    ALL_PERSONALITIES,
    DEFAULT_PERSONALITY,
    integer_at_least,
    socket_path,
)
from agent.cli._exit import EX_OK, EX_SOFTWARE, EX_UNAVAILABLE, EX_USAGE
from agent.cli._output import say
from agent.device.spec import shown_path
from agent.host import PersonalityUnavailableError, SimulatedHost
from agent.host.scenario import (
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    MAX_HEARTBEAT_INTERVAL_MS,
    MIN_HEARTBEAT_INTERVAL_MS,
)
from agent.host.vmmdev import DEFAULT_RAM_MB
from agent.protocol.constants import MAX_GUEST_RAM_MB, MIN_GUEST_RAM_MB
from agent.units import NS_PER_MS

if TYPE_CHECKING:
    import argparse

STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
"""What stops the host (``agent.cli.HELD_SIGNALS`` holds them until it runs)."""


def configure(parser: argparse.ArgumentParser) -> None:
    """Give the ``simulate`` parser its description, arguments and handler."""
    parser.description = (
        "Run a simulated VirtualBox host until SIGINT/SIGTERM. Agents connect with "
        "--device unix:PATH; `vbox-agent host --socket PATH` controls it."
    )
    parser.add_argument(
        "--socket", required=True, type=socket_path, metavar="PATH", help="socket to create"
    )
    parser.add_argument(
        "--personality",
        choices=ALL_PERSONALITIES,
        default=DEFAULT_PERSONALITY,
        help="kernel driver the host models (default: %(default)s)",
    )
    parser.add_argument(
        "--r3-balloon",
        action="store_true",
        help="oracle: the driver has no kernel balloon allocator (from its first inflate on "
        "CHECK_BALLOON answers handle_in_r3; the agent hands over chunks it locks itself)",
    )
    parser.add_argument(
        "--ram-mb",
        type=integer_at_least(MIN_GUEST_RAM_MB, at_most=MAX_GUEST_RAM_MB),
        default=DEFAULT_RAM_MB,
        metavar="N",
        help="guest RAM in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-interval-ms",
        type=integer_at_least(MIN_HEARTBEAT_INTERVAL_MS, at_most=MAX_HEARTBEAT_INTERVAL_MS),
        default=DEFAULT_HEARTBEAT_INTERVAL_MS,
        metavar="N",
        help=(
            f"heartbeat interval the host asks for (>= {MIN_HEARTBEAT_INTERVAL_MS}; "
            "default: %(default)s)"
        ),
    )
    parser.set_defaults(handler=simulate_command)


def simulate_command(args: argparse.Namespace) -> int:
    """Run the host until signalled; return the exit code."""
    from agent.config import LogConfig  # noqa: PLC0415 - loaded only to run the host
    from agent.host.server import HostSocketError  # noqa: PLC0415
    from agent.logconfig import configure_logging  # noqa: PLC0415

    if args.r3_balloon and args.personality != "oracle":
        args.usage_parser.error("--r3-balloon needs --personality oracle")
    configure_logging(LogConfig())
    try:
        host = SimulatedHost(
            personality=args.personality,
            r3_balloon=args.r3_balloon,
            ram_mb=args.ram_mb,
            heartbeat_interval_ns=args.heartbeat_interval_ms * NS_PER_MS,
        )
    except PersonalityUnavailableError as exc:
        say(f"vbox-agent simulate: {exc}")
        return EX_UNAVAILABLE
    except ValueError as exc:
        say(f"vbox-agent simulate: {exc}")
        return EX_USAGE
    failures: list[str] = []
    crashes: list[str] = []
    try:
        trio.run(_serve_until_signalled, host, args.socket)
    except* HostSocketError as group:
        failures += [str(leaf) for leaf in _leaves(group)]
    except* Exception as group:  # noqa: BLE001 - one line and 70, not a traceback
        crashes += [f"{type(leaf).__name__}: {leaf}" for leaf in _leaves(group)]
    if failures:
        say(f"vbox-agent simulate: {failures[0]}")
        return EX_UNAVAILABLE
    if crashes:
        say(f"vbox-agent simulate: the simulated host failed: {crashes[0]}")
        return EX_SOFTWARE
    return EX_OK


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


async def _serve_until_signalled(host: SimulatedHost, path: str) -> None:
    """Serve the host at ``path`` until SIGINT or SIGTERM.

    ``main`` holds both blocked from the start (``HELD_SIGNALS``): they are unblocked once
    the receiver is in place, so one that came during the start stops the host now, and
    the mask is put back after. A signal left in the receiver when it closes is delivered
    again, to ``main``'s handler, which discards it: a second SIGTERM (``timeout`` sends
    two) does not end the stopping host with its default action (143).
    """
    from agent.host.server import clear_socket_path, serve_simulated_host  # noqa: PLC0415

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        before = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            await clear_socket_path(path)  # a path it refuses is its only line: the host logs none
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                await nursery.start(serve_simulated_host, host, path)
                say(f"simulated host listening at {shown_path(path)}")
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
