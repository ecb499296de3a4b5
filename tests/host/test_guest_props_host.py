"""Host side of the simulated VBoxGuestPropSvc: the VBoxManage API and the VM life cycle.

Rules of this test module:
- the host API is called directly; guest calls go through ``FakeCall`` as elsewhere;
- the service runs on a ``FakeClock``; tests move it to tell timestamps apart;
- the framework's part of a restore (re-submitting pending calls) is played by the test.
"""

from __future__ import annotations

import pytest

from agent.host.guest_props import (
    MAX_PROPS,
    MAX_VALUE_SIZE,
    MAX_VALUE_SIZE_6_1,
    GuestPropertyService,
    HostVersion,
)
from agent.protocol.errors import VBoxStatusError
from agent.protocol.status import (
    VERR_INTERRUPTED,
    VERR_PERMISSION_DENIED,
    VERR_TOO_MUCH_DATA,
    VINF_SUCCESS,
    VWRN_NOT_FOUND,
)

from .guest_props_support import (
    START_NS,
    FakeCall,
    FakeClock,
    get_call,
    guest_set,
    notification,
    notify_call,
    run,
    strings,
    u64_value,
)

_HOST_FLAGS = "TRANSIENT, RDONLYGUEST"

HOST_PROPS = [
    "/VirtualBox/HostGuest/SysprepArgs",
    "/VirtualBox/HostGuest/SysprepExec",
    "/VirtualBox/HostInfo/VBoxRev",
    "/VirtualBox/HostInfo/VBoxVer",
    "/VirtualBox/HostInfo/VBoxVerExt",
    "/VirtualBox/VMInfo/ResetCounter",
    "/VirtualBox/VMInfo/ResumeCounter",
]


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="svc")
def _svc(clock: FakeClock) -> GuestPropertyService:
    return GuestPropertyService(clock=clock)


def _value(svc: GuestPropertyService, name: str) -> str | None:
    found = svc.host_get(name)
    return None if found is None else found[0]


def _stamp(svc: GuestPropertyService, name: str) -> int:
    found = svc.host_get(name)
    assert found is not None
    return found[2]


def _resubmit(svc: GuestPropertyService, call: FakeCall) -> FakeCall:
    """Re-submit a pending call as the framework does after a restore."""
    assert call.pending
    return run(svc, FakeCall(call.client_id, call.function, call.params))


