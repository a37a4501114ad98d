"""What flexgen keeps in an offload directory, and how processes share one safely.

    weights/<key>/                 a weight store; its manifest.json says flexgen wrote it
    weights/<key>.lock             flock: exclusive while building the store, shared while a run uses it
    weights/.build-<key>-<pid>-<start>-*/   a store being built, renamed into place when complete
    run-<pid>-<start>-*/           one run's KV-cache / activation / dummy-weight files (+ a marker)

A process is named by its pid and its start time (from /proc), so a recycled pid is never
taken for the dead run that made a directory, and a live run's directory is never touched.
Offload directories are often shared and sit next to user data: only directories that
match these names *and* carry flexgen's marker are removed, and inside them only the files
flexgen writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from flexgen.errors import FlexGenError

RUN_MARKER = ".flexgen-run"
BUILD_MARKER = ".flexgen-build"
STORE_FORMAT = "flexgen-weight-store"
_RUN_RE = re.compile(r"run-(\d+)-(\d+)-\w+")
_BUILD_RE = re.compile(r"\.build-(.+)-(\d+)-(\d+)-\w+")
_STORE_FILE_RE = re.compile(r"layer_\d{4}\.bin|manifest\.json(\.tmp)?")


# ---------------------------------------------------------------------------------------
# Processes.

def process_start(pid: int) -> Optional[int]:
    """Start time of a live process in clock ticks since boot (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if not Path("/proc/self/stat").exists():  # no procfs: fall back to "the pid exists"
            try:
                os.kill(pid, 0)
                return 0
            except ProcessLookupError:
                return None
            except PermissionError:
                return 0
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    if fields[0] == "Z":  # a zombie has released nothing yet, but it is not running either
        return None
    return int(fields[19])


def alive(pid: int, start: int) -> bool:
    now = process_start(pid)
    return now is not None and (now == start or now == 0 or start == 0)


def _tag() -> str:
    pid = os.getpid()
    return f"{pid}-{process_start(pid) or 0}"


# ---------------------------------------------------------------------------------------
# Run directories.

def make_run_dir(root: Path) -> Path:
    """A fresh run directory, named after this process and marked as flexgen's."""
    d = Path(tempfile.mkdtemp(prefix=f"run-{_tag()}-", dir=root))
    (d / RUN_MARKER).write_text(json.dumps({"pid": os.getpid()}) + "\n")
    return d


def _dead_owner(d: Path, regex: re.Pattern, marker: str) -> bool:
    """Made by flexgen (its name and marker; or empty: killed before the marker) for a dead process."""
    m = regex.fullmatch(d.name)
    if m is None or not d.is_dir() or d.is_symlink():
        return False
    pid, start = int(m.group(m.lastindex - 1)), int(m.group(m.lastindex))
    return not alive(pid, start) and ((d / marker).is_file() or not any(d.iterdir()))


def stale_runs(root: Path) -> list[Path]:
    """Run directories of processes that are gone (killed, crashed), flexgen's only."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [d for d in sorted(root.glob("run-*")) if _dead_owner(d, _RUN_RE, RUN_MARKER)]


def remove_stale_runs(root: Path) -> list[tuple[Path, int]]:
    """Remove the run directories of dead processes; returns (directory, bytes freed)."""
    out = []
    for d in stale_runs(root):
        n = tree_bytes(d)
        shutil.rmtree(d, ignore_errors=True)
        out.append((d, n))
    return out


def tree_bytes(d: Path) -> int:
    """Bytes allocated on disk under d (sparse files count what they use)."""
    total = 0
    for f in Path(d).rglob("*"):
        try:
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_blocks * 512
        except OSError:
            pass
    return total


# ---------------------------------------------------------------------------------------
# Locks.

class FileLock:
    """An flock on a lock file; released by `release` or when the process dies."""

    def __init__(self, path: Path, fd: int, shared: bool):
        self.path, self.fd, self.shared = path, fd, shared

    def downgrade(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        self.shared = True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def lock(path: Path, *, shared: bool = False, wait: bool = True) -> Optional[FileLock]:
    """Take an flock on `path` (created if missing); None when `wait` is False and it is held."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FlexGenError(f"cannot create lock file {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
            # `clean` unlinks a store's lock file under the exclusive lock: a lock taken on
            # the unlinked file guards nothing, so take it again on the current one.
            st = os.fstat(fd)
            try:
                same = os.stat(path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if same:
            return FileLock(Path(path), fd, shared)
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Weight stores.

def read_manifest(d: Path) -> Optional[dict]:
    """The manifest of a flexgen weight store in d, or None if d is not one."""
    try:
        m = json.loads((Path(d) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    # Stores written before the format marker: the same three keys, nothing else.
    if m.get("format") == STORE_FORMAT or set(m) == {"version", "source", "layers"}:
        return m
    return None


def remove_store_files(d: Path) -> bool:
    """Delete the files flexgen writes into a store directory, then the directory if empty.

    Returns False when other files remain (someone put them there: they are kept).
    """
    d = Path(d)
    for f in d.iterdir():
        if _STORE_FILE_RE.fullmatch(f.name) and f.is_file() and not f.is_symlink():
            f.unlink()
    try:
        d.rmdir()
    except OSError:
        return False
    return True


def open_store(weights: Path, key: str, valid: Callable[[Path], bool], build: Callable[[Path], None],
               log: Callable[[str], None]) -> FileLock:
    """Make sure weights/<key> is a complete store and return a shared lock on it.

    Several processes may ask at once: one builds (under an exclusive lock, into a
    temporary directory renamed into place when complete), the others wait and re-use it.
    The shared lock, held while the store is in use, keeps `clean` from removing it.
    """
    try:
        weights.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlexGenError(f"cannot create {weights}: {e.strerror}") from None
    path, lock_path = weights / key, weights / f"{key}.lock"
    while True:
        lk = lock(lock_path, shared=True, wait=False)
        if lk is not None:
            if valid(path):
                return lk
            lk.release()
        lk = lock(lock_path, wait=False)
        if lk is None:
            log(f"waiting for another process to finish building weight store {path} ...")
            lk = lock(lock_path)
        try:
            if not valid(path):
                _build(weights, key, path, build)
            lk.downgrade()  # not atomic: re-checked below
        except BaseException:
            lk.release()
            raise
        if valid(path):
            return lk
        lk.release()


def _build(weights: Path, key: str, path: Path, build: Callable[[Path], None]) -> None:
    for d in weights.glob(f".build-{glob_escape(key)}-*"):
        if _dead_owner(d, _BUILD_RE, BUILD_MARKER):  # a build killed part-way
            shutil.rmtree(d, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-{_tag()}-", dir=weights))
    except OSError as e:
        raise FlexGenError(f"cannot create weight store in {weights}: {e.strerror}") from None
    try:
        (tmp / BUILD_MARKER).touch()
        build(tmp)
        (tmp / BUILD_MARKER).unlink()
        if path.exists() and not (path.is_dir() and remove_store_files(path)):
            raise FlexGenError(f"{path} is in the way of the weight store and holds files flexgen did not "
                               "write; move it away")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def in_use(weights: Path, key: str) -> bool:
    """Whether a live process holds the store's lock (building or running on it)."""
    p = Path(weights) / f"{key}.lock"
    if not p.exists():
        return False
    lk = lock(p, wait=False)
    if lk is None:
        return True
    lk.release()
    return False


# ---------------------------------------------------------------------------------------
# `flexgen clean`.

@dataclass(frozen=True)
class Removal:
    path: Path
    nbytes: int
    why: str


def plan_clean(root: Path, *, stale_only: bool,
               store_stale: Callable[[dict], Optional[str]]) -> tuple[list[Removal], list[str]]:
    """What `clean` removes under an offload directory, and notes on what it keeps.

    store_stale(manifest) says why a store is stale (its checkpoint is gone or changed),
    or None. Without stale_only every store flexgen made is removed (unless in use).
    """
    root = Path(root)
    out, notes = [], []
    for d in stale_runs(root):
        out.append(Removal(d, tree_bytes(d), "run directory of a process that is gone"))
    weights = root / "weights"
    if not weights.is_dir():
        return out, notes
    for d in sorted(weights.glob(".build-*")):
        if _dead_owner(d, _BUILD_RE, BUILD_MARKER):
            out.append(Removal(d, tree_bytes(d), "unfinished store of a process that is gone"))
    for d in sorted(weights.iterdir()):
        if d.name.startswith(".") or not d.is_dir() or d.is_symlink():
            continue
        m = read_manifest(d)
        if m is None:
            continue  # not ours: never touched
        why = store_stale(m) if "source" in m else None
        if stale_only and why is None:
            continue
        if in_use(weights, d.name):
            notes.append(f"kept {d}: in use by a running process")
            continue
        out.append(Removal(d, tree_bytes(d), why or "weight store"))
    return out, notes


def remove(item: Removal) -> Optional[str]:
    """Remove one planned item; returns a note when something had to be kept."""
    d = item.path
    if d.parent.name == "weights" and not d.name.startswith("."):
        lk = lock(d.parent / f"{d.name}.lock", wait=False)
        if lk is None:
            return f"kept {d}: in use by a running process"
        try:
            if not remove_store_files(d):
                return f"kept {d}: it holds files flexgen did not write (its own files were removed)"
            (d.parent / f"{d.name}.lock").unlink(missing_ok=True)
        finally:
            lk.release()
        return None
    shutil.rmtree(d, ignore_errors=True)
    return None
