"""Names for the daemon's OS threads, so `top -H`, `ps -L` and `/proc/<pid>/task/*/comm` tell them apart.

An operator (or `bench/`) can then tell generation (`worker`, with torch's OpenMP threads)
from writing (`writer`), watching (`watch`) and the main loop (`diffusiond`) when the service
uses CPU.
"""

from __future__ import annotations

import contextlib
import sys
import threading


def name_os_thread(name: str, thread: threading.Thread | None = None) -> None:
    """Name a thread (this one by default) for the OS: 15 bytes, Linux only, a no-op elsewhere.

    Threads started by it later inherit the name: torch's OpenMP threads show as the worker's.
    """
    tid = (thread or threading.current_thread()).native_id
    with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm", "w") as comm:
        comm.write(name[:15])


def set_torch_threads(count: int) -> int | None:
    """Set torch's intra-op threads on the calling thread (the worker: OpenMP's count is per thread
    that starts parallel work); returns what torch uses now, or None where torch is not loaded: a
    daemon on the stand-in never imports it (that costs seconds a start), and has no threads to set."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return int(torch.get_num_threads())
