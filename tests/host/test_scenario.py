"""Tests of scenario files and the scenario player.

Rules of this test module:

- ``config/demo.toml`` is the scenario under test; broken scenarios are inline TOML.
- The player runs against a real host under ``autojump_clock``; each step is checked at
  its exact virtual time.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Final

import pytest
import structlog
import structlog.testing
import trio

from agent.host import SimulatedHost
from agent.host.guest_props import SERVICE_NAME, GuestPropertyService
from agent.host.scenario import (
    ACTIONS,
    MAX_HEARTBEAT_INTERVAL_MS,
    MIN_HEARTBEAT_INTERVAL_MS,
    HostSettings,
    ScenarioError,
    Step,
    load_scenario,
    parse_scenario,
    play_scenario,
)
from agent.protocol.constants import Event, RequestType
from agent.protocol.status import VINF_SUCCESS
from agent.services import guest_stats
from tests.host.guest_props_support import guest_set

DEMO: Final = Path(__file__).resolve().parents[2] / "config" / "demo.toml"
GREETING: Final = "/VirtualBox/GuestAdd/Demo/Greeting"


class TestParse:
    """Validation of scenario files."""

    def test_demo_is_valid(self) -> None:
        """The shipped demo parses into timed steps with a default-ish host."""
        scenario = load_scenario(DEMO)
        assert HostSettings() == scenario.host
        assert [step.action for step in scenario.steps] == [
            "prop_set",
            "balloon",
            "balloon",
            "event",
            "restore",
            "prop_delete",
        ]
        assert (
            Step(20.0, "event", {"events": Event.STATISTICS_INTERVAL_CHANGE_REQUEST})
            == scenario.steps[3]
        )

    def test_the_demos_event_shows_in_the_agents_log(self) -> None:
        """The demo's event step raises an event a service of the agent waits for (the
        statistics service, which logs ``statistics_interval_read``), not one outside the
        agent's filter that nothing follows (it raised VRDP)."""
        [event] = [step for step in load_scenario(DEMO).steps if step.action == "event"]
        assert int(event.args["events"]) & ~guest_stats.EVENTS == 0

    def test_the_user_docs_name_every_key_and_action(self) -> None:
        """``docs/scenarios.md`` describes every ``[host]`` key, every action and its keys."""
        doc = (Path(__file__).resolve().parents[2] / "docs" / "scenarios.md").read_text()
        keys = [setting.name for setting in fields(HostSettings)]
        keys += [*ACTIONS, *(key for checks, _ in ACTIONS.values() for key in checks)]
        assert [key for key in keys if f"`{key}`" not in doc] == []

    def test_names_and_numbers(self) -> None:
        """Requests, statuses and events accept names or numbers; optional keys default."""
        scenario = parse_scenario(
            """
            [[steps]]
            at = 0
            action = "fault"
            request = "CHANGE_MEMBALLOON"
            status = "VERR_NO_MEMORY"
            [[steps]]
            at = 1
            action = "fault"
            request = 217
            status = -2
            count = 3
            [[steps]]
            at = 1
            action = "event"
            events = 16
            """
        )
        assert dict(scenario.steps[0].args) == {
            "request": RequestType.CHANGE_MEMBALLOON,
            "status": -8,
            "count": 1,
        }
        assert dict(scenario.steps[1].args) == {"request": 217, "status": -2, "count": 3}
        assert dict(scenario.steps[2].args) == {"events": 16}

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("steps = [", r"line 1, column 10 \(the end of the file\): invalid TOML: "),
            ("[host]\nram_mb = \n", "line 2, column 10: invalid TOML: Invalid value"),
            ("colour = 1", "unknown top-level key 'colour'"),
            ("[host]\nram = 1", "host: unknown key 'ram'"),
            ('[host]\npersonality = "windows"', "'windows' is not one of"),
            ('[host]\nram_mb = "big"', "host: key 'ram_mb': expected an integer, got string 'big'"),
            ("[host]\nram_mb = 1", r"host: key 'ram_mb': 1 is not an integer in \[4, 2097152\]"),
            ("[[steps]]\nat = 1", r"^demo: step 1: missing key 'action'$"),
            ('[[steps]]\naction = "restore"', r"^demo: step 1: missing key 'at'$"),
            (
                '[[steps]]\nat = true\naction = "restore"',
                r"^demo: step 1: key 'at': expected a non-negative number, got boolean true$",
            ),
            (
                '[[steps]]\nat = 00:00:05\naction = "restore"',
                r"^demo: step 1: key 'at': expected a non-negative number, got time 00:00:05$",
            ),
            (
                '[[steps]]\nat = 1979-05-27T07:32:00Z\naction = "restore"',
                r"got date-time 1979-05-27T07:32:00\+00:00$",
            ),
            ('[[steps]]\nat = "1"\naction = "restore"', r"got string '1'$"),
            ('[[steps]]\nat = [1]\naction = "restore"', r"got an array$"),
            (
                "[[steps]]\nat = 1\naction = 5",
                r"^demo: step 1: key 'action': expected one of balloon, .*, delay, got integer 5$",
            ),
            (
                '[[steps]]\nat = 1\naction = "poweroff"',
                r"^demo: step 1: key 'action': 'poweroff' is not one of balloon, ",
            ),
            (
                "[host]\nheartbeat_interval_ms = 10",
                r"^demo: host: key 'heartbeat_interval_ms': 10 ms is below the host's shortest "
                r"interval, 50 ms$",
            ),
            (
                "[host]\nheartbeat_interval_ms = -5",
                r"^demo: host: key 'heartbeat_interval_ms': -5 ms is below",
            ),
            (
                "[host]\nheartbeat_interval_ms = 99999999999999",
                r"^demo: host: key 'heartbeat_interval_ms': 99999999999999 ms is above "
                r"9223372036854 ms, the longest interval whose heartbeat timeout \(twice the "
                r"interval\) fits",
            ),
            ('[[steps]]\nat = -1\naction = "restore"', "step 1: key 'at'"),
            ('[[steps]]\nat = inf\naction = "restore"', "step 1: key 'at'"),
            (
                '[[steps]]\nat = 1\naction = "delay"\nrequest = 219\nseconds = nan',
                r"step 1 \(delay\): key 'seconds': expected a non-negative number",
            ),
            ('[[steps]]\nat = 1\naction = "balloon"', r"step 1 \(balloon\): missing key 'mb'"),
            (
                '[[steps]]\nat = 1\naction = "balloon"\nmb = "abc"',
                r"step 1 \(balloon\): key 'mb': expected an integer, got string 'abc'",
            ),
            (
                '[[steps]]\nat = 1\naction = "balloon"\nmb = 1900',
                r"'mb': 1900 is not in \[0, 1843\)",
            ),
            ('[[steps]]\nat = 1\naction = "restore"\nmb = 1', "unknown key 'mb'"),
            ('[[steps]]\nat = 1\naction = "event"\nevents = "NOPE"', "unknown event 'NOPE'"),
            (
                '[[steps]]\nat = 1\naction = "fault"\nrequest = "X"\nstatus = 0',
                r"^demo: step 1 \(fault\): key 'request': unknown VMMDev request type 'X': "
                r"expected a name such as CHANGE_MEMBALLOON$",
            ),
            (
                '[[steps]]\nat = 1\naction = "prop_set"\nname = "/a*"\nvalue = "v"',
                r"^demo: step 1 \(prop_set\): key 'name': property name '/a\*' contains",
            ),
            (
                '[[steps]]\nat = 1\naction = "prop_delete"\nname = ""',
                r"step 1 \(prop_delete\): key 'name': property name is empty$",
            ),
            (
                '[[steps]]\nat = 1\naction = "prop_set"\nname = "/a"\nvalue = "v"\nflags = "X"',
                r"step 1 \(prop_set\): key 'flags': invalid flags 'X'",
            ),
            (
                f'[[steps]]\nat = 1\naction = "prop_set"\nname = "/a"\nvalue = "{"v" * 1024}"',
                r"step 1 \(prop_set\): key 'value': property value is 1024 bytes long",
            ),
            (
                '[[steps]]\nat = 1\naction = "fault"\nrequest = 4\nstatus = 0\ncount = 0',
                "expected a positive integer",
            ),
            (
                '[[steps]]\nat = 1\naction = "fault"\nrequest = 4\nstatus = 0\ncount = 4294967296',
                "expected a positive integer up to 4294967295",
            ),
            (
                '[host]\npersonality = "mainline"\nr3_balloon = true',
                "'r3_balloon': only the oracle personality has it",
            ),
            (
                '[[steps]]\nat = 2\naction = "restore"\n[[steps]]\nat = 1\naction = "restore"',
                "step 2: key 'at': 1 is before the previous step's 2$",
            ),
            (
                '[[steps]]\nat = 1\naction = "fault"\nrequest = true\nstatus = 0',
                r"key 'request': expected a name or an integer, got boolean true$",
            ),
            (
                '[[steps]]\nat = 1\naction = "fault"\nrequest = 4\nstatus = -8.0',
                r"key 'status': expected a name or an integer, got float -8.0$",
            ),
            (
                '[[steps]]\nat = 1\naction = "event"\nevents = ["VRDP"]',
                r"key 'events': expected a name or an integer, got an array$",
            ),
            (
                '[[steps]]\nat = 1\naction = "fault"\nrequest = 9999\nstatus = 0',
                r"key 'request': no VMMDev request type has the number 9999$",
            ),
            (
                '[[steps]]\nat = 1\naction = "fault"\nrequest = 4\nstatus = 4294967296',
                r"key 'status': VBox status 4294967296 is outside -2147483648\.\.2147483647",
            ),
            (
                '[[steps]]\nat = 1\naction = "event"\nevents = -1',
                r"key 'events': event mask -1 must be non-zero and within 0x7ff$",
            ),
            (
                "[host]\nr3_balloon = true",
                "'r3_balloon': only the oracle personality has it, and the file's personality "
                "is 'mainline'$",
            ),
        ],
    )
    def test_errors_name_the_problem(self, text: str, message: str) -> None:
        """Each malformed scenario is refused with the step, key and value at fault."""
        with pytest.raises(ScenarioError, match=message):
            parse_scenario(text, source="demo")

    @pytest.mark.parametrize(("option", "allocator"), [("", True), ("r3_balloon = true", False)])
    def test_r3_balloon_builds_oracle_without_kernel_allocator(
        self, option: str, allocator: bool
    ) -> None:
        """``r3_balloon`` turns off the Oracle driver's kernel allocator, which is on without it."""
        scenario = parse_scenario(f'[host]\npersonality = "oracle"\n{option}')
        host = SimulatedHost(**scenario.host.options())  # type: ignore[arg-type]
        assert host.driver.kernel_allocator is allocator  # type: ignore[attr-defined]

    def test_heartbeat_interval_bounds_are_the_hosts(self) -> None:
        """The ``[host]`` table takes exactly the intervals the host model takes (a value past
        them used to reach the host, whose error named neither the key nor the unit)."""
        for interval_ms in (MIN_HEARTBEAT_INTERVAL_MS, MAX_HEARTBEAT_INTERVAL_MS):
            scenario = parse_scenario(f"[host]\nheartbeat_interval_ms = {interval_ms}")
            host = SimulatedHost(**scenario.host.options())  # type: ignore[arg-type]
            assert interval_ms * 1_000_000 == host.vmmdev.heartbeat.interval_ns
        for interval_ms in (MIN_HEARTBEAT_INTERVAL_MS - 1, MAX_HEARTBEAT_INTERVAL_MS + 1):
            with pytest.raises(ValueError, match="heartbeat"):
                SimulatedHost(heartbeat_interval_ns=interval_ms * 1_000_000)
            with pytest.raises(ScenarioError, match="'heartbeat_interval_ms'"):
                parse_scenario(f"[host]\nheartbeat_interval_ms = {interval_ms}")

    def test_r3_balloon_is_oracle_only(self) -> None:
        with pytest.raises(ValueError, match="option of the oracle personality"):
            SimulatedHost(personality="passthrough", r3_balloon=True)

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A missing file is a ScenarioError naming the path once, with the reason."""
        path = tmp_path / "missing.toml"
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        assert str(info.value) == f"{path}: cannot read the scenario: No such file or directory"

    def test_device(self) -> None:
        """A path naming a device (an endless one here) is refused without reading it."""
        with pytest.raises(ScenarioError) as info:
            load_scenario(Path("/dev/zero"))
        assert str(info.value) == (
            "/dev/zero: the scenario is not a regular file but a character device: name a TOML file"
        )

    def test_syntax_error_in_a_file(self, tmp_path: Path) -> None:
        """A file's syntax error names the file, line and column."""
        path = tmp_path / "bad.toml"
        path.write_text("[host]\nram_mb = \n")
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        assert str(info.value) == f"{path}: line 2, column 10: invalid TOML: Invalid value"

    def test_nesting_too_deep_in_a_file(self, tmp_path: Path) -> None:
        """A value nested deeper than tomllib recurses is a syntax error, not a RecursionError."""
        path = tmp_path / "deep.toml"
        path.write_text("[[steps]]\nat = " + "[" * 100_000 + "]" * 100_000 + "\n")
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        assert str(info.value) == (
            f"{path}: line 2, column 6: invalid TOML: arrays or tables nested too deeply"
        )

    def test_not_utf8(self, tmp_path: Path) -> None:
        """A file that is not UTF-8 says where it stops being text, by line and column."""
        path = tmp_path / "binary.toml"
        path.write_bytes(b"[host]\n\xff")
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        assert str(info.value) == (
            f"{path}: line 2, column 1: invalid TOML: not UTF-8 text: byte 0xff (invalid start "
            "byte): save as UTF-8"
        )


