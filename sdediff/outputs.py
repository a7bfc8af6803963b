"""The one writer of every command's files: a lock per output directory, atomic output sets, and every
I/O fault as one line.

* **One owner per output directory** — :func:`lock_output` takes an advisory lock on
  ``<out_dir>/.sdediff.lock`` (``fcntl.flock`` on a file that records the holder's pid, host, command
  and start time). A second writer gets :class:`OutputLocked` naming the holder before it writes
  anything. The kernel drops a ``flock`` when its process dies, so a lock file left by a killed run is
  stale by construction: the next run takes it over. The lock is re-entrant within a process (the CLI
  and the :func:`sdediff.train` it calls share it).
* **Atomic files** — :func:`atomic_write` is the only function that puts bytes on disk: a temporary
  sibling, written, ``fsync``-ed, then ``os.replace``-d over the target. A crash or a full disk leaves the
  old file whole (and at most a ``.<name>.tmp-<pid>`` that the next run removes).
* **Atomic output sets** — inside :func:`output_set`, :func:`write_output` stages each file of the
  directory in a hidden staging folder; only when the block ends without an error are they renamed into
  place, each old file kept (hard link) until every rename succeeded, so that a failure at any point —
  while writing, or half-way through the renames — puts the previous files back: the directory holds the
  previous complete set or the new complete set, never a mix.
* **One line for every fault** — every ``OSError`` while writing becomes an :class:`OutputError` that
  names the path and the reason (``str(e)`` is one line); the command-line tools print it and exit
  with status 1 (status 2 stays for bad input).

Library code below the CLI uses :func:`atomic_write` / :func:`write_output` / :func:`append_text`; it
never opens an output file itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArgumentError

__all__ = [
    "LOCK_NAME",
    "OutputError",
    "OutputLocked",
    "atomic_write",
    "write_output",
    "append_text",
    "set_aside",
    "lock_output",
    "output_set",
    "lock_holder",
    "figure_bytes",
    "csv_text",
    "npz_bytes",
]

LOCK_NAME = ".sdediff.lock"
_STAGING = ".sdediff-staging-"


class OutputError(OSError):
    """Writing an output failed (a full disk, a read-only or vanished directory...): one line that names
    the path and the reason (an ``OSError``, so callers that catch those still do). Not a ConfigError:
    the input was fine, the file system was not."""

    def __init__(self, path: str | os.PathLike, error: BaseException | str, doing: str = "write"):
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        code = error.errno if isinstance(error, OSError) else None
        tag = f" [Errno {code}]" if code else ""
        self.message = " ".join(f"cannot {doing} {path}: {reason}{tag}".split())
        super().__init__(self.message)
        self.errno, self.strerror, self.filename, self.reason = code, reason, str(path), reason
        self.path = str(path)

    def __str__(self) -> str:
        return self.message


class OutputLocked(ArgumentError):
    """Another live process owns the output directory (bad input: exit 2, nothing written)."""

    def __init__(self, out_dir: Path, holder: dict):
        self.holder = holder
        who = f"{holder.get('prog', 'another sdediff command')} (pid {holder.get('pid', '?')}"
        who += f" on {holder.get('host', '?')}"
        if holder.get("started"):
            who += f", since {holder['started']}"
        super().__init__(
            "out_dir",
            str(out_dir),
            f"is being written by {who}); wait for it to finish or choose another out_dir",
        )


# ------------------------------------------------------------------------------------------------
# the one helper that writes bytes
# ------------------------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (a fresh temporary name) with ``data``, flushed to disk. The fault-injection
    tests patch this function: every byte an sdediff command writes goes through it."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, ``os.replace``); on any
    ``OSError`` the old file is untouched, the temporary removed and :class:`OutputError` raised."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(tmp, _as_bytes(data))
        _replace(tmp, path)
    except OSError as e:
        raise OutputError(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()
    return path


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to a log file (``metrics.csv``): a failed append names the file in one line."""
    path = Path(path)
    try:
        _append(path, text)
    except OSError as e:
        raise OutputError(path, e) from None


