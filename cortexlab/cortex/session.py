"""Per-session memory state of the sidecars: an LRU in memory, optionally persisted to disk.

A session's state is a flat ``dict[str, torch.Tensor]`` (e.g. ``"layer12.S"``,
``"layer12.conv"``; the store does not interpret the keys) plus a small ``dict[str, str]``
of metadata (tokens processed, config hash, ...).

With a ``directory``, every ``put`` writes ``<directory>/<session_id>.safetensors``
atomically (temp file in the same folder, fsync, ``os.replace``, fsync of the folder), so a
crash leaves either the old file or the new one, never half of one, and a new process with
a ``SessionStore`` on the same folder continues the session bit for bit (dtypes kept).
Sessions evicted from memory stay on disk and are reloaded by ``get``. Without a directory,
an evicted session is gone.

Memory: ``put`` keeps references to the given tensors (detached, made contiguous; no copy
when they already are) and ``get`` returns the stored tensors themselves unless
``copy=True``. Treat both as read-only: replace state tensors, never modify them in place.

Devices: tensors stay on their device while cached in memory; on disk they are CPU tensors,
so ``get`` after a reload returns CPU tensors. Callers move them with ``.to(device)``.

Concurrency: the store is thread-safe. ``lock(session_id)`` serialises work on one session
(a re-entrant lock per id) while different sessions run in parallel. Locks are per process;
two processes writing the same session never tear a file, but the last write wins.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save_file as _st_save_file

from cortexlab.checks import check_int

__all__ = ["SessionCorruptError", "SessionData", "SessionStore", "validate_session_id"]

FORMAT = "cortexlab.session/1"
SUFFIX = ".safetensors"
_ID_RULE = "1 to 128 characters from [A-Za-z0-9._-], not starting with '.'"
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class SessionCorruptError(ValueError):
    """A session file on disk cannot be read back; it is left untouched."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        session_id = self.path.name[: -len(SUFFIX)]
        super().__init__(
            f"session file {self.path} is corrupt ({reason}). It was left untouched: move it away to "
            f"inspect it, or call delete({session_id!r}) to discard it before storing a new state."
        )


