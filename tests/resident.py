"""What of a memory-mapped file is resident in this process (Linux's /proc/self/smaps), for the tests of released
weights."""

from __future__ import annotations

from pathlib import Path


def mapped_resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of the file `path`."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and ":" not in head[0]:
                inside = len(head) == 6 and Path(head[5]) == Path(path).resolve()
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total
