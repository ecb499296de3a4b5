"""The real daemon process, idle: start-to-READY, wake-ups, RSS against a baseline, shutdown.

Starts a simulated host process (``vbox-agent simulate``) and the agent process
(``vbox-agent run --device unix:...``) with ``NOTIFY_SOCKET`` pointing at a datagram socket
of ours, then:

- start-to-READY: from spawning the agent to its ``READY=1``;
- wake-ups: context switches of all the agent's threads (voluntary + involuntary, from
  /proc/PID/task/*/status) over ``--idle`` seconds while the host is silent;
- idle RSS: VmRSS of the agent after that period (and how much of the difference is pages
  of files, RssFile: shared libraries' code, which is shared and can be dropped), next to,
  measured in the same run:
  - the baseline: a bare Python process that imports trio, structlog and pydantic (with
    ``pydantic.BaseModel`` loaded: ``import pydantic`` alone defers loading the library);
  - where the difference goes, each step a process of its own that does the previous
    step's work and more: one pydantic model defined as the agent defines its first one,
    its plugins off (``agent.pydantic_plugins.disable()``: the first model loads pydantic's
    schema machinery, and not the ``importlib.metadata`` of pydantic's plugin lookup, which
    a bare process would load, shown alone on top of the baseline as what the agent
    spares), then ``agent.protocol`` imported, then every module of
    the run path (the command line, the daemon, the services, the ``unix:`` transport; of
    which the standard library modules the command line and the config file need,
    ``argparse`` and ``tomllib``, shown alone on top of the first model); the agent's RSS
    minus the last is what running costs (``bench/idle_modules.py`` lists the modules), of
    which libsystemd, shown alone on top of the modules: the users service reads logind's
    sessions through its ``sd-login`` at every pass, and loading it maps the libraries it
    links (libgcrypt, libgpg-error, zstd, lz4, libcap);
  - an empty interpreter, for scale;
- shutdown: from SIGTERM to exit, and the exit code.

The agent and the processes it is compared with run from a copy of the ``agent`` package
compiled to ``.pyc`` first, as an installed package is: without that (``PYTHONDONTWRITEBYTECODE``
or a read-only tree) every start compiles the sources and the compiler's memory would count.
Every child's output goes to a log file in the work directory (never into the figures); the
agent's is shown only if it fails.

    python bench/daemon_idle.py [--idle 30] [--personality passthrough]
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import agent
from agent.services._publishing import DEFAULT_INTERVAL_S
from agent.services.timesync import TimesyncSection

WAIT_LIMIT_S = 30.0
SETTLE_S = 1.0
TARGET_MIB = 5.0
"""Idle RSS the agent may use above the baseline."""
HOST_HEARTBEAT_MS = 2000
"""The simulated host's heartbeat interval (its default, said explicitly)."""
PUBLISHING_INTERVAL_S = DEFAULT_INTERVAL_S
TIMESYNC_INTERVAL_S = TimesyncSection().interval_s
BASELINE = "import trio, structlog, pydantic; pydantic.BaseModel"
PLUGIN_LOOKUP = BASELINE + "\nimport importlib.metadata"
PLUGINS_OFF = "from agent import pydantic_plugins; pydantic_plugins.disable()"
"""What ``vbox-agent`` does before its first model (``main``)."""
ONE_MODEL = BASELINE + "\n" + PLUGINS_OFF + "\nclass Probe(pydantic.BaseModel):\n    x: int = 0"
PROTOCOL = ONE_MODEL + "\nimport agent.protocol"
CLI_STDLIB = ONE_MODEL + "\nimport argparse, tomllib"
AGENT_MODULES = "import agent.cli, agent.cli._run, agent.device.unix"
"""What ``vbox-agent run --device unix:...`` imports before it runs (``_run`` brings the
daemon, the services and the config; the device spec imports the chosen transport)."""
RUN_PATH = PLUGINS_OFF + "\n" + AGENT_MODULES
LOGIND = RUN_PATH + "\nfrom agent.services._logins import logind_users\nlogind_users()"
"""The modules, and one read of logind's sessions as the users service makes at every pass."""
EMPTY = "pass"


def _context_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


