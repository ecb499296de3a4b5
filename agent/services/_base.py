"""The service framework: what a service declares, receives and provides.

A service is one module in ``agent/services/`` that exports ``SPEC``, a :class:`ServiceSpec`
naming the service, its config section (a :class:`ServiceSection` subclass, ``[name]`` in
``config/agent.toml``) and how to build it from a :class:`ServiceContext` and that section.
``agent.services.registry.SERVICES`` lists the specs; the daemon builds every enabled one and
runs it under its supervisor. See "Writing a service" in ``docs/architecture.md``.
"""

from __future__ import annotations

from dataclasses import field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Protocol, TypeVar, final

import trio
from pydantic import BaseModel, ConfigDict

from agent.records import record
from agent.services._leftovers import Leftovers

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.device import Device
    from agent.services.event_pump import EventPump


class ServiceSection(BaseModel):
    """Base of every service's config section: frozen, strict, no unknown keys.

    Subclasses add their settings, each with a documented default, and are named after the
    service (``[balloon]`` holds ``BalloonSection``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    enable: bool = True
    """Whether the daemon runs the service; a reload starts or stops it."""


S = TypeVar("S", bound=ServiceSection)
S_contra = TypeVar("S_contra", bound=ServiceSection, contravariant=True)


def _status_ignored() -> None:
    """The default :attr:`ServiceContext.status_changed`: nobody listens."""


def _agent_runs_on() -> bool:
    """The default :attr:`ServiceContext.agent_stopping`: only the service stops."""
    return False


DEFAULT_DRAIN_S: Final = 5.0
"""The drain time where nobody set one: ``daemon.shutdown_timeout_s``'s default."""


