"""Guest-property GET throughput and latency through the HGCM channel layer.

For 1, 8 and 32 concurrent callers, each doing GET_PROP of one property through one
``GuestProperties`` client (one HGCM channel), prints gets/s and p50/p99 latency, twice:
in-process (``SimOpener``: host and agent in one trio loop) and over the Unix socket (a
``vbox-agent simulate`` process). In the same run, with the same callers and device, it
measures the same GET_PROP sent raw through the device layer's ``HgcmClient`` and a bare
VMMDev request (GET_HOST_VERSION), and prints the ratios: client/raw is the cost of the
channel and client layers, client/host-version that of the whole HGCM path. The raw GET_PROP
does what the client's get does below those layers: it is prepared once, as the client keeps
a property's GET_PROP prepared, and takes one of the host's call slots without a checkpoint,
waiting only when all are taken, as the client does. Target: at least 20 000 gets/s with 8
callers in-process.

How a get's CPU time splits between the agent's layers and the simulated host's:
``bench/hgcm_layers.py``.

    python bench/hgcm.py [--seconds S] [--personality P] [--callers 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from agent.config import LogConfig
from agent.device import open_device
from agent.device.unix import UnixSocketOpener
from agent.host import SimOpener, SimulatedHost
from agent.logconfig import configure_logging
from agent.protocol import GetHostVersion
from agent.protocol.guest_props import MAX_CALLS_PER_CLIENT, SERVICE_NAME, GuestFunction
from agent.services.guest_props import VALUE_BUFFER_SIZE, open_guest_properties
from agent.services.hgcm import HgcmBufferIn, HgcmBufferOut, HgcmU32, HgcmU64

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.device import Device, DeviceOpener

PROPERTY: Final = "/Bench/Value"
BENCH_LOG_LEVEL: Final = "warning"
"""Only warnings are logged (to stderr): the simulated host's info lines (heartbeat_armed,
...) would land between the tables."""
TARGET_GETS_PER_S: Final = 20_000
TARGET_CALLERS: Final = 8
SOCKET_WAIT_S: Final = 20.0


@dataclass(frozen=True)
class Figures:
    """Calls per second and latency percentiles (µs) of one run."""

    calls: int
    per_second: float
    p50_us: float
    p99_us: float


Rows = list[tuple[int, Figures, Figures, Figures]]
"""Per caller count: client get, raw HGCM GET_PROP, GET_HOST_VERSION."""


async def _drive(call: Callable[[], Awaitable[object]], callers: int, seconds: float) -> Figures:
    """Run ``callers`` tasks calling ``call`` in a loop for ``seconds``; return the figures."""
    latencies: list[int] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter_ns()
            await call()
            latencies.append(time.perf_counter_ns() - start)

    begin = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    elapsed = time.perf_counter() - begin
    ordered = sorted(latencies)
    return Figures(
        len(ordered),
        len(ordered) / elapsed,
        ordered[len(ordered) // 2] / 1000,
        ordered[max(0, int(len(ordered) * 0.99) - 1)] / 1000,
    )


async def _measure(device: Device, callers: list[int], seconds: float) -> Rows:
    """Per caller count: the figures of the client's get, a raw GET_PROP, GET_HOST_VERSION."""
    rows = []
    raw_params = (
        HgcmBufferIn(PROPERTY.encode() + b"\0"),
        HgcmBufferOut(VALUE_BUFFER_SIZE),
        HgcmU64(0),
        HgcmU32(0),
    )
    async with (
        open_guest_properties(device) as props,
        device.open_hgcm_client(SERVICE_NAME) as raw_client,
    ):
        await props.set(PROPERTY, "x" * 32)
        raw_slots = trio.Semaphore(MAX_CALLS_PER_CLIENT - 1)
        raw_call = raw_client.prepare(GuestFunction.GET_PROP, raw_params)

        async def get() -> object:
            return await props.get(PROPERTY)

        async def raw_get() -> object:
            try:  # a free slot is taken without a checkpoint, as the client takes one
                raw_slots.acquire_nowait()
            except trio.WouldBlock:
                await raw_slots.acquire()
            try:
                return await raw_client.call_prepared(raw_call)
            finally:
                raw_slots.release()

        async def host_version() -> object:
            return await device.request(GetHostVersion())

        for count in callers:
            gets = await _drive(get, count, seconds)
            raw = await _drive(raw_get, count, seconds)
            bare = await _drive(host_version, count, seconds)
            rows.append((count, gets, raw, bare))
    return rows


async def _in_process(personality: str, callers: list[int], seconds: float) -> Rows:
    host = SimulatedHost(personality=personality)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        async with open_device(SimOpener(host)) as device:
            rows = await _measure(device, callers, seconds)
        nursery.cancel_scope.cancel()
    return rows


async def _over_socket(opener: DeviceOpener, callers: list[int], seconds: float) -> Rows:
    async with open_device(opener) as device:
        return await _measure(device, callers, seconds)


def _print(title: str, rows: Rows) -> None:
    print(title)
    print(
        "  callers | client get/s  p50 us  p99 us | raw GET_PROP/s  p50 us |"
        " host-version/s  p50 us | client/raw  client/host-version (p50)"
    )
    for count, gets, raw, bare in rows:
        print(
            f"  {count:7d} | {gets.per_second:12.0f} {gets.p50_us:7.1f} {gets.p99_us:7.1f} |"
            f" {raw.per_second:14.0f} {raw.p50_us:7.1f} |"
            f" {bare.per_second:14.0f} {bare.p50_us:7.1f} |"
            f" {gets.p50_us / raw.p50_us:10.2f}x {gets.p50_us / bare.p50_us:10.2f}x"
        )


def _start_simulator(directory: Path, personality: str) -> tuple[subprocess.Popen[bytes], Path]:
    path = directory / "h.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "simulate",
            "--socket",
            str(path),
            "--personality",
            personality,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + SOCKET_WAIT_S
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit("bench: the simulator did not start")
        time.sleep(0.05)
    return process, path


def main() -> None:
    """Run both modes and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--personality", default="mainline")
    parser.add_argument("--callers", default="1,8,32")
    args = parser.parse_args()
    callers = [int(part) for part in args.callers.split(",") if part.strip().isdigit()]
    if len(callers) != len(args.callers.split(",")) or min(callers) < 1:
        parser.error(f"--callers takes counts of 1 or more split by commas, not {args.callers!r}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be more than 0, not {args.seconds:g}")
    configure_logging(LogConfig(level=BENCH_LOG_LEVEL), stream=sys.stderr)
    print(
        f"guest-property GET_PROP vs GET_HOST_VERSION, {args.seconds:g} s each, "
        f"{args.personality} driver, pid {os.getpid()}"
    )
    in_process = trio.run(_in_process, args.personality, callers, args.seconds)
    _print("in-process (SimOpener):", in_process)
    directory = Path(tempfile.mkdtemp(prefix="vbx-bench-", dir="/tmp"))
    process, path = _start_simulator(directory, args.personality)
    try:
        socket_rows = trio.run(_over_socket, UnixSocketOpener(path), callers, args.seconds)
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)
    _print("over the Unix socket (vbox-agent simulate):", socket_rows)
    target = next((gets for count, gets, _, _ in in_process if count == TARGET_CALLERS), None)
    if target is not None:
        verdict = "met" if target.per_second >= TARGET_GETS_PER_S else "MISSED"
        print(
            f"  target >= {TARGET_GETS_PER_S} gets/s with {TARGET_CALLERS} callers "
            f"in-process: {verdict} ({target.per_second:.0f})"
        )


if __name__ == "__main__":
    main()
