"""The real daemon process, idle: start-to-READY, wake-ups over a quiet period, RSS, shutdown.

Starts a simulated host process (``vbox-agent simulate``) and the agent process
(``vbox-agent run --device unix:...``) with ``NOTIFY_SOCKET`` pointing at a datagram socket
of ours, then:

- start-to-READY: from spawning the agent to its ``READY=1``;
- wake-ups: context switches of all the agent's threads (voluntary + involuntary, from
  /proc/PID/task/*/status) over ``--idle`` seconds while the host is silent;
- idle RSS: VmRSS of the agent after that period;
- shutdown: from SIGTERM to exit, and the exit code.

    python bench/daemon_idle.py [--idle 30] [--personality passthrough]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAIT_LIMIT_S = 30.0


def _context_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    msg = f"no VmRSS for pid {pid}"
    raise RuntimeError(msg)


def _wait_for_path(path: Path) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            msg = f"{path} did not appear within {WAIT_LIMIT_S} s"
            raise TimeoutError(msg)
        time.sleep(0.01)


def _wait_for_message(sock: socket.socket, wanted: bytes) -> None:
    sock.settimeout(WAIT_LIMIT_S)
    while True:
        data = sock.recv(4096)
        if wanted in data.split(b"\n"):
            return


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=30.0, help="quiet period in seconds")
    parser.add_argument("--personality", default="passthrough")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vbox-bench-", dir="/tmp"))
    host_socket = workdir / "host.sock"
    notify_path = workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    python = sys.executable
    host = subprocess.Popen(
        [
            python,
            "-m",
            "agent",
            "simulate",
            "--socket",
            str(host_socket),
            "--personality",
            args.personality,
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_for_path(host_socket)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        started = time.perf_counter()
        agent = subprocess.Popen(
            [python, "-m", "agent", "run", "--device", f"unix:{host_socket}"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        _wait_for_message(notify, b"READY=1")
        ready_s = time.perf_counter() - started
        time.sleep(1.0)  # let start-up work settle before counting
        before = _context_switches(agent.pid)
        time.sleep(args.idle)
        wakeups = _context_switches(agent.pid) - before
        rss = _rss_kib(agent.pid)
        stop_started = time.perf_counter()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=WAIT_LIMIT_S)
        stop_s = time.perf_counter() - stop_started
    finally:
        host.send_signal(signal.SIGTERM)
        host.wait(timeout=WAIT_LIMIT_S)
        notify.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"daemon idle benchmark ({args.personality} host over unix socket):")
    print(f"  start-to-READY     {ready_s * 1000:.0f} ms")
    print(f"  wake-ups in {args.idle:g} s  {wakeups}  (target 0 with no heartbeat)")
    print(f"  idle RSS           {rss / 1024:.1f} MiB")
    print(f"  SIGTERM to exit    {stop_s * 1000:.0f} ms, exit code {code}")


if __name__ == "__main__":
    main()
