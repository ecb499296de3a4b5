"""Heartbeat lateness as the host sees it, idle and under a CPU hog; statistics report cost.

A simulated host (``passthrough``, 100 ms heartbeat interval) runs in this process and
serves a real ``vbox-agent run`` process over a Unix socket; the host stamps every
GUEST_HEARTBEAT when its port handler sees it. The figure is, for each beat after the first,
how much longer than one interval the host waited for it since the previous beat (0 where it
came sooner: :func:`wait_beyond_interval`). That is the silence the host's flat-line check
times, a slot the agent skipped after a stall included; the fixed cost of the trip through
the socket cancels out. No beat is matched to a deadline: the agent's metronome decides what
to skip from when a beat's reply came back, which the host's stamps cannot show. Beside it,
how often the host's flat-line check fired in the phase (no beat for its timeout).

The agent runs as ``systemd/vbox-agent.service`` runs it: in a session of its own, with the
unit's CPU scheduling (read from the unit file). For comparison, in the same run: the agent
at plain SCHED_OTHER nice 0, and beside each agent a bare Python process with the agent's
scheduling sleeping to absolute deadlines of its own on the same interval, its figure worked
out the same way from its wake-up times: the floor this machine allows. The host stands for
the hypervisor, which guest load never delays: it runs above the agent (one real-time
priority higher, or nice -10 beside a non-real-time agent) where allowed; the bench holds
the machine's real-time slot (``testbed.unit_scheduling``), so other runs' real-time
processes do not take the CPU from it. Each agent is measured idle, then with one
busy-looping process per CPU, each in a session of its own like a user's job. Even idle,
the agent wakes up to 1 ms late: trio waits in ``epoll``, whose timeout Python rounds up to
whole milliseconds, while the baseline's ``time.sleep`` has nanosecond resolution.

The statistics cost is the CPU time of one interval's work (one ``/proc`` sample plus
encoding its report for each CPU), next to a bare read of ``/proc/meminfo`` measured in the
same run.

The simulated host's log (warnings: ``guest_unresponsive`` while no agent runs, say) and each
agent's output go to files in a directory of their own, named on the last line, never into
the figures.

    python bench/heartbeat.py [--seconds S] [--reports N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Final

import trio

from agent.config import LogConfig
from agent.host import SimulatedHost
from agent.host.server import serve_simulated_host
from agent.logconfig import configure_logging
from agent.protocol import ReportGuestStats, RequestType
from agent.services._procstats import ProcStats
from testbed.unit_scheduling import (
    PLAIN,
    UNIT,
    Scheduling,
    host_scheduling,
    realtime_slot,
    unit_scheduling,
)

INTERVAL_NS: Final = 100_000_000
INTERVAL_S: Final = INTERVAL_NS / 1e9
MIN_SECONDS: Final = 1.0
"""The shortest phase: 10 beats."""
SETTLE_S: Final = 2.0
"""Time the agent gets to start and configure before beats are counted."""
TARGET_P99_MS: Final = 5.0
"""The host's p99 wait for a beat beyond the interval."""
HOG_MARGIN_S: Final = 30.0
"""How long a hog outlives its phase at most, should the bench be killed before its cleanup."""
BASELINE: Final = """
import json, sys, time
interval, count, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
start = time.monotonic() + interval
wakeups = []
for i in range(count):
    time.sleep(max(0.0, start + i * interval - time.monotonic()))
    wakeups.append(time.monotonic())
open(out, "w").write(json.dumps(wakeups))
"""
HOG: Final = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


