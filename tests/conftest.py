"""Shared pytest configuration: Hypothesis profiles.

Select a profile with ``HYPOTHESIS_PROFILE`` (``dev`` by default): ``ci`` has no deadline
and prints reproduction blobs; ``dev`` keeps Hypothesis' defaults.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
