"""The simulated VirtualBox host: VMMDev model, driver personalities, HGCM framework and
services, the in-process transport and the scenario player."""

from __future__ import annotations

from agent.host._log import LOG_COMPONENT
from agent.host.driver import (
    ALL_PERSONALITIES,
    PERSONALITIES,
    DriverLoadError,
    DriverSession,
    PersonalityUnavailableError,
)
from agent.host.host import SimulatedHost
from agent.host.memory import DictMemory, GuestMemory
from agent.host.scenario import (
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
    play_scenario,
)
from agent.host.transport import SimOpener, SimTransport

__all__ = [
    "ALL_PERSONALITIES",
    "LOG_COMPONENT",
    "PERSONALITIES",
    "DictMemory",
    "DriverLoadError",
    "DriverSession",
    "GuestMemory",
    "PersonalityUnavailableError",
    "Scenario",
    "ScenarioError",
    "SimOpener",
    "SimTransport",
    "SimulatedHost",
    "load_scenario",
    "parse_scenario",
    "play_scenario",
]
