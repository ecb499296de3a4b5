"""Errors of the device layer."""

from __future__ import annotations

from agent.protocol import AgentError


class DeviceUnavailableError(AgentError):
    """The device cannot be opened: missing node, no permission, no simulated host listening.

    The message is one line that names the path and what to do; the CLI exits 69
    (``EX_UNAVAILABLE``).
    """


class DeviceLostError(AgentError):
    """An open session's other side went away (the simulated host exited, the fd was revoked)."""
