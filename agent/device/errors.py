"""Errors of the device layer (defined in :mod:`agent.protocol.errors`, which the simulated
host may import too)."""

from __future__ import annotations

from agent.protocol.errors import (
    DeviceInUseError,
    DeviceLostError,
    DeviceUnavailableError,
    NotTheDeviceError,
)

__all__ = ["DeviceInUseError", "DeviceLostError", "DeviceUnavailableError", "NotTheDeviceError"]