class SessionData(NamedTuple):
    """What ``get`` returns; unpacks as ``state, metadata = store.get(...)``."""

    state: dict[str, torch.Tensor]
    metadata: dict[str, str]


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a safe file name stem, else raise TypeError/ValueError."""
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a str ({_ID_RULE}), got {type(session_id).__name__}")
    if not _ID_RE.fullmatch(session_id):
        raise ValueError(f"session_id must be {_ID_RULE}, got {session_id!r}")
    return session_id


def _check_state(state: object) -> dict[str, torch.Tensor]:
    """Validate a state dict; return its tensors detached and contiguous (no copy if already)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict[str, torch.Tensor], got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state keys must be str, got {key!r} of type {type(key).__name__}")
        if not key or key == "__metadata__":
            raise ValueError(f"state keys must be non-empty and not '__metadata__', got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if value.layout != torch.strided or value.is_meta or value.is_complex() or value.is_quantized:
            raise TypeError(f"state[{key!r}] must be a dense real tensor with data, got {value.dtype} "
                            f"{value.layout} on {value.device}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"state[{key!r}] contains NaN or infinite values")
        out[key] = value.detach().contiguous()
    return out


def _check_metadata(metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"metadata must be a dict[str, str] or None, got {metadata!r}")
    return dict(metadata)


def _read_header(f, path: Path) -> tuple[dict[str, str], int]:
    """Check a session file's header against its size; return (metadata, tensor bytes)."""
    size = os.fstat(f.fileno()).st_size
    try:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or 8 + n > size:
            raise ValueError("truncated, or not a safetensors file: bad header length")
        header = json.loads(f.read(n))
        info = header.pop("__metadata__", None) or {}
        if info.get("format") != FORMAT:
            raise ValueError(f"not a cortexlab session file: no format={FORMAT!r} in its metadata")
        metadata = _check_metadata(json.loads(info["metadata"]))
        offsets = [entry["data_offsets"] for entry in header.values()]
        if 8 + n + max((end for _, end in offsets), default=0) != size:
            raise ValueError("truncated: the file size does not match its header")
        return metadata, sum(end - start for start, end in offsets)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSON and Unicode errors are ValueErrors
        raise SessionCorruptError(path, str(e)) from e


def _fsync_dir(directory: Path) -> None:
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SessionStore:
    """Thread-safe LRU of at most ``capacity`` session states, persisted under ``directory`` if given.

    A corrupt file makes ``get``/``state_nbytes`` raise ``SessionCorruptError``, and ``put``
    refuses to overwrite it (the file may hold the only copy of a conversation) until
    ``delete(session_id)`` removes it (so a ``put`` to a session that is on disk but not in
    memory first reads and checks its file).
    """

    def __init__(self, capacity: int = 64, directory: str | os.PathLike | None = None):
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int >= 1, got {type(capacity).__name__}")
        check_int("capacity", capacity)
        self.capacity = capacity
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, SessionData] = OrderedDict()
        self._mutex = threading.RLock()  # guards _cache and _locks; never held while waiting on a session lock
        self._locks: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()

    def path(self, session_id: str) -> Path | None:
        """The file of ``session_id`` (which may not exist), or None without a directory."""
        sid = validate_session_id(session_id)
        return None if self.directory is None else self.directory / (sid + SUFFIX)

    @contextlib.contextmanager
    def lock(self, session_id: str) -> Iterator[None]:
        """Hold the (re-entrant) lock of one session: same-session callers wait, others do not."""
        sid = validate_session_id(session_id)
        with self._mutex:
            lk = self._locks.get(sid)
            if lk is None:
                lk = self._locks[sid] = threading.RLock()
        with lk:  # `lk` stays referenced while held or awaited, so the weak dict keeps it
            yield

    def get(self, session_id: str, *, copy: bool = False) -> SessionData | None:
        """Return ``(state, metadata)`` of a session, or None if it is unknown.

        The state tensors are the stored ones (do not modify them in place) unless ``copy=True``.
        Raises SessionCorruptError if the session's file cannot be read.
        """
        sid = validate_session_id(session_id)
        with self.lock(sid):
            with self._mutex:
                entry = self._cache.get(sid)
                if entry is not None:
                    self._cache.move_to_end(sid)
            if entry is None:
                entry = self._load(sid)
                if entry is None:
                    return None
                self._remember(sid, entry)
        state = {k: t.clone() if copy else t for k, t in entry.state.items()}
        return SessionData(state, dict(entry.metadata))

    def put(self, session_id: str, state: Mapping[str, torch.Tensor],
            metadata: Mapping[str, str] | None = None) -> None:
        """Store a session's state (replacing the old one); with a directory, write it to disk first.

        Everything is validated before anything changes: on any error the previous state
        stays, in memory and on disk.
        """
        sid = validate_session_id(session_id)
        tensors, metadata = _check_state(state), _check_metadata(metadata)
        with self.lock(sid):
            path = self.path(sid)
            if path is not None:
                with self._mutex:
                    cached = sid in self._cache
                if not cached:
                    self._load(sid)  # raises SessionCorruptError: never overwrite a file get() rejects
                self._write(path, tensors, metadata)
            self._remember(sid, SessionData(tensors, metadata))

    def delete(self, session_id: str) -> bool:
        """Forget a session in memory and on disk (a corrupt file too); return whether it existed."""
        sid = validate_session_id(session_id)
        with self.lock(sid):
            with self._mutex:
                found = self._cache.pop(sid, None) is not None
            path = self.path(sid)
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    found = True
                    _fsync_dir(self.directory)
        return found

    def reset(self, session_id: str) -> bool:
        """Same as ``delete``: the next ``get`` returns None and the session starts from scratch."""
        return self.delete(session_id)

    def state_nbytes(self, session_id: str) -> int:
        """Bytes of a session's state tensors (read from the file header if not in memory)."""
        sid = validate_session_id(session_id)
        with self.lock(sid):
            with self._mutex:
                entry = self._cache.get(sid)
            if entry is not None:
                return sum(t.nbytes for t in entry.state.values())
            path = self.path(sid)
            if path is not None:
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    return _read_header(f, path)[1]
        raise ValueError(f"session_id {sid!r} is unknown to this store")

    def list_sessions(self) -> list[str]:
        """Sorted ids of all sessions, in memory or on disk."""
        with self._mutex:
            ids = set(self._cache)
        if self.directory is not None:
            for name in os.listdir(self.directory):
                if name.endswith(SUFFIX) and _ID_RE.fullmatch(name[: -len(SUFFIX)]):
                    ids.add(name[: -len(SUFFIX)])
        return sorted(ids)

    def __contains__(self, session_id: object) -> bool:
        try:
            sid = validate_session_id(session_id)
        except (TypeError, ValueError):
            return False
        with self._mutex:
            if sid in self._cache:
                return True
        return self.directory is not None and self.path(sid).is_file()

    def __len__(self) -> int:
        return len(self.list_sessions())

    def __repr__(self) -> str:
        return f"SessionStore(capacity={self.capacity}, directory={self.directory})"

    # -- internals ------------------------------------------------------------------------

    def _remember(self, sid: str, entry: SessionData) -> None:
        with self._mutex:
            self._cache[sid] = entry
            self._cache.move_to_end(sid)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)

    def _load(self, sid: str) -> SessionData | None:
        path = self.path(sid)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                metadata, _ = _read_header(f, path)
                f.seek(0)
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            state = _check_state(_st_load(data))  # tensors own their memory (not the file's)
        except (SafetensorError, ValueError, TypeError) as e:
            raise SessionCorruptError(path, str(e)) from e
        return SessionData(state, metadata)

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        cpu, seen = {}, set()
        for key, t in tensors.items():
            t = t.cpu()
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr in seen:  # safetensors refuses tensors sharing memory
                t = t.clone()
            seen.add(ptr)
            cpu[key] = t
        info = {"format": FORMAT, "metadata": json.dumps(metadata, sort_keys=True)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.close(fd)
            _st_save_file(cpu, tmp, metadata=info)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
