"""Writing folders safely: never clobber a user's files, replace atomically, clean up after a kill.

The kit writes three kinds of folder: activation stores (`activations`), saved SAEs (`saes.io`) and
training checkpoints (`train`). Each goes through the same rules:

- **Claim before writing.** A target folder is used only if it is absent, empty, or already holds
  the same kind of artefact — the kit's own marker inside, nothing else beside it (`claim_dir`).
  Anything else is refused with an error that names the folder and a file in it; nothing on disk
  is touched.
- **Write aside, then rename.** New content is written to ``<name>.sae-kit-tmp-<host>-<pid>`` and
  renamed into place (`replace_dir`); an old version is first moved to
  ``<name>.sae-kit-old-<host>-<pid>`` and deleted only after the new one is in place, so a kill at
  any moment leaves either the old or the new version. Files are fsync'ed before the rename.
- **Clean up after a killed writer.** Such siblings written on this host by a process that is gone
  are removed on the next write (other hosts' are left alone); if the kill fell between the two
  renames (the target is missing but its old version exists), the old version is put back
  (`recover_stale`).
- **One writer at a time.** `locked` takes an OS file lock (the `filelock` package); a second
  process waits and says which run holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path


class ArtefactBusyError(RuntimeError):
    """Another process holds the lock on a store or SAE folder and did not release it in time."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def claim_dir(path: Path, kind: str, markers: set[str], allowed: set[str], hint: str = "",
              is_ours=None) -> None:
    """Refuse to write a `kind` at `path` unless it is absent, an empty folder, or an earlier `kind`.

    An earlier `kind` holds every name in `markers`, no name outside `allowed`, and passes
    ``is_ours(path)`` (the kit's own marker inside a file, when given); anything else (a file, a
    folder with other content) is the user's and raises `FileExistsError`.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"cannot write {kind} at {path}: it is an existing file, not a folder. "
                              f"Nothing was changed; pick another path{hint}")
    names = {re.sub(r"\.tmp\d+$", "", p.name) for p in path.iterdir()}  # a killed write's temp file
    if not names or (markers <= names and names <= allowed and (is_ours is None or is_ours(path))):
        return
    foreign = sorted(names - allowed) or sorted(names)
    raise FileExistsError(
        f"refusing to write {kind} into {path}: the folder exists and is not {kind} written by sae_kit "
        f"(it holds {', '.join(repr(n) for n in foreign[:3])}{' ...' if len(foreign) > 3 else ''}). "
        f"Nothing was changed; pick a new or empty folder{hint}")


_HOST = re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname())[:40] or "host"


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.name}.sae-kit-{kind}-{_HOST}-{os.getpid()}")


def _stale_siblings(path: Path):
    """Siblings ``<name>.sae-kit-(tmp|old)-<host>-<pid>`` written on this host by a process that is gone."""
    pat = re.compile(re.escape(path.name) + r"\.sae-kit-(tmp|old)-(.+)-(\d+)")
    for p in path.parent.glob(glob_escape(path.name) + ".sae-kit-*"):
        m = pat.fullmatch(p.name)
        if m and m[2] == _HOST and (int(m[3]) == os.getpid() or not pid_alive(int(m[3]))):
            yield m[1], p


def glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def recover_stale(path: Path) -> None:
    """Put back an old version left by a killed replace, and delete dead writers' temp folders."""
    path = Path(path)
    if not path.parent.exists():
        return
    stale = list(_stale_siblings(path))
    olds = sorted((p for kind, p in stale if kind == "old"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        os.replace(olds.pop(), path)  # the newest complete old version becomes current again
    for _, p in stale:
        if p.exists() and p not in (path,):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def temp_sibling(path: Path) -> Path:
    """A fresh temporary folder beside `path` (stale ones are cleaned first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_stale(path)
    tmp = _sibling(path, "tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`, replacing an earlier version without a gap in which
    neither exists on disk under a name the kit can find (see the module docstring)."""
    fsync_tree(tmp)
    if path.exists():
        backup = _sibling(path, "old")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(path, backup)
        os.replace(tmp, path)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, path)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk (so a rename after it never exposes empty files)."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_bytes(path: Path, write) -> None:
    """Write a file through ``write(binary file)`` into a temporary sibling, fsync, rename into place."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


@contextlib.contextmanager
def locked(path: Path, what: str, timeout: float | None = None, beside: bool = True):
    """Hold an exclusive lock on `path` for the block.

    The lock file is ``<name>.lock`` beside `path` (`beside`: seen by every user of a shared folder),
    or one under the kit's cache named from the absolute path (no file left in the user's folder).

    A second process waits (printing who holds the lock) up to `timeout` seconds (None: forever),
    then raises `ArtefactBusyError` naming the holder. The OS releases the lock if its holder dies,
    so a killed run never blocks the next one.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if beside:
        lock_file = path.with_name(path.name + ".lock")
    else:
        from .config import cache_dir

        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        lock_file = cache_dir() / "locks" / f"{path.name[:40]}-{digest}.lock"
        lock_file.parent.mkdir(parents=True, exist_ok=True)
    info_file = lock_file.with_name(lock_file.name + ".json")
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _holder(info_file)
        print(f"sae_kit: waiting for {what} at {path}: another run is writing it ({holder})", file=sys.stderr)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise ArtefactBusyError(
                f"{what} at {path} is being written by another run ({holder}) and was not released within "
                f"{timeout:g} s; wait for that run to finish, or stop it") from None
    try:
        info_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                         "program": " ".join(sys.argv[:2])[:200]}))
        yield
    finally:
        info_file.unlink(missing_ok=True)
        lock.release()


def _holder(info_file: Path) -> str:
    try:
        h = json.loads(info_file.read_text())
        return f"pid {h['pid']} on {h['host']}, since {h['since']}, {h['program']}"
    except (OSError, ValueError, KeyError):
        return "a process that has not said who it is yet"
