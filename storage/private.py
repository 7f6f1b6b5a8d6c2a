"""The bot's files are private to the user it runs as: the data folder 0700, the SQLite database and its
``-wal``/``-shm``/``-journal`` files 0600, whatever the umask.

Every conversation, picture and usage row is in them; under the usual umask 022 they would be readable by
every local user.  SQLite creates its ``-wal``, ``-shm`` and journal files with the database file's own
permissions, so creating the database 0600 before the first connection covers them; files left more open by
an older version are tightened when the bot starts (only files this user owns: never someone else's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "private_dir", "private_sqlite"]

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
_SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_dir(path: str | Path) -> Path:
    """Create the folder (and its parents) readable by this user only, or tighten it if it exists, is ours
    and is open to others.  Returns the path."""
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    _tighten(folder, DIR_MODE)
    return folder


def private_sqlite(url: str) -> None:
    """For an SQLite file URL (sync or async form): create the database file 0600 before SQLite does (its
    ``-wal``/``-shm`` files then get the same mode), its folder 0700 when it has to be created, and tighten
    the database and its companions left more open.  Other URLs (PostgreSQL, ``:memory:``) are left alone."""
    scheme, sep, rest = url.partition(":///")
    if not sep or not scheme.lower().startswith("sqlite") or not rest or rest.startswith(":memory:"):
        return
    path = Path(rest.partition("?")[0]).expanduser()
    if not path.parent.exists():  # an existing folder (e.g. /srv) is not ours to change
        path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    for file in (path, *(path.with_name(path.name + suffix) for suffix in _SQLITE_COMPANIONS)):
        _tighten(file, FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    """``chmod`` to ``mode`` when the file is ours and allows more than that; missing files are skipped."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & ~mode == 0:
        return
    try:
        path.chmod(mode)
    except OSError as exc:  # a read-only mount: say so once, the bot still runs
        log.warning("could not make %s private (mode %o): %s", path, mode, exc)
        return
    log.info("made %s private to this user (mode %o; it was %o)", path, mode, stat.S_IMODE(info.st_mode))
