"""On-disk feature cache.

One SQLite database (WAL mode) holds float32 feature vectors keyed by

    namespace  = backbone name | weights id | preprocessing (see ``Backbone.cache_namespace``)
    image key  = absolute path | file size | BLAKE2b digest of the file's bytes

so features are recomputed whenever the backbone, its weights, its preprocessing or the image
file's content changes - and only then: a dataset copied to the same path, re-mounted or
touched (new mtimes, same bytes) keeps its cached features. Hashing reads each file once
(about 1 s per GB), far less than decoding it. SQLite transactions make concurrent readers/writers from several processes safe:
a second process can neither corrupt the database nor read a half-written vector.

Each stored vector carries a BLAKE2b checksum of its key, dimension and bytes: an entry whose
bytes were changed (or that was written without one, by an older version) is not served - it
counts as missing, is recomputed and replaced, and a warning names the cache.

Location: ``$RESEND_CACHE`` if set, else ``~/.cache/resend_novelty``; pass ``None``/``False`` to
the feature extractor to disable caching.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = ["FeatureCache", "default_cache_dir", "image_key"]


def default_cache_dir() -> Path:
    env = os.environ.get("RESEND_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "resend_novelty"


def image_key(path: str | os.PathLike) -> str:
    """Key of an image file: resolved path, size and a digest of its content."""
    p = os.path.realpath(path)
    with open(p, "rb") as fh:
        digest = hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16))
        size = fh.tell()
    return f"{p}|{size}|{digest.hexdigest()}"


def _switch_to_wal(conn: sqlite3.Connection, timeout: float = 60.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried: while another process creates the same new database
    and switches it to WAL, SQLite answers "database is locked" at once (the busy timeout does
    not cover a journal-mode change), e.g. when the shards of one ``torchrun`` open a new cache."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


_CHECK = 8  # bytes of the per-entry checksum, stored after the float32 data


def _checksum(key: str, dim: int, data: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=_CHECK)
    h.update(f"{key}|{dim}|".encode())
    h.update(data)
    return h.digest()


def _ns_id(namespace: str) -> str:
    return hashlib.sha256(namespace.encode()).hexdigest()[:24]


class FeatureCache:
    """Feature store: ``get_many(namespace, keys)`` / ``put_many(namespace, keys, array)``."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "features.sqlite"
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None

    # A connection must not cross fork(): reopen lazily in each process.
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            _switch_to_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS features ("
                " ns TEXT NOT NULL, key TEXT NOT NULL, dim INTEGER NOT NULL, data BLOB NOT NULL,"
                " PRIMARY KEY (ns, key))"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS namespaces (ns TEXT PRIMARY KEY, description TEXT)"
            )
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __getstate__(self):
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.__init__(state["directory"])

    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors for those of ``keys`` that are present."""
        ns = _ns_id(namespace)
        out: dict[str, np.ndarray] = {}
        bad = 0
        keys = list(keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            q = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT key, dim, data FROM features WHERE ns=? AND key IN ({q})", [ns, *chunk]
            ).fetchall()
            for key, dim, blob in rows:
                data, check = blob[:-_CHECK], blob[-_CHECK:]
                if (len(blob) != 4 * dim + _CHECK
                        or check != _checksum(key, dim, data)):  # changed, or an old entry
                    bad += 1
                    continue
                out[key] = np.frombuffer(data, dtype=np.float32)
        if bad:
            warnings.warn(f"{bad} feature cache entr{'y' if bad == 1 else 'ies'} in {self.path} "
                          "failed their checksum (changed, or written by an older version): "
                          "recomputed", stacklevel=2)
        return out

    def put_many(self, namespace: str, keys: Iterable[str], features: np.ndarray) -> None:
        ns = _ns_id(namespace)
        feats = np.ascontiguousarray(features, dtype=np.float32)
        rows = [(ns, k, int(f.shape[0]), f.tobytes() + _checksum(k, int(f.shape[0]), f.tobytes()))
                for k, f in zip(keys, feats)]
        for attempt in range(5):
            try:
                with self.conn:  # one transaction: all or nothing
                    self.conn.execute("BEGIN IMMEDIATE")
                    self.conn.execute(
                        "INSERT OR IGNORE INTO namespaces VALUES (?, ?)", (ns, namespace)
                    )
                    self.conn.executemany("INSERT OR REPLACE INTO features VALUES (?,?,?,?)", rows)
                return
            except sqlite3.OperationalError as exc:  # database locked by another writer
                if "locked" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def count(self, namespace: str | None = None) -> int:
        if namespace is None:
            return self.conn.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        return self.conn.execute(
            "SELECT COUNT(*) FROM features WHERE ns=?", (_ns_id(namespace),)
        ).fetchone()[0]