@final
class DrainTime:
    """How long a service's drain may take: ``daemon.shutdown_timeout_s``, kept current by
    the daemon across reloads (the same object for every service).

    A service that sizes what it holds by what its drain can give back (the owned balloon)
    reads :attr:`seconds` and learns of a change through :meth:`wait_changed`.
    """

    __slots__ = ("_changed", "seconds")

    def __init__(self, seconds: float = DEFAULT_DRAIN_S) -> None:
        self.seconds = seconds
        self._changed = trio.Event()

    def set(self, seconds: float) -> None:
        """A reload set the drain time to ``seconds``: wake whoever waits for a change."""
        if seconds == self.seconds:
            return
        self.seconds = seconds
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Wait until the drain time changes."""
        await self._changed.wait()


@final
class BalloonGauge:
    """The balloon's size as the balloon service last saw it, for services that report it.

    The balloon service sets ``chunks`` (1 MiB chunks in the balloon, counting the driver's
    or its own) whenever it learns the size, and at its drain to the size it leaves behind
    (0 once it gave every chunk back); the guest statistics :meth:`read` it. None means
    "nobody knows": the statistics then report the last figure they reported (0 before any),
    which Main would keep, rather than ask the driver themselves (Oracle's CHECK_BALLOON is
    no query: it moves the balloon).

    Where the size changes without the balloon service hearing of it (the in-tree driver
    balloons in the kernel and keeps event 0x40 from userspace), the service installs
    ``refresh``, which reads the size afresh; :meth:`read` awaits it first, so a reader's
    own rhythm keeps the figure current without a poll of its own. Its drain leaves one
    there that only asks the driver (CHECK_BALLOON, a pure query on that driver): the
    kernel finishes a change already under way after 0x40 left the filter.
    """

    __slots__ = ("chunks", "refresh")

    def __init__(self) -> None:
        self.chunks: int | None = None
        self.refresh: Callable[[], Awaitable[None]] | None = None

    async def read(self) -> int | None:
        """Return ``chunks``, refreshed first where the balloon service installed a refresh."""
        if self.refresh is None:
            await trio.lowlevel.checkpoint()
        else:
            await self.refresh()
        return self.chunks


@final
class SessionLedger:
    """The VM session id each service last acted on, by the service's name.

    The host gives the VM a new session id at every restore. A service hears RESTORED only
    while its run is subscribed, so a restore during a restart's back-off, or while a reload
    rebuilds or re-enables the service, reaches other services alone. The daemon keeps one
    ledger for all its services' lives: a run that reads another id than the one its name
    last noted knows a restore came meanwhile (VBoxService's timesync compares the id so).
    """

    __slots__ = ("_ids",)

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def last(self, name: str) -> int | None:
        """The id ``name`` last noted, None before it noted one."""
        return self._ids.get(name)

    def note(self, name: str, session_id: int) -> None:
        """``name`` acted on the VM's session ``session_id``."""
        self._ids[name] = session_id

    def forget(self, name: str) -> None:
        """``name`` acted on a session whose id it could not read: the next id it reads is
        the one it acted on, not a restore's."""
        self._ids.pop(name, None)


@record
class ServiceContext:
    """What the daemon hands a service when it builds it.

    Attributes:
        device: the open device; blocking work takes a session of its own through it.
        pump: the event pump; subscribe with ``with pump.subscribe(name, mask) as events:``.
        status_changed: call it after anything that changes :meth:`Service.status`; the
            daemon then sends the new combined ``STATUS=`` line to systemd (cheap, never
            blocks; repeated calls coalesce).
        balloon: the balloon's current size, shared by the balloon service (writer) and the
            guest statistics (reader).
        agent_stopping: whether the whole agent is on its way out (a stop request, or a
            fatal error), as against this service alone stopping (a reload that disables
            it) or restarting while the agent runs on. A drain may ask it: what it leaves
            behind then waits for the agent's next start, not in a gap while it runs on.
        sessions: the VM session id each service last acted on, to tell a restore that
            came while its run was down.
        drain_time: how long a drain may take (``daemon.shutdown_timeout_s``), kept current
            across reloads.
        leftovers: what a service's drain could not give back while the agent runs on (a
            reload disabled or rebuilt it, a restart): the daemon gives it back in the
            background and at its stop, a new start takes it over, ``STATUS=`` adds what it
            still holds to the service's fragment until then (:mod:`agent.services._leftovers`).
    """

    device: Device
    pump: EventPump
    status_changed: Callable[[], None] = field(default=_status_ignored)
    balloon: BalloonGauge = field(default_factory=BalloonGauge)
    agent_stopping: Callable[[], bool] = field(default=_agent_runs_on)
    sessions: SessionLedger = field(default_factory=SessionLedger)
    drain_time: DrainTime = field(default_factory=DrainTime)
    leftovers: Leftovers = field(default_factory=Leftovers)


class Statistics(Protocol):
    """A service's counters: an instance of a frozen dataclass."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


class Service(Protocol[S_contra]):
    """A long-lived task of the agent: subscribe, react, report.

    The supervisor calls :meth:`run`; when it ends (stop, restart or failure) it calls
    :meth:`drain`; after a failure it may call :meth:`run` again on the same object.
    """

    @property
    def name(self) -> str:
        """The spec's name; the framework binds it as ``service`` to every log line the
        service's code writes: its run and drain (the supervisor), its construction and
        ``reconfigure`` (the daemon), and every task started from them."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start, call ``task_status.started()`` once ready, then work until cancelled."""
        ...

    async def drain(self) -> None:
        """Give back what the service holds, after :meth:`run` was cancelled or failed.

        Runs under the daemon's drain deadline (``daemon.shutdown_timeout_s``) and is not
        shielded: it is cancelled if the deadline passes. It must cope with any point
        :meth:`run` may have reached, including not started at all. Whether the whole agent
        stops, or only this service, :attr:`ServiceContext.agent_stopping` tells.
        """
        ...

    def reconfigure(self, section: S_contra) -> bool:
        """Apply a reloaded section live and return True, or return False: "needs restart".

        The daemon restarts a service that returned False with a new instance built from
        the new section. Called only when the section changed and the service stays enabled.
        """
        ...

    def status(self) -> str:
        """A short fragment of systemd's ``STATUS=`` line, e.g. ``heartbeat 2000 ms``."""
        ...

    def statistics(self) -> Statistics:
        """Return a snapshot of the service's counters (a frozen dataclass)."""
        ...


@record
class ServiceSpec(Generic[S]):
    """How the daemon finds, configures and builds one service.

    Attributes:
        name: the service's name, also its config section ``[name]`` (lowercase, ``_``).
        section: the section's model; its defaults apply when the file omits the section.
        build: makes the service from the context and its (enabled) section.
    """

    name: str
    section: type[S]
    build: Callable[[ServiceContext, S], Service[S]]
