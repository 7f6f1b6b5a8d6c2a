"""Which bot process is writing an answer: an identity per process and a heartbeat in SQL.

Several ``serve`` processes can share one PostgreSQL.  Each unfinished answer records the process writing
it; a process that starts, and every process on each heartbeat, marks ``interrupted`` only the answers of
processes that are gone — their heartbeat older than :data:`STALE_AFTER_S`, or, on the same host, their
pid no longer running (a restarted container is pid 1 again: a row with our own pid but another id is a
previous life of this process).  So a restart of one process never touches the answers another is still
streaming, and a crashed process's answers are marked as soon as the restart, or within a minute or so.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "WorkerIdentity", "is_gone"]

HEARTBEAT_S = 15.0
"""How often a running process touches its row (and sweeps for the answers of processes that are gone)."""

STALE_AFTER_S = 60.0
"""A process not seen for this long is gone: four missed heartbeats, so a busy event loop is not mistaken."""


@dataclass(frozen=True)
class WorkerIdentity:
    """One bot process: a unique id (stored with each answer it writes), its host and pid."""

    id: str
    host: str
    pid: int

    @classmethod
    def this_process(cls) -> WorkerIdentity:
        host, pid = socket.gethostname(), os.getpid()
        return cls(f"{host[:40]}:{pid}:{uuid.uuid4().hex[:12]}", host, pid)


def is_gone(row: Any, me: WorkerIdentity) -> bool:
    """Whether worker ``row`` (``id``, ``host``, ``pid``) is a process on this host that no longer runs.

    Only this host's processes can be checked; elsewhere the heartbeat decides.
    """
    if row.id == me.id or row.host != me.host:
        return False
    if row.pid == me.pid:
        return True  # our pid, another id: an earlier life of this process (a restarted container)
    try:
        os.kill(row.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # runs, under another user
        return False
    return False