def set_aside(path: str | os.PathLike, why: str) -> Path | None:
    """Rename a damaged file to ``<name>.corrupt-<n>`` (kept for inspection, out of the way); returns the
    new path (None when ``path`` does not exist)."""
    path = Path(path)
    if not path.exists():
        return None
    n = 1
    while (new := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    try:
        _replace(path, new)
    except OSError as e:
        raise OutputError(path, e, f"set aside ({why})") from None
    return new


def figure_bytes(fig, fmt: str = "png", dpi: int = 120) -> bytes:
    """A matplotlib figure rendered in memory (written with :func:`write_output`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    return buf.getvalue()


def csv_text(rows, columns) -> str:
    """Rows (dicts) as CSV text with a header (written with :func:`write_output`)."""
    import csv

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def npz_bytes(**arrays) -> bytes:
    """``numpy.savez_compressed`` in memory."""
    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# one owner per output directory
# ------------------------------------------------------------------------------------------------
_HELD: dict[Path, list] = {}  # resolved out_dir -> [fd, depth]


def lock_holder(out_dir: str | os.PathLike) -> dict | None:
    """What ``<out_dir>/.sdediff.lock`` says about its holder when a live process holds it, else None."""
    path = Path(out_dir) / LOCK_NAME
    if not path.exists():
        return None
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it: a stale file of a dead process
    finally:
        os.close(fd)


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def lock_output(out_dir: str | os.PathLike | None, prog: str = "sdediff") -> Iterator[Path | None]:
    """Own ``out_dir`` for the block (see the module docstring). Creates the directory when needed and
    removes it again when the block leaves it empty (a run refused before writing leaves nothing).

    Raises:
        OutputLocked: another live process holds the directory.
        ArgumentError: ``out_dir`` is a file.
        OutputError: the directory cannot be created or the lock file written.
    """
    if out_dir is None:
        yield None
        return
    import fcntl

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArgumentError("out_dir", str(out), "must be a directory (it is a file); choose another path")
    key = out.resolve()
    if key in _HELD:  # re-entrant within this process
        _HELD[key][1] += 1
        try:
            yield out
        finally:
            _HELD[key][1] -= 1
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(out, e, "create the output directory") from None
    path = out / LOCK_NAME
    fd = None
    try:
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                fd = None
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputLocked(out, _read_holder(path)) from None
                raise
            try:  # the file we locked may have been unlinked by a holder that just finished: retry
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        else:
            raise OutputLocked(out, _read_holder(path))
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "prog": prog,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
    except OSError as e:
        if fd is not None:
            os.close(fd)
        _drop_if_empty(out, created)
        raise OutputError(path, e, "take the lock") from None
    _HELD[key] = [fd, 1]
    try:
        yield out
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # releases the flock
        _drop_if_empty(out, created)


def _drop_if_empty(out: Path, created: bool) -> None:
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty


# ------------------------------------------------------------------------------------------------
# atomic output sets
# ------------------------------------------------------------------------------------------------
@dataclass
class _Set:
    out: Path
    staging: Path
    files: dict[str, Path] = field(default_factory=dict)  # final name -> staged path


_ACTIVE: contextvars.ContextVar[tuple[_Set, ...]] = contextvars.ContextVar("sdediff_output_sets", default=())


def _set_for(directory: Path) -> _Set | None:
    sets = _ACTIVE.get()
    if not sets:
        return None
    d = directory.resolve()
    return next((s for s in reversed(sets) if s.out.resolve() == d), None)


def write_output(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write one output file: staged into the active :func:`output_set` when ``path`` lies directly in
    its directory (renamed into place with the rest of the set), else :func:`atomic_write`. Returns
    ``path`` (where the file will be)."""
    path = Path(path)
    s = _set_for(path.parent)
    if s is None:
        return atomic_write(path, data)
    try:
        s.staging.mkdir(parents=True, exist_ok=True)
        _write_file(s.staging / path.name, _as_bytes(data))
    except OSError as e:
        raise OutputError(path, e) from None
    s.files[path.name] = s.staging / path.name
    return path


@contextlib.contextmanager
def output_set(out_dir: str | os.PathLike | None) -> Iterator[Path | None]:
    """Stage every :func:`write_output` into ``out_dir`` during the block; commit them together when it
    ends without an exception, discard them otherwise (see the module docstring)."""
    if out_dir is None or _set_for(Path(out_dir)) is not None:  # nested: the outer set commits
        yield None if out_dir is None else Path(out_dir)
        return
    out = Path(out_dir)
    clean_staging(out)
    s = _Set(out, out / f"{_STAGING}{os.getpid()}")
    token = _ACTIVE.set((*_ACTIVE.get(), s))
    try:
        yield out
        _ACTIVE.reset(token)
        token = None
        if s.files:
            _commit(s)
    finally:
        if token is not None:
            _ACTIVE.reset(token)
        shutil.rmtree(s.staging, ignore_errors=True)


def _commit(s: _Set) -> None:
    """Rename the staged files into place; on a failure put every old file back (kept as hard links in
    the staging folder until all renames succeeded)."""
    backup = s.staging / ".old"
    try:
        backup.mkdir(exist_ok=True)
        for name in s.files:
            if (s.out / name).exists():
                os.link(s.out / name, backup / name)
    except OSError as e:
        raise OutputError(s.out, e, "keep the previous outputs of") from None
    done: list[str] = []
    try:
        for name, staged in s.files.items():
            _replace(staged, s.out / name)
            done.append(name)
    except OSError as e:
        failed = s.out / next(n for n in s.files if n not in done)
        problems = []
        for name in reversed(done):
            try:
                if (backup / name).exists():
                    os.replace(backup / name, s.out / name)
                else:
                    (s.out / name).unlink()
            except OSError as e2:
                problems.append(f"{name}: {e2.strerror or e2}")
        if problems:  # the old files stay in the staging folder: say where
            keep = s.staging.with_name(f".sdediff-previous-{os.getpid()}")
            with contextlib.suppress(OSError):
                os.replace(backup, keep)
            raise OutputError(
                failed,
                f"{e.strerror or e}; restoring the previous files failed too ({'; '.join(problems)}), "
                f"they are in {keep}",
            ) from None
        raise OutputError(failed, e) from None


def clean_staging(out_dir: str | os.PathLike) -> list[Path]:
    """Remove staging folders and temporary files that dead processes left in ``out_dir``."""
    out = Path(out_dir)
    removed = []
    if not out.is_dir():
        return removed
    for p in out.iterdir():
        pid = None
        if p.name.startswith(_STAGING):
            pid = p.name[len(_STAGING) :]
        elif p.name.startswith(".") and ".tmp-" in p.name:
            pid = p.name.rsplit(".tmp-", 1)[1]
        if pid is None or not pid.isdigit() or process_alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (ours always does; one we may not signal does too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