class TestHostApi:
    def test_round_trip(self, svc: GuestPropertyService) -> None:
        """The host sets, reads, lists and deletes properties."""
        svc.host_set("/Guest/a", "1", "transient, rdonlyguest")
        svc.host_set("/Guest/b", "2")
        assert svc.host_get("/Guest/a") == ("1", "TRANSIENT, RDONLYGUEST", START_NS)
        assert svc.host_enumerate() == [
            ("/Guest/a", "1", START_NS, "TRANSIENT, RDONLYGUEST"),
            ("/Guest/b", "2", START_NS + 1, ""),
        ]
        assert svc.host_enumerate("/Guest/b|x*") == [("/Guest/b", "2", START_NS + 1, "")]
        svc.host_delete("/Guest/a")
        svc.host_delete("/Guest/none")
        assert svc.host_get("/Guest/a") is None

    def test_host_sees_guest_writes(self, svc: GuestPropertyService) -> None:
        """What the guest sets, the host reads."""
        guest_set(svc, "/Guest/a", "v", "TRANSRESET")
        assert svc.host_get("/Guest/a") == ("v", "TRANSIENT, TRANSRESET", START_NS)

    def test_guest_sees_host_writes(self, svc: GuestPropertyService) -> None:
        """What the host sets, the guest reads, and host writes notify guest waits."""
        wait = run(svc, notify_call("/Guest/*"))
        svc.host_set("/Guest/a", "v")
        assert strings(run(svc, get_call("/Guest/a")), 1) == [b"v", b""]
        assert notification(wait) == ("/Guest/a", "v", "", "0")
        wait = run(svc, notify_call("/Guest/*"))
        svc.host_delete("/Guest/a")
        assert notification(wait) == ("/Guest/a", "", "", "1")

    @pytest.mark.parametrize(
        ("name", "message"),
        [
            ("", "empty"),
            ("a*b", r"'\*', '\?' or '\|'"),
            ("a|b", r"'\*', '\?' or '\|'"),
            ("x" * 64, "the limit is 63 bytes"),
            ("é" * 32, "the limit is 63 bytes"),
            ("a\0b", "NUL"),
            ("\udcff", "not valid Unicode"),
        ],
    )
    def test_invalid_name(self, svc: GuestPropertyService, name: str, message: str) -> None:
        """An invalid name raises ValueError saying what is wrong, for every host call."""
        with pytest.raises(ValueError, match=message):
            svc.host_set(name, "v")
        with pytest.raises(ValueError, match=message):
            svc.host_get(name)
        with pytest.raises(ValueError, match=message):
            svc.host_delete(name)

    def test_value_limit(self, clock: FakeClock) -> None:
        """A value over the host's limit raises ValueError naming the limit."""
        svc = GuestPropertyService(clock=clock, max_value_size=MAX_VALUE_SIZE_6_1)
        svc.host_set("/Guest/a", "x" * 127)
        with pytest.raises(ValueError, match="limit is 127 bytes"):
            svc.host_set("/Guest/a", "x" * 128)

    def test_invalid_flags(self, svc: GuestPropertyService) -> None:
        """Unknown flags raise ValueError naming the flags."""
        with pytest.raises(ValueError, match="'TRANSIENT, NOPE'"):
            svc.host_set("/Guest/a", "v", "TRANSIENT, NOPE")

    def test_a_refused_set_takes_a_timestamp(self, svc: GuestPropertyService) -> None:
        """A host set the service refuses uses up a timestamp (``setProperty`` takes it
        first); an empty name, which Main refuses before calling the service, and a refused
        delete do not."""
        svc.host_set("/Guest/ro", "v", "RDONLYHOST")  # START_NS
        refused = [
            ("/Guest/a*", "v", "", ValueError),
            ("/Guest/a", "x" * MAX_VALUE_SIZE, "", ValueError),
            ("/Guest/a", "v", "NOPE", ValueError),
            ("/Guest/ro", "w", "", VBoxStatusError),
        ]
        for name, value, flags, error in refused:
            with pytest.raises(error):
                svc.host_set(name, value, flags)
        with pytest.raises(ValueError, match="empty"):
            svc.host_set("", "v")
        with pytest.raises(VBoxStatusError):
            svc.host_delete("/Guest/ro")
        svc.host_set("/Guest/a", "v")
        assert _stamp(svc, "/Guest/a") == START_NS + 1 + len(refused)

    def test_rdonlyhost(self, svc: GuestPropertyService) -> None:
        """An RDONLYHOST property refuses host writes and deletes with the service's status,
        VERR_PERMISSION_DENIED, named with its number in the one line."""
        svc.host_set("/Guest/a", "v", "RDONLYHOST")
        with pytest.raises(VBoxStatusError) as refused_set:
            svc.host_set("/Guest/a", "w")
        assert refused_set.value.rc == VERR_PERMISSION_DENIED
        assert str(refused_set.value) == (
            "setting guest property /Guest/a (read-only for the host) failed: "
            "VERR_PERMISSION_DENIED (-10)"
        )
        with pytest.raises(VBoxStatusError) as refused_delete:
            svc.host_delete("/Guest/a")
        assert str(refused_delete.value) == (
            "deleting guest property /Guest/a (read-only for the host) failed: "
            "VERR_PERMISSION_DENIED (-10)"
        )
        assert svc.host_get("/Guest/a") == ("v", "RDONLYHOST", START_NS)

    def test_property_limit(self, svc: GuestPropertyService) -> None:
        """A 257th property from the host is refused with VERR_TOO_MUCH_DATA."""
        for index in range(MAX_PROPS):
            svc.host_set(f"/Guest/{index}", "v")
        with pytest.raises(
            VBoxStatusError, match=f"the service holds {MAX_PROPS} properties"
        ) as info:
            svc.host_set("/Guest/more", "v")
        assert info.value.rc == VERR_TOO_MUCH_DATA
        assert svc.host_get("/Guest/more") is None

    def test_enumerate_pattern_limit(self, svc: GuestPropertyService) -> None:
        """A pattern list over 1023 bytes raises ValueError."""
        assert svc.host_enumerate("x" * 1023) == []
        with pytest.raises(ValueError, match="limit is 1023"):
            svc.host_enumerate("x" * 1024)

    @pytest.mark.parametrize("flags", [-1, 0x01, 0x20, 0x1_0000_0000])
    def test_invalid_global_flags(self, svc: GuestPropertyService, flags: int) -> None:
        """Global flags outside ALLFLAGS raise ValueError."""
        with pytest.raises(ValueError, match="unknown global flags"):
            svc.set_global_flags(flags)