def percentile(ordered: list[float], share: float) -> float:
    """The value below which ``share`` of ``ordered`` lies."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def wait_beyond_interval(stamps: list[float], interval: float = INTERVAL_S) -> list[float]:
    """For each beat after the first, how much longer than ``interval`` the host waited for
    it since the previous beat (0 where it came sooner)."""
    return [max(0.0, beat - previous - interval) for previous, beat in itertools.pairwise(stamps)]


def summary(name: str, seconds: list[float]) -> str:
    """``name: p50 .. p99 .. max ..`` of ``seconds`` in milliseconds."""
    ordered = sorted(seconds)
    p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
    return (
        f"{name:<28} n={len(ordered):<4} p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms  "
        f"max {ordered[-1] * 1e3:6.2f} ms"
    )


async def start_as_service(
    argv: list[str], scheduling: Scheduling, log: IO[str] | None = None
) -> trio.Process:
    """Start ``argv`` in a session of its own with ``scheduling``, as systemd starts a unit;
    its output goes to ``log`` if given."""
    process = await trio.lowlevel.open_process(
        argv, start_new_session=True, stdout=log, stderr=subprocess.STDOUT if log else None
    )
    try:
        scheduling.apply(process.pid)
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process


async def phase(
    host: SimulatedHost,
    stamps: list[float],
    seconds: float,
    *,
    hog: bool,
    scheduling: Scheduling,
    out: Path,
) -> None:
    """Measure one phase and print its figures."""
    count = int(seconds / INTERVAL_S)
    monitor = host.vmmdev.heartbeat
    hog_argv = [sys.executable, "-c", HOG, str(seconds + HOG_MARGIN_S)]
    hogs = [
        await trio.lowlevel.open_process(hog_argv, start_new_session=True)
        for _ in range((os.cpu_count() or 1) if hog else 0)
    ]
    try:
        baseline = await start_as_service(
            [sys.executable, "-c", BASELINE, str(INTERVAL_S), str(count), str(out)], scheduling
        )
        flatlines_before = monitor.flatline_count
        stamps.clear()
        await trio.sleep(seconds)
        beats = list(stamps)
        flatlines = monitor.flatline_count - flatlines_before
        await baseline.wait()
        base_wakeups = json.loads(await trio.Path(out).read_text())
    finally:
        for process in hogs:
            process.kill()
            await process.wait()
    label = f"under a CPU hog ({len(hogs)} busy processes)" if hog else "idle"
    print(f"  {label}: {len(beats)} beats in {seconds:g} s (expected {count})")
    agent_waits = wait_beyond_interval(beats)
    if not agent_waits:
        print("    fewer than two beats: nothing to measure (the agent's log: see the last line)")
        return
    base_waits = wait_beyond_interval(base_wakeups)
    print(f"    wait beyond the {INTERVAL_S * 1e3:.0f} ms interval since the previous beat:")
    print("      " + summary("agent (host's stamps)", agent_waits))
    print("      " + summary("baseline (its wake-ups)", base_waits))
    base_p99 = percentile(sorted(base_waits), 0.99)
    agent_p99 = percentile(sorted(agent_waits), 0.99)
    ratio = agent_p99 / base_p99 if base_p99 > 0 else float("inf")
    print(f"    p99 ratio agent/baseline {ratio:.1f}x (trio's epoll wait: 1 ms resolution)")
    print(f"    host flat-line alarms (no beat for {monitor.timeout_ns / 1e6:.0f} ms): {flatlines}")
    verdict = "met" if agent_p99 * 1e3 < TARGET_P99_MS else "MISSED"
    print(f"    target p99 < {TARGET_P99_MS:g} ms beyond the interval: {verdict}")


async def measure_agent(
    host: SimulatedHost,
    stamps: list[float],
    seconds: float,
    scheduling: Scheduling,
    *,
    label: str,
    log: IO[str],
) -> None:
    """Run one agent with ``scheduling``, its output to ``log``; measure it idle, then under
    a hog."""
    print(f"agent ({label}): {scheduling.describe()}, a session of its own")
    with tempfile.TemporaryDirectory(prefix="vbhb-") as workdir:
        socket = f"{workdir}/host.sock"
        config = Path(workdir) / "agent.toml"
        config.write_text('[log]\nlevel = "warning"\n')
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_simulated_host, host, socket)
            argv = [sys.executable, "-m", "agent", "run", "--config", str(config)]
            agent = await start_as_service([*argv, "--device", f"unix:{socket}"], scheduling, log)
            try:
                await trio.sleep(SETTLE_S)
                out = Path(workdir) / "baseline.json"
                for hog in (False, True):
                    await phase(host, stamps, seconds, hog=hog, scheduling=scheduling, out=out)
                agent.terminate()
            finally:
                # In a session of its own, a real-time agent would outlive a failed run.
                if agent.returncode is None:
                    agent.kill()
                with trio.CancelScope(shield=True):
                    await agent.wait()
            nursery.cancel_scope.cancel()


async def heartbeat_phases(seconds: float, unit: Scheduling, logs: Path) -> None:
    """Run the host; measure the agent as the unit runs it, then at plain nice 0, each
    agent's output to a log file of its own in ``logs``."""
    host_sched = host_scheduling(unit)
    try:
        host_sched.apply(0)
        print(f"simulated host (this process): {host_sched.describe()}")
    except PermissionError:
        print(f"simulated host (this process): not allowed {host_sched.describe()}, left as is")
    host = SimulatedHost(personality="passthrough", heartbeat_interval_ns=INTERVAL_NS)
    stamps: list[float] = []
    process_request = host.vmmdev.process

    def stamped(phys: int) -> None:
        before = host.vmmdev.request_counts[RequestType.GUEST_HEARTBEAT]
        process_request(phys)
        if host.vmmdev.request_counts[RequestType.GUEST_HEARTBEAT] != before:
            stamps.append(time.monotonic())

    host.vmmdev.process = stamped  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        for scheduling, label, name in (
            (unit, f"as {UNIT.name} runs it", "agent-unit.log"),
            (PLAIN, "plain, for comparison", "agent-plain.log"),
        ):
            with (logs / name).open("w") as log:
                await measure_agent(host, stamps, seconds, scheduling, label=label, log=log)
        nursery.cancel_scope.cancel()


