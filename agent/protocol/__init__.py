"""The sans-IO vboxguest protocol: typed requests, their byte encodings and the session state.

Nothing here performs I/O, sleeps, logs or imports an event loop: transports move the
buffers, this package says what they contain.
"""

from __future__ import annotations

from agent.protocol.constants import (
    BALLOON_CHUNK_PAGES as BALLOON_CHUNK_PAGES,
)
from agent.protocol.constants import (
    BALLOON_CHUNK_SIZE as BALLOON_CHUNK_SIZE,
)
from agent.protocol.constants import (
    TIMEOUT_INFINITE as TIMEOUT_INFINITE,
)
from agent.protocol.constants import (
    VALID_EVENT_MASK as VALID_EVENT_MASK,
)
from agent.protocol.constants import (
    Event as Event,
)
from agent.protocol.constants import (
    Facility as Facility,
)
from agent.protocol.constants import (
    FacilityStatus as FacilityStatus,
)
from agent.protocol.constants import (
    Ioctl as Ioctl,
)
from agent.protocol.constants import (
    RequestType as RequestType,
)
from agent.protocol.errors import (
    AgentError as AgentError,
)
from agent.protocol.errors import (
    LocalProtocolError as LocalProtocolError,
)
from agent.protocol.errors import (
    ProtocolError as ProtocolError,
)
from agent.protocol.errors import (
    RemoteProtocolError as RemoteProtocolError,
)
from agent.protocol.errors import (
    VBoxStatusError as VBoxStatusError,
)
from agent.protocol.messages import (
    AcquireGuestCapabilities as AcquireGuestCapabilities,
)
from agent.protocol.messages import (
    BalloonStatus as BalloonStatus,
)
from agent.protocol.messages import (
    BalloonTarget as BalloonTarget,
)
from agent.protocol.messages import (
    ChangeBalloon as ChangeBalloon,
)
from agent.protocol.messages import (
    ChangeFilterMask as ChangeFilterMask,
)
from agent.protocol.messages import (
    ChangeGuestCapabilities as ChangeGuestCapabilities,
)
from agent.protocol.messages import (
    ChangeMemBalloon as ChangeMemBalloon,
)
from agent.protocol.messages import (
    CheckBalloon as CheckBalloon,
)
from agent.protocol.messages import (
    DriverVersion as DriverVersion,
)
from agent.protocol.messages import (
    DriverVersionInfo as DriverVersionInfo,
)
from agent.protocol.messages import (
    EventsReceived as EventsReceived,
)
from agent.protocol.messages import (
    GetHostTime as GetHostTime,
)
from agent.protocol.messages import (
    GetHostVersion as GetHostVersion,
)
from agent.protocol.messages import (
    GetMemBalloonChangeRequest as GetMemBalloonChangeRequest,
)
from agent.protocol.messages import (
    GetSessionId as GetSessionId,
)
from agent.protocol.messages import (
    GuestCapabilities as GuestCapabilities,
)
from agent.protocol.messages import (
    GuestHeartbeat as GuestHeartbeat,
)
from agent.protocol.messages import (
    HeartbeatConfigure as HeartbeatConfigure,
)
from agent.protocol.messages import (
    HeartbeatSettings as HeartbeatSettings,
)
from agent.protocol.messages import (
    HgcmBuffer as HgcmBuffer,
)
from agent.protocol.messages import (
    HgcmBufferIn as HgcmBufferIn,
)
from agent.protocol.messages import (
    HgcmBufferOut as HgcmBufferOut,
)
from agent.protocol.messages import (
    HgcmCall as HgcmCall,
)
from agent.protocol.messages import (
    HgcmCallError as HgcmCallError,
)
from agent.protocol.messages import (
    HgcmConnect as HgcmConnect,
)
from agent.protocol.messages import (
    HgcmConnected as HgcmConnected,
)
from agent.protocol.messages import (
    HgcmData as HgcmData,
)
from agent.protocol.messages import (
    HgcmDisconnect as HgcmDisconnect,
)
from agent.protocol.messages import (
    HgcmParam as HgcmParam,
)
from agent.protocol.messages import (
    HgcmReply as HgcmReply,
)
from agent.protocol.messages import (
    HgcmU32 as HgcmU32,
)
from agent.protocol.messages import (
    HgcmU64 as HgcmU64,
)
from agent.protocol.messages import (
    HgcmValue as HgcmValue,
)
from agent.protocol.messages import (
    HostTime as HostTime,
)
from agent.protocol.messages import (
    HostVersion as HostVersion,
)
from agent.protocol.messages import (
    InterruptAllWaits as InterruptAllWaits,
)
from agent.protocol.messages import (
    IoctlCall as IoctlCall,
)
from agent.protocol.messages import (
    Log as Log,
)
from agent.protocol.messages import (
    ReportGuestStatus as ReportGuestStatus,
)
from agent.protocol.messages import (
    Request as Request,
)
from agent.protocol.messages import (
    SessionId as SessionId,
)
from agent.protocol.messages import (
    UserBuffer as UserBuffer,
)
from agent.protocol.messages import (
    WaitForEvents as WaitForEvents,
)
from agent.protocol.messages import (
    WriteCoreDump as WriteCoreDump,
)
from agent.protocol.session import Session as Session
from agent.protocol.status import (
    parse_status as parse_status,
)
from agent.protocol.status import (
    status_name as status_name,
)
from agent.protocol.status import (
    status_to_errno as status_to_errno,
)