class TestPowerOn:
    def test_sets_host_properties(self, clock: FakeClock) -> None:
        """Power-on sets the version, counter and sysprep properties, read-only for the guest."""
        svc = GuestPropertyService(clock=clock, host_version=HostVersion("7.1.4", "7.1.4_X", "1"))
        svc.power_on()
        listed = svc.host_enumerate()
        assert [name for name, _, _, _ in listed] == HOST_PROPS
        assert {"TRANSIENT, RDONLYGUEST"} == {flags for _, _, _, flags in listed}
        assert _value(svc, "/VirtualBox/HostInfo/VBoxVer") == "7.1.4"
        assert _value(svc, "/VirtualBox/HostInfo/VBoxVerExt") == "7.1.4_X"
        assert _value(svc, "/VirtualBox/HostInfo/VBoxRev") == "1"
        assert _value(svc, "/VirtualBox/VMInfo/ResetCounter") == "0"
        assert _value(svc, "/VirtualBox/VMInfo/ResumeCounter") == "0"
        assert _value(svc, "/VirtualBox/HostGuest/SysprepExec") == ""

    def test_default_version(self, svc: GuestPropertyService) -> None:
        """By default the host reports a 7.0 version."""
        svc.power_on()
        version = _value(svc, "/VirtualBox/HostInfo/VBoxVer")
        assert version is not None
        assert version.startswith("7.0.")

    def test_power_cycle_drops_transient(self, svc: GuestPropertyService) -> None:
        """A second power-on keeps persistent properties and drops transient ones."""
        svc.power_on()
        guest_set(svc, "/Guest/keep", "1")
        guest_set(svc, "/Guest/transient", "2", "TRANSIENT")
        guest_set(svc, "/Guest/transreset", "3", "TRANSRESET")
        svc.resume()
        keep = svc.host_get("/Guest/keep")
        wait = run(svc, notify_call("/Guest/*"))
        svc.power_on()
        assert wait.status == VERR_INTERRUPTED
        assert keep == svc.host_get("/Guest/keep")
        assert svc.host_get("/Guest/transient") is None
        assert svc.host_get("/Guest/transreset") is None
        assert _value(svc, "/VirtualBox/VMInfo/ResumeCounter") == "0"