@dataclass(frozen=True)
class Resident:
    """A process's resident set (KiB): all of it, and the pages that map files."""

    total_kib: int
    file_kib: int


def _resident(pid: int) -> Resident:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value
    try:
        return Resident(int(fields["VmRSS"].split()[0]), int(fields["RssFile"].split()[0]))
    except KeyError as missing:
        msg = f"no {missing} in /proc/{pid}/status"
        raise RuntimeError(msg) from None


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


def _compiled_copy(workdir: Path) -> Path:
    """Copy the ``agent`` package under ``workdir`` and compile it; return the copy's root."""
    root = workdir / "compiled"
    shutil.copytree(Path(agent.__file__).parent, root / "agent")
    if not compileall.compile_dir(root / "agent", quiet=1):
        msg = "compiling the agent package failed"
        raise RuntimeError(msg)
    return root


def _idle_resident_of(code: str, root: Path) -> Resident:
    """The resident set of a Python process (run in ``root``) that ran ``code`` and waits on stdin.

    Pydantic's plugins are off in it (``PYDANTIC_DISABLE_PLUGINS``), as ``vbox-agent``
    turns them off for itself; the code that builds a model also spares the plugin lookup
    as the agent does (``agent.pydantic_plugins.disable()``), so its first model costs what
    the agent's does.
    """
    script = f"import sys\n{code}\nprint('ready', flush=True)\nsys.stdin.read()\n"
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env=dict(os.environ, PYDANTIC_DISABLE_PLUGINS="__all__"),  # as the agent's main sets
    )
    assert child.stdout is not None
    assert child.stdin is not None
    try:
        if child.stdout.readline().strip() != "ready":
            msg = f"baseline process failed: {code}"
            raise RuntimeError(msg)
        time.sleep(SETTLE_S)
        return _resident(child.pid)
    finally:
        child.stdin.close()
        child.wait(timeout=WAIT_LIMIT_S)


def _mib(resident: Resident) -> str:
    return f"{resident.total_kib / 1024:6.1f} MiB"


def _step(after: Resident, before: Resident) -> str:
    return f"{(after.total_kib - before.total_kib) / 1024:+5.1f} MiB"


def _file_step(after: Resident, before: Resident) -> str:
    return f"{(after.file_kib - before.file_kib) / 1024:+5.1f} MiB"


@dataclass(frozen=True)
class AgentFigures:
    ready_s: float
    wakeups: int
    resident: Resident
    stop_s: float
    exit_code: int