def report_cost(reports: int) -> None:
    """Print the CPU time of one statistics sample (its per-CPU reports encoded) next to a bare
    /proc/meminfo read."""
    stats = ProcStats(Path("/proc"), Path("/sys"))
    started = time.process_time()
    for _ in range(reports):
        for report in stats.sample(balloon_chunks=0):
            ReportGuestStats(report).encode()
    per_report = (time.process_time() - started) / reports
    started = time.process_time()
    for _ in range(reports):
        Path("/proc/meminfo").read_bytes()
    bare = (time.process_time() - started) / reports
    print(
        f"statistics: {per_report * 1e6:.0f} us CPU per sample and its per-CPU reports "
        f"({reports} samples)"
    )
    print(f"  baseline bare /proc/meminfo read: {bare * 1e6:.0f} us ({per_report / bare:.1f}x)")


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase (default 10)")
    parser.add_argument("--reports", type=int, default=500, help="samples timed (default 500)")
    args = parser.parse_args()
    if args.seconds < MIN_SECONDS:
        parser.error(f"--seconds must be {MIN_SECONDS:g} or more (10 beats), not {args.seconds:g}")
    if args.reports < 1:
        parser.error(f"--reports must be 1 or more, not {args.reports}")
    logs = Path(tempfile.mkdtemp(prefix="vbox-bench-heartbeat-"))
    unit = unit_scheduling()
    print(
        f"heartbeat: passthrough host, interval {INTERVAL_S * 1e3:.0f} ms, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"{UNIT.name} asks for {unit.describe()}"
    )
    with (logs / "host.log").open("w") as host_log:
        configure_logging(LogConfig(level="warning"), stream=host_log)
        try:
            with realtime_slot():
                trio.run(heartbeat_phases, args.seconds, unit, logs)
        except* PermissionError:
            sys.exit(
                f"bench/heartbeat.py: giving the agent {unit.describe()} needs CAP_SYS_NICE"
                " (root) and a real-time budget (not a CONFIG_RT_GROUP_SCHED cgroup without one)"
            )
        report_cost(args.reports)
    print(f"logs (the simulated host's warnings, each agent's output): {logs}")


if __name__ == "__main__":
    main()