class TestReset:
    def test_reset(self, svc: GuestPropertyService) -> None:
        """A reset ends waits, deletes TRANSRESET properties and bumps ResetCounter."""
        svc.power_on()
        guest_set(svc, "/Guest/transient", "1", "TRANSIENT")
        guest_set(svc, "/Guest/transreset", "2", "TRANSRESET")
        guest_set(svc, "/Guest/locked", "3", "TRANSRESET, RDONLYHOST")
        wait = run(svc, notify_call())
        svc.reset()
        assert wait.status == VERR_INTERRUPTED
        assert _value(svc, "/Guest/transient") == "1"
        assert svc.host_get("/Guest/transreset") is None
        assert _value(svc, "/Guest/locked") == "3"
        assert _value(svc, "/VirtualBox/VMInfo/ResetCounter") == "1"
        svc.reset()
        assert _value(svc, "/VirtualBox/VMInfo/ResetCounter") == "2"

    def test_reset_changes_are_queued(self, svc: GuestPropertyService) -> None:
        """The deletions and the counter change reach guests asking after an old timestamp."""
        svc.power_on()
        guest_set(svc, "/Guest/transreset", "2", "TRANSRESET")
        stamp = _stamp(svc, "/Guest/transreset")
        svc.reset()
        call = run(svc, notify_call(timestamp=stamp))
        assert notification(call) == ("/Guest/transreset", "", "", "1")
        call = run(svc, notify_call(timestamp=stamp + 1))
        assert (notification(call)) == (
            "/VirtualBox/VMInfo/ResetCounter",
            "1",
            "TRANSIENT, RDONLYGUEST",
            "0",
        )

    @pytest.mark.parametrize(
        ("stored", "counted"),
        [
            ("41", "42"),
            ("12abc", "13"),  # trailing characters: a warning, the number stands
            ("7 ", "8"),
            ("0x10", "17"),
            ("0X1f", "32"),
            ("010", "9"),  # octal
            ("08", "9"),  # 0 and no octal digit: decimal
            ("0x", "1"),  # no hex digit after 0x: decimal 0, then "x"
            ("0xg", "1"),
            ("1e3", "2"),
            (" 5", "1"),  # no leading space is skipped: no digits
            ("\t5", "1"),
            ("", "1"),
            ("abc", "1"),
            ("+", "1"),
            ("-", "1"),
            ("+5", "6"),
            ("--5", "6"),
            ("-+5", "6"),  # '+' makes it positive again
            ("-1", "0"),  # two's complement, then + 1 wraps
            ("+-5", str(2**64 - 4)),
            ("-0x10", str(2**64 - 15)),
            (str(2**64 - 2), str(2**64 - 1)),
            (str(2**64 - 1), "0"),
            (str(2**64 + 5), "6"),  # too big: wraps modulo 2**64
            ("\u0663", "1"),  # a non-ASCII digit is no digit
        ],
    )
    def test_counter_is_read_as_rtstrtouint64_reads_it(
        self, svc: GuestPropertyService, stored: str, counted: str
    ) -> None:
        """``incrementCounterProp`` reads the value with ``RTStrToUInt64``: base from the
        prefix, signs, trailing characters and overflow tolerated, 0 without digits."""
        svc.power_on()
        svc.host_set("/VirtualBox/VMInfo/ResetCounter", stored, "TRANSIENT")
        svc.reset()
        assert _value(svc, "/VirtualBox/VMInfo/ResetCounter") == counted

    def test_counter_without_property(self, svc: GuestPropertyService) -> None:
        """Without a ResetCounter property a reset starts it at 1."""
        svc.reset()
        assert _value(svc, "/VirtualBox/VMInfo/ResetCounter") == "1"


class TestRestore:
    def test_keeps_properties_and_timestamps(
        self, svc: GuestPropertyService, clock: FakeClock
    ) -> None:
        """A restore keeps every property with its timestamp and notifies nobody."""
        svc.power_on()
        guest_set(svc, "/Guest/a", "1", "TRANSIENT")
        svc.resume()
        before = svc.host_enumerate()
        clock.now += 10**9
        svc.restore()
        assert before == svc.host_enumerate()

    def test_resume_after_restore(self, svc: GuestPropertyService, clock: FakeClock) -> None:
        """Resuming after a restore sets the version properties again and bumps ResumeCounter."""
        svc.power_on()
        svc.resume()
        clock.now += 10**9
        svc.restore()
        assert _stamp(svc, "/VirtualBox/HostInfo/VBoxVer") < START_NS + 10**9
        svc.resume()
        assert _value(svc, "/VirtualBox/VMInfo/ResumeCounter") == "2"
        stamp = _stamp(svc, "/VirtualBox/HostInfo/VBoxVer")
        assert stamp > START_NS + 10**9
        svc.resume()
        assert _value(svc, "/VirtualBox/VMInfo/ResumeCounter") == "3"
        assert stamp == _stamp(svc, "/VirtualBox/HostInfo/VBoxVer")

    def test_pending_waits_are_resubmitted(
        self, svc: GuestPropertyService, clock: FakeClock
    ) -> None:
        """Waits survive a restore through re-submission: timestamp 0 waits on, others get +78.

        The clock moves before the restore: on a stuck one the new instance would reuse the
        old one's timestamps (``test_a_restore_on_a_stuck_clock_reuses_timestamps``).
        """
        svc.power_on()
        guest_set(svc, "/Guest/a", "1")
        waiting = run(svc, notify_call("/Guest/*"))
        guest_set(svc, "/Guest/a", "2")
        assert waiting.status == VINF_SUCCESS
        fresh = run(svc, notify_call("/Guest/*"))
        stamp = _stamp(svc, "/Guest/a")
        old = run(svc, notify_call("/Guest/*", timestamp=stamp, client_id=2))
        assert old.pending
        clock.now += 10**9
        svc.restore()
        assert fresh.pending
        assert old.pending
        fresh = _resubmit(svc, fresh)
        old = _resubmit(svc, old)
        svc.resume()
        assert fresh.pending
        assert old.pending
        guest_set(svc, "/Guest/b", "3")
        assert fresh.status == VINF_SUCCESS
        assert old.status == VWRN_NOT_FOUND
        assert notification(old) == ("/Guest/b", "3", "", "0")

    def test_resubmitted_old_wait_gets_oldest_match(
        self, svc: GuestPropertyService, clock: FakeClock
    ) -> None:
        """A re-submitted wait matching the new instance's first changes gets them with +78."""
        svc.power_on()
        guest_set(svc, "/Guest/a", "1")
        old = run(svc, notify_call("/VirtualBox/*", timestamp=_stamp(svc, "/Guest/a")))
        assert old.pending
        clock.now += 10**9
        svc.restore()
        old = _resubmit(svc, old)
        assert old.status == VWRN_NOT_FOUND
        assert notification(old)[0] == "/VirtualBox/HostInfo/VBoxVer"


