"""Free space on the disk of a local store or storage folder, for readiness checks: a full disk still answers
reads (and lets an empty file be created), so only its free space tells that the next write will fail."""

from __future__ import annotations

import os
from pathlib import Path

# Less than this is "full": a job record is a few kB, a tiny video a few hundred; a real one is tens of MB, but
# a readiness check says whether writing works at all, not whether the next video fits.
MIN_FREE_BYTES = 1 << 20


def has_room(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= MIN_FREE_BYTES
