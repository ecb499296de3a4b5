"""Chunks an owned balloon kept when a reload disabled it go back to the host.

Rules of this test module:
- A real ``SimulatedHost`` (passthrough: the agent owns the balloon's chunks) behind
  ``SimOpener``, and the whole daemon; the host holds ``CHANGE_MEMBALLOON`` (``set_delay``,
  as ``host delay`` does) while the reload's drain runs, so the drain time runs out with
  chunks kept, and lets it go (``set_delay(..., 0)`` ends the held requests at once).
- Pure trio: ``autojump_clock``; bounded by ``fail_after``; waits poll the host or the
  daemon on that clock (``balloon_support.until``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, NoReturn

import pytest
import structlog.testing
import trio

from agent.config import load_config
from agent.daemon import Daemon
from agent.daemon.notify import Notifier
from agent.host import SimOpener, SimulatedHost
from agent.protocol import LocalProtocolError, RequestType
from agent.protocol.status import VERR_NO_MEMORY, VERR_NOT_SUPPORTED
from agent.records import record
from agent.services import ServiceContext, ServiceSection, ServiceSpec
from agent.services.balloon import _service
from agent.services.registry import SERVICES, section_models
from tests.services.balloon_support import host_chunks, until

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

LIMIT_S: Final = 120.0
SHUTDOWN_TIMEOUT_S: Final = 1.0
HELD_S: Final = 60.0
"""How long the host holds each CHANGE_MEMBALLOON: longer than any drain here."""
CHUNKS: Final = 8
PSI_TEXT: Final = (
    "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)


class StatusNotifier(Notifier):
    """sd_notify that keeps every ``STATUS=`` text."""

    def __init__(self) -> None:
        super().__init__(None)
        self.texts: list[str] = []

    async def status(self, text: str) -> None:
        self.texts.append(text)


BREAK_AFTER_S: Final = 30.0
"""When the breaker ends the agent: well after the reload's drain, within the host's hold."""


@record
class BreakerStatistics:
    broken: bool


class Breaker:
    """Breaks the protocol ``BREAK_AFTER_S`` after its start: an error that ends the agent."""

    name: Final = "breaker"

    def __init__(self, context: ServiceContext, section: ServiceSection) -> None:
        del context, section

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        task_status.started()
        await trio.sleep(BREAK_AFTER_S)
        msg = "the breaker broke the protocol"
        raise LocalProtocolError(msg)

    async def drain(self) -> None:
        await trio.lowlevel.checkpoint()

    def reconfigure(self, section: ServiceSection) -> bool:
        del section
        return True

    def status(self) -> str:
        return "breaker"

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(broken=False)


BREAKING: Final = (*SERVICES, ServiceSpec("breaker", ServiceSection, Breaker))


def _write_config(path: Path, *, enable: bool, daemon_lines: str = "") -> None:
    psi = path.parent / "memory.pressure"
    psi.write_text(PSI_TEXT)
    path.write_text(
        f"[daemon]\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n{daemon_lines}"
        f'[balloon]\nenable = {str(enable).lower()}\npsi_path = "{psi}"\nmin_available_mb = 0\n'
    )


def _agent(
    tmp_path: Path,
    *,
    notifier: Notifier | None = None,
    registry: Sequence[ServiceSpec[Any]] = SERVICES,
    daemon_lines: str = "",
) -> tuple[Path, SimulatedHost, Daemon]:
    """The config file (balloon enabled, ``daemon_lines`` added to its daemon section), a
    passthrough host and a daemon on it."""
    path = tmp_path / "agent.toml"
    _write_config(path, enable=True, daemon_lines=daemon_lines)
    host = SimulatedHost(personality="passthrough")
    daemon = Daemon(
        load_config(path, section_models(registry)),
        SimOpener(host),
        config_path=path,
        notifier=notifier or Notifier(None),
        registry=registry,
    )
    return path, host, daemon


async def _disable_while_held(daemon: Daemon, host: SimulatedHost, path: Path) -> None:
    """Inflate to ``CHUNKS``, then a reload disables the balloon while the host holds every
    deflate: the drain time runs out with every chunk kept."""
    host.set_balloon_target(CHUNKS)
    await until(lambda: host_chunks(host) == CHUNKS)
    host.set_delay(RequestType.CHANGE_MEMBALLOON, HELD_S)
    _write_config(path, enable=False)
    await daemon.reload()
    await until(lambda: "balloon" not in daemon.statistics().services)
    assert host_chunks(host) == CHUNKS


async def test_the_stop_gives_back_what_a_disabled_balloon_kept(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """The host lets the deflates go only once the stop began: the stop gives every kept
    chunk back within the drain time (one line says how many), and the agent exits in time.
    ``STATUS=`` shows the kept chunks while the balloon is off."""
    notifier = StatusNotifier()
    path, host, daemon = _agent(tmp_path, notifier=notifier)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await _disable_while_held(daemon, host, path)
                await until(lambda: "balloon stopping" not in daemon.statistics().status)
                status_while_kept = notifier.texts[-1]
                began = trio.current_time()
                daemon.request_shutdown("SIGTERM")
                await until(lambda: "services_draining" in [e["event"] for e in logs])
                host.set_delay(RequestType.CHANGE_MEMBALLOON, 0)  # the stop's drain began
            took = trio.current_time() - began
            assert host_chunks(host) == 0
            outer.cancel_scope.cancel()
    assert took <= SHUTDOWN_TIMEOUT_S + 1.0
    assert status_while_kept.endswith(f"; balloon off, {CHUNKS} MB kept")
    [returned] = [entry for entry in logs if entry["event"] == "balloon_kept_returned"]
    assert (returned["returned"], returned["mode"]) == (CHUNKS, "owned")
    [incomplete] = [entry for entry in logs if entry["event"] == "balloon_drain_incomplete"]
    assert incomplete["kept"] == CHUNKS  # the reload's drain; none at the stop
    assert incomplete["log_level"] == "warning"  # given back while the agent runs on


async def test_chunks_a_disabled_balloon_kept_go_back_while_the_agent_runs_on(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """The host answers again while the agent runs on: the kept chunks go back without a
    stop, one line says so, and ``STATUS=`` no longer names the balloon; the stop then has
    nothing left to give back."""
    notifier = StatusNotifier()
    path, host, daemon = _agent(tmp_path, notifier=notifier)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await _disable_while_held(daemon, host, path)
                host.set_delay(RequestType.CHANGE_MEMBALLOON, 0)
                await until(lambda: host_chunks(host) == 0)
                await until(lambda: "balloon" not in daemon.statistics().status)
                returned = [e for e in logs if e["event"] == "balloon_kept_returned"]
                assert [e["returned"] for e in returned] == [CHUNKS]
                daemon.request_shutdown("SIGTERM")
            outer.cancel_scope.cancel()
    assert [e["event"] for e in logs].count("balloon_kept_returned") == 1


async def test_chunks_the_host_still_holds_at_the_stop_are_critical(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """The host holds the deflates past the stop's drain time: the agent exits in time
    all the same, and one critical line names the chunks it could not give back."""
    path, host, daemon = _agent(tmp_path)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await _disable_while_held(daemon, host, path)
                began = trio.current_time()
                daemon.request_shutdown("SIGTERM")
            took = trio.current_time() - began
            outer.cancel_scope.cancel()
    assert took <= SHUTDOWN_TIMEOUT_S + 1.0
    reload_drain, stop = [e for e in logs if e["event"] == "balloon_drain_incomplete"]
    assert (reload_drain["kept"], reload_drain["log_level"]) == (CHUNKS, "warning")
    assert (stop["kept"], stop["log_level"]) == (CHUNKS, "critical")
    assert stop["reason"] == "the drain time ran out"
    # The same line as the service's own drain cut short at the stop.
    assert stop["note"].startswith(f"the host still holds {CHUNKS} chunks ballooned: once")
    assert "balloon_kept_returned" not in [e["event"] for e in logs]


async def test_a_fatal_error_gives_back_what_a_disabled_balloon_kept(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """An exit on a fatal error gives the kept chunks back as a stop does, before the error
    ends the agent: the host lets the deflates go once the services drain for the exit."""
    path, host, daemon = _agent(tmp_path, registry=BREAKING)

    async def release_on_exit() -> None:
        await until(lambda: "services_draining_before_exit" in [e["event"] for e in logs])
        host.set_delay(RequestType.CHANGE_MEMBALLOON, 0)

    with (
        trio.fail_after(LIMIT_S),
        structlog.testing.capture_logs() as logs,
        pytest.RaisesGroup(LocalProtocolError, flatten_subgroups=True),
    ):
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.run)
                    await _disable_while_held(daemon, host, path)
                    nursery.start_soon(release_on_exit)
            finally:
                outer.cancel_scope.cancel()
    assert host_chunks(host) == 0
    [returned] = [entry for entry in logs if entry["event"] == "balloon_kept_returned"]
    assert returned["returned"] == CHUNKS


def _names(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [entry["event"] for entry in logs]


def _fail_the_run_on(monkeypatch: pytest.MonkeyPatch) -> trio.Event:
    """An event that, once set, makes the balloon's run fail (an injected bug)."""
    fail = trio.Event()
    follow = _service.BalloonService._follow

    async def failing_follow(self: _service.BalloonService) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, self)
            await fail.wait()
            msg = "injected bug"
            raise RuntimeError(msg)

    monkeypatch.setattr(_service.BalloonService, "_follow", failing_follow)
    return fail


