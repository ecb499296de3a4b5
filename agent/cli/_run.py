"""``vbox-agent run``: the daemon, against a device or the built-in simulated host.

Why it did not start (a bad config, no device) or why it ended is one plain line on stderr,
except under systemd: there every line goes to the journal, and it is one structured log
line (``config_invalid``, ``device_unavailable``, ``device_not_vboxguest``, ``device_lost``,
``agent_failed``) at error priority or above, like everything else the agent logs there.

A log stream that refuses lines (a full disk, a journal or pipe reader gone) or does not
read them (a journal busy on a slow disk, a full pipe, a paused terminal) does not stop the
agent, nor hold it up: it runs on and drops the lines, counted (:mod:`agent.logconfig`). A
stop then drains as always and the exit waits at most ``EXIT_FLUSH_S`` for the stream to
take the lines still waiting; if the stream still refused or did not take the last line,
the run exits 74 (``EX_IOERR``), the one line about it said on stderr when the stream first
failed (nothing when stderr is the same stream).
"""

from __future__ import annotations

import gc
from functools import partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog
import trio

from agent.cli._arguments import PERSONALITIES, device_spec, file_path, positive_seconds
from agent.cli._exit import (
    EX_CONFIG,
    EX_INTERRUPTED,
    EX_IOERR,
    EX_OK,
    EX_SOFTWARE,
    EX_UNAVAILABLE,
)
from agent.cli._output import say
from agent.config import AgentConfig, ConfigError, LogConfig, load_config
from agent.daemon import Daemon, ServiceFailedError
from agent.device import (
    DeviceLostError,
    DeviceUnavailableError,
    NotTheDeviceError,
    opener_for_spec,
)
from agent.logconfig import (
    configure_logging,
    flush_log_output,
    log_output_statistics,
    logs_to_journal,
)
from agent.protocol import AgentError
from agent.services.registry import section_models

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable

    from agent.device import DeviceOpener
    from agent.host import Scenario, SimulatedHost
    from agent.host.scenario import HostSettings

log = structlog.get_logger(__name__)

DEMO_SCENARIO: Final = "demo.toml"


