"""What the host says about itself in Linux's /proc files (the CPU's vendor and name, the memory available)."""
from __future__ import annotations


def proc_field(path: str, key: str) -> str | None:
    """The value of the first `key: value` line of a /proc-style file (/proc/cpuinfo's vendor_id, /proc/meminfo's
    MemAvailable), stripped; None where the file, or a line with that key, is missing."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None
