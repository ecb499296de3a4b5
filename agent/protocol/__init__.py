"""The sans-IO vboxguest protocol: typed requests, their byte encodings and the session state.

Nothing here performs I/O, sleeps, logs or imports an event loop: transports move the
buffers, this package says what they contain.
"""

from __future__ import annotations

from agent.protocol.balloon_pages import ChunkPages as ChunkPages
from agent.protocol.constants import (
    BALLOON_CHUNK_PAGES as BALLOON_CHUNK_PAGES,
    BALLOON_CHUNK_SIZE as BALLOON_CHUNK_SIZE,
    TIMEOUT_INFINITE as TIMEOUT_INFINITE,
    VALID_EVENT_MASK as VALID_EVENT_MASK,
    CpuEventType as CpuEventType,
    CpuStatusType as CpuStatusType,
    Event as Event,
    Facility as Facility,
    FacilityStatus as FacilityStatus,
    Ioctl as Ioctl,
    RequestType as RequestType,
    StatCap as StatCap,
)
from agent.protocol.errors import (
    AgentError as AgentError,
    DeviceLostError as DeviceLostError,
    DeviceUnavailableError as DeviceUnavailableError,
    LocalProtocolError as LocalProtocolError,
    ProtocolError as ProtocolError,
    RemoteProtocolError as RemoteProtocolError,
    VBoxStatusError as VBoxStatusError,
)
from agent.protocol.messages import (
    AcquireGuestCapabilities as AcquireGuestCapabilities,
    BalloonStatus as BalloonStatus,
    BalloonTarget as BalloonTarget,
    ChangeBalloon as ChangeBalloon,
    ChangeBalloonProbe as ChangeBalloonProbe,
    ChangeFilterMask as ChangeFilterMask,
    ChangeGuestCapabilities as ChangeGuestCapabilities,
    ChangeMemBalloon as ChangeMemBalloon,
    CheckBalloon as CheckBalloon,
    CpuHotPlugEvent as CpuHotPlugEvent,
    DriverVersion as DriverVersion,
    DriverVersionInfo as DriverVersionInfo,
    EventsReceived as EventsReceived,
    GetCpuHotPlugRequest as GetCpuHotPlugRequest,
    GetHostTime as GetHostTime,
    GetHostVersion as GetHostVersion,
    GetMemBalloonChangeRequest as GetMemBalloonChangeRequest,
    GetSessionId as GetSessionId,
    GetStatisticsChangeRequest as GetStatisticsChangeRequest,
    GuestCapabilities as GuestCapabilities,
    GuestHeartbeat as GuestHeartbeat,
    GuestStatistics as GuestStatistics,
    HeartbeatConfigure as HeartbeatConfigure,
    HeartbeatSettings as HeartbeatSettings,
    HgcmBuffer as HgcmBuffer,
    HgcmBufferIn as HgcmBufferIn,
    HgcmBufferOut as HgcmBufferOut,
    HgcmCall as HgcmCall,
    HgcmCallError as HgcmCallError,
    HgcmConnect as HgcmConnect,
    HgcmConnected as HgcmConnected,
    HgcmData as HgcmData,
    HgcmDisconnect as HgcmDisconnect,
    HgcmParam as HgcmParam,
    HgcmReply as HgcmReply,
    HgcmU32 as HgcmU32,
    HgcmU64 as HgcmU64,
    HgcmValue as HgcmValue,
    HostTime as HostTime,
    HostVersion as HostVersion,
    InterruptAllWaits as InterruptAllWaits,
    IoctlCall as IoctlCall,
    Log as Log,
    ReportGuestStats as ReportGuestStats,
    ReportGuestStatus as ReportGuestStatus,
    Request as Request,
    SessionId as SessionId,
    SetCpuHotPlugStatus as SetCpuHotPlugStatus,
    StatisticsInterval as StatisticsInterval,
    Submission as Submission,
    UserBuffer as UserBuffer,
    WaitForEvents as WaitForEvents,
    WriteCoreDump as WriteCoreDump,
)
from agent.protocol.session import Session as Session
from agent.protocol.status import (
    parse_status as parse_status,
    status_for_errno as status_for_errno,
    status_name as status_name,
    status_to_errno as status_to_errno,
)
