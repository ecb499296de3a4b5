"""The ``[balloon]`` section of the config file."""

from __future__ import annotations

from typing import Final

from pydantic import Field, ModelWrapValidatorHandler, field_validator, model_validator

from agent.ordered import validate_ordered
from agent.services._base import ServiceSection

DEFAULT_PSI_PATH: Final = "/proc/pressure/memory"
MIN_PSI_INTERVAL_S: Final = 0.5
MAX_PSI_INTERVAL_S: Final = 10.0
"""The window range the kernel accepts for PSI triggers (500 ms to 10 s)."""
MAX_RETRY_S: Final = 3600.0
MAX_PRESSURE_COOLDOWN_S: Final = 3600.0
"""The longest cooldown: a hold lasts at most 16 of them, and triggered mode postpones a
CHECK_BALLOON (which also applies the host's deflates) for at most one."""


class BalloonSection(ServiceSection):
    """How the balloon follows the host and yields to memory pressure."""

    psi_path: str = DEFAULT_PSI_PATH
    """PSI file to watch (``/proc/pressure/memory`` or a cgroup v2 ``memory.pressure``); it
    must be a regular file, as those are (a FIFO or device switches pressure handling off)."""
    psi_interval_s: float = Field(default=2.0, ge=MIN_PSI_INTERVAL_S, le=MAX_PSI_INTERVAL_S)
    """The PSI trigger window, the polling interval where triggers are unsupported, and how
    often the floor (``min_available_mb``) is looked at while the agent holds chunks."""
    pressure_threshold_pct: float = Field(default=10.0, gt=0, le=100)
    """Stall share (``some``) within one interval at or over which memory is under pressure."""
    pressure_step_mb: int = Field(default=64, ge=1)
    """MiB the agent gives back at once when pressure is high (where it holds the chunks)."""
    pressure_cooldown_s: float = Field(default=30.0, gt=0, le=MAX_PRESSURE_COOLDOWN_S)
    """How long pressure must stay low before the balloon grows toward the target again."""
    min_available_mb: int = Field(default=256, ge=0)
    """Never inflate when ``MemAvailable`` would drop below this many MiB, and give back
    (where the agent holds the chunks) what it lacks below that, held as a pressure cap,
    once it lacks more than ``FLOOR_BAND_MB`` (16 MiB, or half the floor if less: a wobble
    at the floor gives nothing back);
    where the agent's memory cgroups have a limit, the room left under it (limit less usage
    not counting reclaimable cache) counts instead when it is less."""
    retry_initial_s: float = Field(default=1.0, gt=0, le=MAX_RETRY_S)
    """Delay before the first retry after a failed step; doubles on each further failure ..."""
    retry_max_s: float = Field(default=60.0, gt=0, le=MAX_RETRY_S)
    """... up to this bound."""

    @field_validator("psi_path")
    @classmethod
    def _check_psi_path(cls, value: str) -> str:
        if not value.startswith("/"):
            msg = "must be an absolute path to a regular PSI file such as /proc/pressure/memory"
            raise ValueError(msg)
        if "\0" in value:
            msg = "must not contain a NUL character"
            raise ValueError(msg)
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _check_retry_order(
        cls, data: object, handler: ModelWrapValidatorHandler[BalloonSection]
    ) -> BalloonSection:
        return validate_ordered(cls, data, handler, "retry_initial_s", "retry_max_s")
