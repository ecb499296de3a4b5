"""Where a guest-property GET spends its time, layer by layer, next to a bare VMMDev request.

Runs the in-process path of ``bench/hgcm.py`` (``SimOpener``, mainline driver, 8 callers):
first unprofiled, for the CPU time of one GET_PROP and one GET_HOST_VERSION, then under
cProfile, whose self times (built-ins counted with the function that called them) are summed
per layer and scaled to the unprofiled CPU time. cProfile slows call-heavy code more than the
rest, so the split is an estimate; the totals are measured.

    python bench/hgcm_layers.py [--calls N] [--callers C]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from typing import TYPE_CHECKING, Final

import trio

from agent.config import LogConfig
from agent.device import open_device
from agent.host import SimOpener, SimulatedHost
from agent.logconfig import configure_logging
from agent.protocol import GetHostVersion
from agent.services.guest_props import open_guest_properties

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

PROPERTY: Final = "/Bench/Value"
BENCH_LOG_LEVEL: Final = "warning"
"""Only warnings are logged (to stderr): the simulated host's info lines (heartbeat_armed,
...) would land between the tables."""
LAYERS: Final = (
    ("agent/services/", "client: guest_props, HGCM channel"),
    ("agent/device/", "device: Device, session channel"),
    ("agent/protocol/", "protocol: codecs, session rules, layouts"),
    ("agent/host/transport.py", "SimTransport, host facade"),
    ("agent/host/host.py", "SimTransport, host facade"),
    ("agent/host/driver/", "simulated mainline driver"),
    ("agent/host/memory.py", "guest memory (DictMemory)"),
    ("agent/host/vmmdev.py", "VMMDev port handler"),
    ("agent/host/_faults.py", "VMMDev port handler"),
    ("agent/host/hgcm", "host HGCM framework"),
    ("agent/host/_hgcm_parms.py", "host HGCM framework"),
    ("agent/host/guest_props/", "host guest-property service"),
    ("/trio/", "trio scheduler"),
)
"""Path fragments (first match wins) and the layer they belong to."""
OTHER: Final = "other (stdlib, enum, the loop below)"

TRANSPARENT: Final = ("~", "agent/protocol/layouts.py")
"""Built-ins and the layout accessors: their time belongs to whoever called them."""

Key = tuple[str, int, str]
Stat = tuple[int, int, float, float, dict[Key, tuple[int, int, float, float]]]


def layer_of(path: str) -> str:
    """The layer a source file belongs to."""
    return next((layer for fragment, layer in LAYERS if fragment in path), OTHER)


def self_time_by_layer(stats: dict[Key, Stat]) -> dict[str, float]:
    """Self time per layer; built-ins and layout accessors count for their callers' layers."""
    totals: dict[str, float] = dict.fromkeys([layer for _, layer in LAYERS] + [OTHER], 0.0)

    def charge(key: Key, seconds: float, depth: int) -> None:
        path = key[0]
        if not any(fragment in path for fragment in TRANSPARENT) or depth == 0:
            totals[layer_of(path)] += seconds
            return
        callers = stats[key][4]
        weight = sum(entry[3] for entry in callers.values())
        if not weight:
            totals[OTHER] += seconds
            return
        for caller, entry in callers.items():
            charge(caller, seconds * entry[3] / weight, depth - 1)

    for key, stat in stats.items():
        charge(key, stat[2], depth=2)
    return totals


async def _drive(call: Callable[[], Awaitable[object]], calls: int, callers: int) -> float:
    """Make ``calls`` calls from ``callers`` tasks (a multiple of ``callers``); return the CPU
    seconds they took."""

    async def caller(count: int) -> None:
        for _ in range(count):
            await call()

    start = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller, calls // callers)
    return time.process_time() - start


async def _measure(calls: int, callers: int) -> dict[str, tuple[float, dict[str, float]]]:
    """Per operation: CPU seconds per call and the profiled self time per layer."""
    host = SimulatedHost(personality="mainline")
    results: dict[str, tuple[float, dict[str, float]]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        async with open_device(SimOpener(host)) as device, open_guest_properties(device) as props:
            await props.set(PROPERTY, "x" * 32)

            async def get() -> object:
                return await props.get(PROPERTY)

            async def host_version() -> object:
                return await device.request(GetHostVersion())

            for name, call in (("GET_PROP", get), ("GET_HOST_VERSION", host_version)):
                cpu = await _drive(call, calls, callers)
                profile = cProfile.Profile()
                profile.enable()
                await _drive(call, calls, callers)
                profile.disable()
                stats: dict[Key, Stat] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
                results[name] = (cpu / calls, self_time_by_layer(stats))
        nursery.cancel_scope.cancel()
    return results


def main() -> None:
    """Measure both operations and print the per-layer table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=8000)
    parser.add_argument("--callers", type=int, default=8)
    args = parser.parse_args()
    if args.callers < 1:
        parser.error(f"--callers must be 1 or more, not {args.callers}")
    if args.calls < 1 or args.calls % args.callers:
        parser.error(
            f"--calls must be a multiple of --callers ({args.callers}), each making as many,"
            f" not {args.calls}"
        )
    configure_logging(LogConfig(level=BENCH_LOG_LEVEL), stream=sys.stderr)
    results = trio.run(_measure, args.calls, args.callers)
    get_cpu, get_layers = results["GET_PROP"]
    bare_cpu, bare_layers = results["GET_HOST_VERSION"]
    get_total, bare_total = sum(get_layers.values()), sum(bare_layers.values())
    print(
        f"CPU us per call, {args.callers} callers, in-process mainline, pid {os.getpid()}: "
        f"GET_PROP {get_cpu * 1e6:.1f}, GET_HOST_VERSION {bare_cpu * 1e6:.1f} "
        f"(ratio {get_cpu / bare_cpu:.2f}x)"
    )
    print(f"  {'layer':42s} {'GET_PROP us':>12s} {'HOST_VERSION us':>16s}")
    for layer in dict.fromkeys([name for _, name in LAYERS] + [OTHER]):
        get_us = get_cpu * 1e6 * get_layers[layer] / get_total
        bare_us = bare_cpu * 1e6 * bare_layers[layer] / bare_total
        print(f"  {layer:42s} {get_us:12.1f} {bare_us:16.1f}")


if __name__ == "__main__":
    main()