def configure(parser: argparse.ArgumentParser) -> None:
    """Give the ``run`` parser its description, arguments and handler."""
    parser.description = (
        "Run the agent until SIGTERM/SIGINT. With --simulate it runs against a built-in "
        "simulated VirtualBox host that plays the bundled demo scenario."
    )
    parser.add_argument(
        "--config",
        type=file_path,
        metavar="FILE",
        help="TOML config file (default: built-in defaults)",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--device",
        type=device_spec,
        metavar="SPEC",
        help="device path (/dev/vboxguest) or unix:PATH of a simulated host; overrides device.path",
    )
    target.add_argument(
        "--simulate", action="store_true", help="run against an in-process simulated host"
    )
    parser.add_argument(
        "--personality",
        choices=PERSONALITIES,
        help=(
            "driver the simulated host models (with --simulate; default: the scenario's, "
            "mainline in the bundled demo)"
        ),
    )
    parser.add_argument(
        "--scenario",
        type=file_path,
        metavar="FILE",
        help="host scenario TOML to play (with --simulate; default: the bundled demo)",
    )
    parser.add_argument(
        "--duration",
        type=positive_seconds,
        metavar="S",
        help="stop cleanly after S seconds (default: run until signalled)",
    )
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Run the agent; return 0 after a clean shutdown, 74 after one with the log stream
    still refusing lines, another code on failure."""
    usage: argparse.ArgumentParser = args.usage_parser
    if not args.simulate:
        for option, value in (("--personality", args.personality), ("--scenario", args.scenario)):
            if value is not None:
                usage.error(f"{option} needs --simulate")
    try:
        config = (
            load_config(args.config, section_models()) if args.config is not None else AgentConfig()
        )
    except ConfigError as exc:
        configure_logging(LogConfig())  # the file's [log] is not to be trusted
        _say_why(exc.problems, "config_invalid", path=str(args.config), errors=exc.listed)
        return EX_CONFIG
    configure_logging(config.log)
    for warning in config.warnings:
        log.warning("config_deprecated", path=str(args.config), warning=warning)
    main: Callable[[], Awaitable[None]]
    if args.simulate:
        # The simulator is imported only here: a real agent loads none of it.
        from agent.host.scenario import ScenarioError, load_scenario  # noqa: PLC0415

        source = args.scenario or _demo_scenario_path()
        try:
            scenario = load_scenario(source)
        except ScenarioError as exc:
            _say_why([f"vbox-agent run: {exc}"], "scenario_invalid", error=str(exc))
            return EX_CONFIG
        if scenario.host.r3_balloon and args.personality not in (None, "oracle"):
            usage.error(
                f"--personality {args.personality}: {source} sets r3_balloon, an option of "
                "the oracle personality only"
            )
        try:
            host = _simulated_host(scenario.host, args.personality)
        except ValueError as exc:  # a value the host model refuses (its own limits)
            error = f"{source}: host: {exc}"
            _say_why([f"vbox-agent run: {error}"], "scenario_invalid", error=error)
            return EX_CONFIG
        main = partial(_run_simulated, args, config, host, scenario)
    else:
        spec = args.device if args.device is not None else config.device.path
        opener = opener_for_spec(spec, ioctl_threads=config.device.ioctl_threads)
        main = partial(_run_daemon, args, config, opener)
    _freeze_start_up_objects()
    try:
        trio.run(main)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an exit code
        return _report_failure(exc)
    flush_log_output()
    if log_output_statistics().failing is not None:  # said on stderr when it began
        return EX_IOERR
    return EX_OK


def _freeze_start_up_objects() -> None:
    """Keep what start-up made (modules, the config) out of every later garbage collection.

    They live as long as the process. Left in the collector, the first full collection after
    start scans them all and holds the event loop for tens of milliseconds, long enough to
    make a 100 ms heartbeat late; frozen, a full collection scans only what the running agent
    made since.
    """
    gc.collect()
    gc.freeze()


def _simulated_host(settings: HostSettings, personality: str | None) -> SimulatedHost:
    """Build the host the scenario's ``[host]`` table describes (``personality`` overrides;
    the caller refused one that contradicts ``r3_balloon``).

    Raises:
        ValueError: a setting the host model refuses (below or above its limits).
    """
    from agent.host import SimulatedHost  # noqa: PLC0415

    return SimulatedHost(
        personality=personality or settings.personality,
        r3_balloon=settings.r3_balloon,
        ram_mb=settings.ram_mb,
        heartbeat_interval_ns=settings.heartbeat_interval_ns,
        host_time_enabled=settings.host_time,
        core_dump_enabled=settings.core_dumps,
        seed=settings.seed,
    )


async def _run_simulated(
    args: argparse.Namespace, config: AgentConfig, host: SimulatedHost, scenario: Scenario
) -> None:
    """Run ``host``, play ``scenario`` on it, and run the agent against it."""
    from agent.host import SimOpener, play_scenario  # noqa: PLC0415

    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        nursery.start_soon(play_scenario, host, scenario)
        await _run_daemon(args, config, SimOpener(host))
        nursery.cancel_scope.cancel()


async def _run_daemon(args: argparse.Namespace, config: AgentConfig, opener: DeviceOpener) -> None:
    """Run the agent until stopped.

    Raises:
        DeviceUnavailableError: ``--duration`` elapsed before the device opened (a stop by
            SIGTERM or SIGINT meanwhile is a clean one: only the warning is logged).
    """
    elapsed = trio.Event()
    async with trio.open_nursery() as nursery:
        daemon = Daemon(
            config,
            opener,
            config_path=args.config,
            device_from_file=args.device is None and not args.simulate,
        )
        if args.duration is not None:
            nursery.start_soon(_stop_after, daemon, args.duration, elapsed)
        await daemon.run()
        nursery.cancel_scope.cancel()
    if not daemon.device_opened:
        device = opener.description
        log.warning("device_never_reached", device=device)
        if elapsed.is_set():
            msg = f"{device} was never reached: --duration {args.duration:g} s elapsed first"
            raise DeviceUnavailableError(msg)


async def _stop_after(daemon: Daemon, seconds: float, elapsed: trio.Event) -> None:
    await trio.sleep(seconds)
    elapsed.set()
    daemon.request_shutdown(f"--duration {seconds:g} s elapsed")


def _demo_scenario_path() -> Path:
    """The bundled demo: packaged in the wheel, or ``config/`` of a source checkout."""
    packaged = resources.files("agent").joinpath("data", DEMO_SCENARIO)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "config" / DEMO_SCENARIO


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _say_why(lines: list[str], event: str | None = None, **fields: object) -> None:
    """Say why ``run`` did not start or ended.

    Under systemd, where the agent's log lines go to the journal (and stderr with them), as
    the one structured ``event`` line at error priority, which ``journalctl -o json`` and
    ``-p err`` users filter on (nothing more when ``event`` is None: the caller logged it);
    elsewhere as plain ``lines`` on stderr, for the person or script that started it.
    """
    if not logs_to_journal():
        for line in lines:
            say(line)
    elif event is not None:
        log.error(event, **fields)


def _report_failure(exc: BaseException) -> int:
    leaves = _leaves(exc)
    if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
        return EX_INTERRUPTED
    for leaf in leaves:
        line = f"vbox-agent: {leaf}"
        if isinstance(leaf, DeviceLostError):  # the log says why a running agent ended
            log.critical("device_lost", error=str(leaf))
            _say_why([line])
            return EX_UNAVAILABLE
        if isinstance(leaf, NotTheDeviceError):  # a wrong path: restarting will not help
            _say_why([line], "device_not_vboxguest", error=str(leaf))
            return EX_CONFIG
        if isinstance(leaf, DeviceUnavailableError):
            _say_why([line], "device_unavailable", error=str(leaf))
            return EX_UNAVAILABLE
    for leaf in leaves:
        if isinstance(leaf, ServiceFailedError | AgentError | OSError):
            log.critical("agent_failed", error=repr(leaf))
            _say_why([f"vbox-agent: fatal: {leaf}"])
            return EX_SOFTWARE
    log.critical("agent_crashed", exc_info=exc)
    return EX_SOFTWARE
