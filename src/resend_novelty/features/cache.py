"""On-disk feature cache.

One SQLite database (WAL mode) holds float32 feature vectors keyed by

    namespace  = backbone name | weights id | preprocessing (see ``Backbone.cache_namespace``)
    image key  = absolute path | file size | BLAKE2b digest of the file's bytes

so features are recomputed whenever the backbone, its weights, its preprocessing or the image
file's content changes - and only then: a dataset copied to the same path, re-mounted or
touched (new mtimes, same bytes) keeps its cached features. Hashing reads each file once
(about 1 s per GB), far less than decoding it. SQLite transactions make concurrent readers/writers from several processes safe:
a second process can neither corrupt the database nor read a half-written vector.

Location: ``$RESEND_CACHE`` if set, else ``~/.cache/resend_novelty``; pass ``None``/``False`` to
the feature extractor to disable caching.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
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
        keys = list(keys)
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            q = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT key, dim, data FROM features WHERE ns=? AND key IN ({q})", [ns, *chunk]
            ).fetchall()
            for key, dim, blob in rows:
                vec = np.frombuffer(blob, dtype=np.float32)
                if vec.shape[0] != dim:  # cannot happen with transactions; be loud if it does
                    raise RuntimeError(f"feature cache entry is corrupt: {key} in {self.path}")
                out[key] = vec
        return out

    def put_many(self, namespace: str, keys: Iterable[str], features: np.ndarray) -> None:
        ns = _ns_id(namespace)
        feats = np.ascontiguousarray(features, dtype=np.float32)
        rows = [(ns, k, int(f.shape[0]), f.tobytes()) for k, f in zip(keys, feats)]
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
