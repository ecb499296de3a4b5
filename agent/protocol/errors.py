"""The exception tree: one root, h11's local/remote split, and VBox status failures."""

from __future__ import annotations

from agent.protocol.status import status_name


class AgentError(Exception):
    """Root of every error vbox-agent raises on purpose."""


class ProtocolError(AgentError):
    """The vboxguest protocol was not followed."""


class LocalProtocolError(ProtocolError):
    """We misused the device: the request would break a rule of the ABI or the session."""


class RemoteProtocolError(ProtocolError):
    """The driver or host answered with a buffer that breaks the ABI."""


class VBoxStatusError(AgentError):
    """The host or driver completed a request with a failing VBox status (``rc < 0``).

    Attributes:
        rc: the VBox status code.
        name: its symbolic name (``VERR_...``).
        operation: what was asked (a request or ioctl name).
    """

    def __init__(self, rc: int, operation: str) -> None:
        self.rc = rc
        self.name = status_name(rc)
        self.operation = operation
        super().__init__(f"{operation} failed: {self.name} ({rc})")
