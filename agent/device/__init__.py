"""The device layer: the ``Device`` facade and the transports that reach a driver."""

from __future__ import annotations

from agent.device.device import (
    Device as Device,
    DeviceStatistics as DeviceStatistics,
    EventWaiter as EventWaiter,
    HgcmClient as HgcmClient,
    WaiterInterruptedError as WaiterInterruptedError,
    open_device as open_device,
)
from agent.device.errors import (
    DeviceInUseError as DeviceInUseError,
    DeviceLostError as DeviceLostError,
    DeviceUnavailableError as DeviceUnavailableError,
    NotTheDeviceError as NotTheDeviceError,
)
from agent.device.spec import (
    cannot_be_the_device as cannot_be_the_device,
    opener_for_spec as opener_for_spec,
)
from agent.device.transport import DeviceOpener as DeviceOpener, Transport as Transport
