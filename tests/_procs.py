"""What the tests that run edgeq in child processes share."""
import os

# Python source for a child process: `compiles` collects every Numba compile after `event.register("numba:compile",
# Compiles())` (the dispatcher of each; a kernel loaded from the disk cache is no compile).
COMPILE_LISTENER = r"""
from numba.core import event

compiles = []
class Compiles(event.Listener):
    def on_start(self, ev):
        compiles.append(str(ev.data.get("dispatcher")))
    def on_end(self, ev):
        pass
"""


def processes_naming(text: str) -> list[int]:
    """Pids of the processes whose command line contains `text` (none where there is no /proc)."""
    pids = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except (OSError, ValueError):
            pass
    return pids
