"""vbox-agent: a VirtualBox guest agent for Linux, built on trio."""

from __future__ import annotations

__version__ = "0.1.0"