def _balloon_fragments(texts: Sequence[str]) -> list[str]:
    """The balloon's fragments of the ``STATUS=`` texts, in order, each once in a row."""
    fragments: list[str] = []
    for text in texts:
        for fragment in text.split("; "):
            if fragment.startswith("balloon") and fragments[-1:] != [fragment]:
                fragments.append(fragment)
    return fragments


async def test_a_re_enable_takes_the_chunks_over_once_their_give_back_ended(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """A reload enables the balloon again while the background give-back's deflate is in
    flight: the new start takes the chunks over only once that deflate's fate is settled,
    so no chunk is deflated twice and the host's count matches its ballooned pages."""
    path, host, daemon = _agent(tmp_path)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await _disable_while_held(daemon, host, path)  # a give-back's deflate held
                host.set_balloon_target(0)
                _write_config(path, enable=True)
                await daemon.reload()
                await until(lambda: "balloon_chunks_taken_over" in _names(logs))
                host.set_delay(RequestType.CHANGE_MEMBALLOON, 0)
                await until(lambda: host_chunks(host) == 0)  # its pages too
                daemon.request_shutdown("SIGTERM")
            outer.cancel_scope.cancel()
    assert host_chunks(host) == 0
    assert "balloon_drain_incomplete" not in _names(logs)[-10:]  # the stop had nothing left


async def test_a_stop_while_a_failed_balloon_restarts_drains_each_chunk_once(
    autojump_clock: trio.abc.Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The balloon's run fails and its drain keeps the chunks; the stop comes while the
    restarted run's probe is refused: the leftovers alone give the chunks back (the
    restarted run owns none), so every chunk is deflated once and nothing fails."""
    fail = _fail_the_run_on(monkeypatch)
    _, host, daemon = _agent(tmp_path)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                host.set_balloon_target(CHUNKS)
                await until(lambda: host_chunks(host) == CHUNKS)
                host.set_delay(RequestType.CHANGE_MEMBALLOON, HELD_S)
                host.add_fault(RequestType.GET_MEMBALLOON_CHANGE_REQ, VERR_NOT_SUPPORTED, 1000)
                fail.set()  # the run fails; its drain runs out of time
                await until(lambda: daemon.statistics().restarts.get("balloon", 0) >= 1)
                await until(lambda: "balloon_check_failed" in _names(logs))  # the probe refused
                daemon.request_shutdown("SIGTERM")
                await until(lambda: "services_draining" in _names(logs))
                host.set_delay(RequestType.CHANGE_MEMBALLOON, 0)
            outer.cancel_scope.cancel()
    assert host_chunks(host) == 0
    assert "service_drain_failed" not in _names(logs)
    assert "leftovers_give_back_failed" not in _names(logs)
    [incomplete] = [e for e in logs if e["event"] == "balloon_drain_incomplete"]
    assert incomplete["log_level"] == "warning"  # the failed run's; none at the stop


async def test_the_status_shows_what_a_failed_run_kept_while_it_backs_off(
    autojump_clock: trio.abc.Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The balloon's run fails and its drain keeps the chunks: while the service backs off
    before its restart and they go back in the background, ``STATUS=`` shows them after the
    retry (it said ``balloon failed, retrying (1x)`` alone), and no more once all are back."""
    fail = _fail_the_run_on(monkeypatch)
    notifier = StatusNotifier()
    _, host, daemon = _agent(
        tmp_path, notifier=notifier, daemon_lines="restart_backoff_initial_s = 30\n"
    )
    retrying = "balloon failed, retrying (1x)"
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                host.set_balloon_target(CHUNKS)
                await until(lambda: host_chunks(host) == CHUNKS)
                host.set_delay(RequestType.CHANGE_MEMBALLOON, HELD_S)
                fail.set()  # the run fails; its drain runs out of time
                await until(lambda: f"{retrying}, {CHUNKS} MB kept" in notifier.texts[-1])
                host.set_delay(RequestType.CHANGE_MEMBALLOON, 0)  # the give-back goes through
                await until(lambda: host_chunks(host) == 0)
                await until(lambda: _balloon_fragments(notifier.texts)[-1] == retrying)
                daemon.request_shutdown("SIGTERM")
            outer.cancel_scope.cancel()
    fragments = _balloon_fragments(notifier.texts)
    assert fragments[fragments.index(retrying) :] == [
        retrying,  # while the drain runs
        f"{retrying}, {CHUNKS} MB kept",
        retrying,
    ]


async def test_a_stop_during_a_reload_s_drain_gives_its_kept_chunks_back(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """The stop comes while a reload's drain (with its own, earlier deadline) still runs:
    the chunks it keeps go to the stop's give-back, which hands them to the host once it
    answers again, before the stop's deadline."""
    path, host, daemon = _agent(tmp_path)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                host.set_balloon_target(CHUNKS)
                await until(lambda: host_chunks(host) == CHUNKS)
                host.set_delay(RequestType.CHANGE_MEMBALLOON, HELD_S)
                _write_config(path, enable=False)
                await daemon.reload()
                await trio.sleep(SHUTDOWN_TIMEOUT_S / 2)  # within the reload's drain
                daemon.request_shutdown("SIGTERM")
                began = trio.current_time()
                await until(lambda: "balloon_drain_incomplete" in _names(logs))
                host.set_delay(RequestType.CHANGE_MEMBALLOON, 0)  # the host answers again
            took = trio.current_time() - began
            outer.cancel_scope.cancel()
    assert host_chunks(host) == 0
    assert took <= SHUTDOWN_TIMEOUT_S + 1.0
    [incomplete] = [e for e in logs if e["event"] == "balloon_drain_incomplete"]
    assert incomplete["log_level"] == "warning"
    [returned] = [e for e in logs if e["event"] == "balloon_kept_returned"]
    assert returned["returned"] == CHUNKS


async def test_a_refusal_after_the_stop_came_is_retried_until_its_deadline(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """The stop comes while the background give-back of kept chunks runs, then the host
    refuses one deflate: in owned mode the give-back passes over it and gives every chunk
    back before the stop's deadline (it gave up at the refusal, leaving the chunks
    ballooned once the process exited, as only Oracle's driver, which deflates at close,
    may)."""
    path, host, daemon = _agent(tmp_path)
    with trio.fail_after(LIMIT_S), structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as outer:
            await outer.start(host.run)
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await _disable_while_held(daemon, host, path)
                host.set_delay(RequestType.CHANGE_MEMBALLOON, SHUTDOWN_TIMEOUT_S / (4 * CHUNKS))
                await until(lambda: host_chunks(host) < CHUNKS)  # the give-back is under way
                began = trio.current_time()
                daemon.request_shutdown("SIGTERM")
                host.add_fault(RequestType.CHANGE_MEMBALLOON, VERR_NO_MEMORY, 1)
            took = trio.current_time() - began
            assert host_chunks(host) == 0
            outer.cancel_scope.cancel()
    assert took <= SHUTDOWN_TIMEOUT_S + 1.0
    assert [
        entry["log_level"] for entry in logs if entry["event"] == "balloon_drain_incomplete"
    ] == ["warning"]  # the reload's drain, whose chunks were then given back