class TestPlay:
    """Playing the demo scenario against a running host."""

    async def test_demo_runs_at_its_times(self, autojump_clock: object) -> None:
        """Each step takes effect at its time: property, balloon targets, event, restore."""
        scenario = load_scenario(DEMO)
        host = SimulatedHost(**scenario.host.options())  # type: ignore[arg-type]
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                start = trio.current_time()
                nursery.start_soon(play_scenario, host, scenario)
                session_id = host.vmmdev.session_id
                await trio.sleep_until(start + 1.5)
                found = host.prop_get(GREETING)
                assert found is not None
                assert found[:2] == ("hello from the simulated host", "TRANSIENT, RDONLYGUEST")
                await trio.sleep_until(start + 5.5)
                assert host.vmmdev.balloon.target_mb == 256
                await trio.sleep_until(start + 15.5)
                assert host.vmmdev.balloon.target_mb == 64
                await trio.sleep_until(start + 20.5)
                assert host.vmmdev.pending_events & Event.STATISTICS_INTERVAL_CHANGE_REQUEST
                await trio.sleep_until(start + 25.5)
                assert session_id != host.vmmdev.session_id
                await trio.sleep_until(start + 30.5)
                assert host.prop_get(GREETING) is None
                nursery.cancel_scope.cancel()

    async def test_refused_step_is_logged_and_the_next_runs(self, autojump_clock: object) -> None:
        """A step the host refuses is logged with its number and action, and the scenario
        goes on (it used to end the run: ``run --simulate`` exited 70 with a traceback)."""
        scenario = parse_scenario(
            '[[steps]]\nat = 0\naction = "prop_delete"\nname = "x"\n'
            '[[steps]]\nat = 1\naction = "balloon"\nmb = 64'
        )
        host = SimulatedHost(services=())
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                await play_scenario(host, scenario)
                nursery.cancel_scope.cancel()
        refused = [entry for entry in logs if entry["event"] == "scenario_step_refused"]
        assert [(entry["step"], entry["action"]) for entry in refused] == [(1, "prop_delete")]
        assert "no guest property service" in refused[0]["error"]
        assert host.vmmdev.balloon.target_mb == 64

    async def test_a_property_the_guest_made_read_only_is_refused(
        self, autojump_clock: object
    ) -> None:
        """The module's example: steps that set and delete a property the guest made
        read-only for the host are refused with VERR_PERMISSION_DENIED and logged, the
        property stays, and the balloon step after them runs at its time (the refusal used to
        end ``run --simulate`` with 70)."""
        scenario = parse_scenario(
            '[[steps]]\nat = 1\naction = "prop_set"\nname = "/Guest/ro"\nvalue = "w"\n'
            '[[steps]]\nat = 2\naction = "prop_delete"\nname = "/Guest/ro"\n'
            '[[steps]]\nat = 3\naction = "balloon"\nmb = 64'
        )
        host = SimulatedHost()
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                service = host.vmmdev.hgcm.service(SERVICE_NAME)
                assert isinstance(service, GuestPropertyService)
                assert guest_set(service, "/Guest/ro", "v", "RDONLYHOST") == VINF_SUCCESS
                start = trio.current_time()
                await play_scenario(host, scenario)
                assert trio.current_time() - start == 3
                nursery.cancel_scope.cancel()
        played = [
            (entry["event"], entry["step"], entry.get("error"))
            for entry in logs
            if entry["event"] in ("scenario_step", "scenario_step_refused")
        ]
        assert played == [
            ("scenario_step", 1, None),
            (
                "scenario_step_refused",
                1,
                "setting guest property /Guest/ro (read-only for the host) failed: "
                "VERR_PERMISSION_DENIED (-10)",
            ),
            ("scenario_step", 2, None),
            (
                "scenario_step_refused",
                2,
                "deleting guest property /Guest/ro (read-only for the host) failed: "
                "VERR_PERMISSION_DENIED (-10)",
            ),
            ("scenario_step", 3, None),
        ]
        found = host.prop_get("/Guest/ro")
        assert found is not None
        assert found[:2] == ("v", "RDONLYHOST")
        assert host.vmmdev.balloon.target_mb == 64

    async def test_reset_and_faults(self, autojump_clock: object) -> None:
        """reset reloads the driver; fault and delay reach the device."""
        scenario = parse_scenario(
            """
            [[steps]]
            at = 1
            action = "fault"
            request = "GET_SESSION_ID"
            status = "VERR_ACCESS_DENIED"
            [[steps]]
            at = 1
            action = "delay"
            request = "GET_HOST_TIME"
            seconds = 0.5
            [[steps]]
            at = 2
            action = "reset"
            """
        )
        host = SimulatedHost()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                old_driver = host.driver
                await play_scenario(host, scenario)
                assert host.driver is not old_driver
                assert host.driver.loaded
                assert host.vmmdev.guest.additions_ok
                assert host.vmmdev.request_counts[RequestType.GET_HOST_VERSION] == 2
                nursery.cancel_scope.cancel()

    async def test_steps_are_logged_by_name_before_they_run(self, autojump_clock: object) -> None:
        """Each step's line names what the scenario wrote (events, request and status by
        name, written as numbers here; the event mask beside the names) and comes before the
        step's effects: the lines of the boot a reset starts follow it (they used to come
        first, and the line gave only numbers)."""
        scenario = parse_scenario(
            """
            [[steps]]
            at = 1
            action = "event"
            events = 0x110
            [[steps]]
            at = 1
            action = "fault"
            request = 10
            status = -8
            [[steps]]
            at = 1
            action = "fault"
            request = 10
            status = -4242
            [[steps]]
            at = 1
            action = "delay"
            request = "get_host_time"
            seconds = 0.5
            [[steps]]
            at = 2
            action = "reset"
            """
        )
        host = SimulatedHost()
        with trio.fail_after(60), structlog.testing.capture_logs() as logs:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                await play_scenario(host, scenario)
                nursery.cancel_scope.cancel()
        events = [entry["event"] for entry in logs]
        steps = [
            {key: value for key, value in entry.items() if key not in ("component", "log_level")}
            for entry in logs
            if entry["event"] == "scenario_step"
        ]
        assert steps == [
            {
                "event": "scenario_step",
                "step": 1,
                "action": "event",
                "events": "RESTORED|VRDP",
                "mask": "0x110",
            },
            {
                "event": "scenario_step",
                "step": 2,
                "action": "fault",
                "request": "GET_HOST_TIME",
                "status": "VERR_NO_MEMORY",
                "count": 1,
            },
            {
                "event": "scenario_step",
                "step": 3,
                "action": "fault",
                "request": "GET_HOST_TIME",
                "status": -4242,
                "count": 1,
            },
            {
                "event": "scenario_step",
                "step": 4,
                "action": "delay",
                "request": "GET_HOST_TIME",
                "seconds": 0.5,
            },
            {"event": "scenario_step", "step": 5, "action": "reset"},
        ]
        reset_at = len(events) - 1 - events[::-1].index("scenario_step")
        assert "heartbeat_armed" in events[reset_at:]