def _measure_agent(workdir: Path, root: Path, idle_s: float, personality: str) -> AgentFigures:
    """Run host and agent (from ``root``), let the agent idle, stop it; logs go to workdir."""
    host_socket = workdir / "host.sock"
    notify_path = workdir / "notify.sock"
    python = sys.executable
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        (workdir / "host.log").open("wb") as host_log,
        (workdir / "agent.log").open("wb") as agent_log,
    ):
        notify.bind(str(notify_path))
        host = subprocess.Popen(
            [
                python,
                "-m",
                "agent",
                "simulate",
                "--socket",
                str(host_socket),
                "--personality",
                personality,
                "--heartbeat-interval-ms",
                str(HOST_HEARTBEAT_MS),
            ],
            stdout=host_log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_path(host_socket)
            started = time.perf_counter()
            agent = subprocess.Popen(
                [python, "-m", "agent", "run", "--device", f"unix:{host_socket}"],
                env=dict(os.environ, NOTIFY_SOCKET=str(notify_path)),
                cwd=root,
                stdout=agent_log,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_for_message(notify, b"READY=1")
            except TimeoutError:
                agent.kill()
                agent.wait(timeout=WAIT_LIMIT_S)
                sys.stderr.write((workdir / "agent.log").read_text()[-3000:])
                raise
            ready_s = time.perf_counter() - started
            time.sleep(SETTLE_S)  # let start-up work settle before counting
            before = _context_switches(agent.pid)
            time.sleep(idle_s)
            wakeups = _context_switches(agent.pid) - before
            resident = _resident(agent.pid)
            stop_started = time.perf_counter()
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=WAIT_LIMIT_S)
            stop_s = time.perf_counter() - stop_started
        finally:
            host.send_signal(signal.SIGTERM)
            host.wait(timeout=WAIT_LIMIT_S)
    return AgentFigures(ready_s, wakeups, resident, stop_s, code)


def _expected_wakeups(args: argparse.Namespace) -> str:
    """What should wake the idle agent: the network and users services' passes (one timer
    for both, then a reply to each one's beacon, ``Net/Count`` and ``LoggedInUsers``,
    written every pass), the timesync service's readings of the host's clock (a timer and a
    reply; a reading due with a pass shares its timer, so the figure is a little over) and,
    where the driver leaves it to us, the heartbeat."""
    passes = int(args.idle // PUBLISHING_INTERVAL_S)
    readings = int(args.idle // TIMESYNC_INTERVAL_S)
    what = (
        f"{passes} network and {passes} users passes every {PUBLISHING_INTERVAL_S:g} s,"
        f" {readings} host clock readings every {TIMESYNC_INTERVAL_S:g} s"
    )
    expected = 3 * passes + 2 * readings
    if args.personality != "passthrough":
        return f"expected about {expected}: {what}"
    beats = int(args.idle * 1000 // HOST_HEARTBEAT_MS)
    return (
        f"expected about {2 * beats + expected}: {beats} heartbeats at the host's"
        f" {HOST_HEARTBEAT_MS} ms (a send and its reply each), {what}"
    )


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=30.0, help="quiet period in seconds")
    parser.add_argument("--personality", default="passthrough")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vbox-bench-", dir="/tmp"))
    try:
        root = _compiled_copy(workdir)
        figures = _measure_agent(workdir, root, args.idle, args.personality)
        baseline = _idle_resident_of(BASELINE, root)
        plugin_lookup = _idle_resident_of(PLUGIN_LOOKUP, root)
        one_model = _idle_resident_of(ONE_MODEL, root)
        protocol = _idle_resident_of(PROTOCOL, root)
        modules = _idle_resident_of(RUN_PATH, root)
        logind = _idle_resident_of(LOGIND, root)
        cli_stdlib = _idle_resident_of(CLI_STDLIB, root)
        empty = _idle_resident_of(EMPTY, root)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    agent_rss = figures.resident
    over = (agent_rss.total_kib - baseline.total_kib) / 1024
    verdict = "met" if over <= TARGET_MIB else "MISSED"
    print(f"daemon idle benchmark ({args.personality} host over unix socket):")
    print(f"  start-to-READY     {figures.ready_s * 1000:.0f} ms")
    print(f"  wake-ups in {args.idle:g} s  {figures.wakeups}  ({_expected_wakeups(args)})")
    print(f"  idle RSS, agent    {_mib(agent_rss)}")
    print(f"  baseline           {_mib(baseline)}  (python: {BASELINE})")
    print(f"  agent - baseline   {over:6.1f} MiB  (target <= {TARGET_MIB:g} MiB: {verdict})")
    print(
        f"    of which files' pages     {_file_step(agent_rss, baseline)}  (RssFile: the code"
        " of shared libraries, pydantic-core's and libsystemd's above all; clean, shared with"
        " other processes, dropped under memory pressure)"
    )
    print("  where the difference goes:")
    print(f"    pydantic's first model    {_step(one_model, baseline)}  (its schema machinery)")
    print(
        f"      spared: plugin lookup   {_step(plugin_lookup, baseline)}  (importlib.metadata,"
        " which pydantic's plugin loader would import: agent.pydantic_plugins)"
    )
    print(f"    the agent's own           {_step(agent_rss, one_model)}  (code and state)")
    print(f"      agent.protocol          {_step(protocol, one_model)}")
    print(f"      the rest of the modules {_step(modules, protocol)}  ({AGENT_MODULES})")
    print(f"        of which the stdlib's {_step(cli_stdlib, one_model)}  (argparse, tomllib)")
    print(f"      running                 {_step(agent_rss, modules)}")
    print(f"        of which libsystemd   {_step(logind, modules)}  (the users service's sd-login)")
    print(f"  empty interpreter  {_mib(empty)}")
    print(f"  SIGTERM to exit    {figures.stop_s * 1000:.0f} ms, exit code {figures.exit_code}")


if __name__ == "__main__":
    main()
