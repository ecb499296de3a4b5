"""Exit codes of every ``vbox-agent`` command (``sysexits.h`` values where one fits)."""

from __future__ import annotations

from typing import Final

EX_OK: Final = 0
EX_REFUSED: Final = 1
"""The simulated host refused a control command (``vbox-agent host``)."""
EX_USAGE: Final = 64
EX_UNAVAILABLE: Final = 69
"""The device (or simulated host) cannot be reached, or another agent holds the device."""
EX_SOFTWARE: Final = 70
"""A fatal error inside the agent."""
EX_IOERR: Final = 74
"""The output cannot be written (a full disk), other than to a reader that went away."""
EX_TEMPFAIL: Final = 75
"""A failure that may pass: trying again later may succeed (the host's properties grew
faster than ``prop`` could list them)."""
EX_CONFIG: Final = 78
"""The config file is invalid, or the device path names what cannot be the device."""
EX_INTERRUPTED: Final = 130
"""Stopped by SIGINT (Ctrl-C), reported as a shell reports a process the signal ended."""
EX_BROKEN_PIPE: Final = 141
"""The reader of the output went away (``| head``), reported as SIGPIPE would end a process."""