STARTUP_PROPS = [
    "/VirtualBox/HostInfo/VBoxVer",
    "/VirtualBox/HostInfo/VBoxVerExt",
    "/VirtualBox/HostInfo/VBoxRev",
    "/VirtualBox/VMInfo/ResetCounter",
    "/VirtualBox/VMInfo/ResumeCounter",
    "/VirtualBox/HostGuest/SysprepExec",
    "/VirtualBox/HostGuest/SysprepArgs",
]
"""The properties a new instance sets, in the order it sets them."""


class TestStartUpTimestamps:
    """The start-up properties on a clock that does not move (a coarse host clock)."""

    def test_a_new_instance(self, svc: GuestPropertyService) -> None:
        """``initialize``: the version properties get T, T+1, T+2 from one timestamp, the
        counters and Sysprep properties the next timestamp (T+1) and the three after it."""
        svc.restore()
        assert [_stamp(svc, name) - START_NS for name in STARTUP_PROPS] == [0, 1, 2, 1, 2, 3, 4]

    def test_power_on(self, svc: GuestPropertyService) -> None:
        """POWER_ON sets the version properties again from a third timestamp (T+2)."""
        svc.power_on()
        assert [_stamp(svc, name) - START_NS for name in STARTUP_PROPS] == [2, 3, 4, 1, 2, 3, 4]

    def test_an_old_timestamp_is_looked_for_from_the_newest_change(
        self, svc: GuestPropertyService
    ) -> None:
        """GET_NOTIFICATION finds the newest change with the timestamp it is given
        (``getOldNotificationInternal``): after T+1 comes ResumeCounter (after
        ResetCounter), not VBoxRev (after VBoxVerExt)."""
        svc.restore()
        call = run(svc, notify_call(timestamp=START_NS + 1))
        assert call.status == VINF_SUCCESS
        assert notification(call) == ("/VirtualBox/VMInfo/ResumeCounter", "0", _HOST_FLAGS, "0")
        assert u64_value(call, 1) == START_NS + 2

    def test_a_change_may_be_dated_before_the_last_queued_one(
        self, svc: GuestPropertyService
    ) -> None:
        """After power-on a guest change is dated T+3, after VBoxRev's T+4 in the queue: a
        guest asking after T+4 gets it at once, one asking after T+3 waits."""
        svc.power_on()
        guest_set(svc, "/Guest/a", "1")
        assert _stamp(svc, "/Guest/a") == START_NS + 3
        call = run(svc, notify_call("/Guest/*", timestamp=START_NS + 4))
        assert call.status == VINF_SUCCESS
        assert notification(call) == ("/Guest/a", "1", "", "0")
        assert run(svc, notify_call("/Guest/*", timestamp=START_NS + 3, client_id=2)).pending

    def test_a_restore_on_a_stuck_clock_reuses_timestamps(self, svc: GuestPropertyService) -> None:
        """A new instance on a clock that has not moved dates its changes as the old one
        did: a re-submitted wait finds its timestamp again and completes with VINF_SUCCESS,
        not VWRN_NOT_FOUND."""
        svc.power_on()
        old = run(svc, notify_call("/Guest/*", timestamp=START_NS + 4))
        assert old.pending
        svc.restore()
        old = _resubmit(svc, old)
        svc.resume()
        guest_set(svc, "/Guest/b", "1")
        assert old.status == VINF_SUCCESS
        assert notification(old) == ("/Guest/b", "1", "", "0")
