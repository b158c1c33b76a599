"""One store for everything: a URI that holds the memory banks, the decoders and the locks, so any worker or server
that sees the banks sees their decoders.

A store is a local folder or an object-store prefix (``s3://bucket/prefix``, ``gs://...``, ``az://...``):

    <uri>/<bank>.lance              a memory bank (LanceDB table)
    <uri>/_decoders.lance           decoder records: bank, id, status, scores, lineage (LanceDB table)
    <uri>/_current.lance            each bank's current decoder and the ones before it (LanceDB table)
    <uri>/_evalsets.lance           each bank's fixed evaluation sets (LanceDB table)
    <uri>/_lock-<name>.lance        one lease lock per name (a one-row LanceDB table)
    <uri>/_decoders/<bank>/<id>/    decoder files (config.json, model.safetensors, vocab.json, meta.json)
    <uri>/_evalsets/<bank>/<id>/    files of image evaluation sets (annotations, images)

LanceDB opens the tables and pyarrow's filesystem layer moves the files, both from the same URI. Object-store
credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``AWS_ALLOW_HTTP``, ...), which both read.

Writers take a :meth:`Store.lock`: a lease kept in a one-row LanceDB table and taken by compare-and-swap on a
counter (LanceDB retries conflicting ``merge_insert`` updates against the newest version, so exactly one of
several concurrent swaps succeeds; measured: 3 processes x 40 swaps, 74 wins, no lost update). A lease expires after
``ttl`` seconds, so a writer that died does not block the others for longer than that.

While the ``with`` block runs, a daemon thread renews the lease (the same compare-and-swap on the token) every
``renew_every`` seconds (``ttl / 3`` by default), so a long write keeps it. A holder that stalls past the ttl
(a paused process, a stopped VM, a store it cannot reach) can find that another writer took the lease over: the
yielded :class:`Lease` then reads ``lost`` and its :meth:`Lease.check` raises :class:`LeaseLost`. Writers call
``check()`` immediately before their commit point (a bank's chunk write, a registry's pointer swap), so a holder
that lost its lease raises instead of writing. ``check()`` renews at once when the heartbeat looks late (under half
the ttl left), so a holder just woken from a stall learns the truth before it commits. (A pause between ``check()``
and the commit itself stays possible, as with any lease without fencing; it is bounded by keeping commits short.)

On S3 the compare-and-swap is as safe as LanceDB's commits, which write each version's manifest with a conditional
PUT (``If-None-Match: *``): atomic on AWS S3 and on S3-compatible servers that honour it (moto does; measured there:
3 processes x 30 swaps, 68-73 wins, no lost update, and 90 of 90 concurrent appends kept). A server that ignores the
header loses commits silently (moto with the header stripped: 37 of 78 swaps and 39 of 90 appends lost), so do not
run concurrent writers against one. Table creations in an object store take turns on the store's ``create`` lease
(:meth:`Store.creating`); only that lease's own table, made once per store, is created unguarded.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from decapflow.config import store_uri
from decapflow.errors import BankError

__all__ = ["Lease", "LeaseLost", "Store", "StoreLocked", "get_store"]

CREATE_LOCK = "create"  # the lease that table creations in an object store take turns on
LOCK_SCHEMA = pa.schema([("name", pa.string()), ("holder", pa.string()), ("expires", pa.float64()),
                         ("token", pa.int64())])


class StoreLocked(BankError):
    """A lock stayed held by another writer for longer than the wait allowed."""


class LeaseLost(BankError):
    """A holder's lease lapsed (it stalled past the ttl) and was taken over, or could not be renewed: it must not
    commit."""


class Lease(str):
    """What :meth:`Store.lock` yields: the holder id (a str, as it always was) of a lease that a heartbeat renews.

    ``lost`` turns True once a renewal finds the lease gone; :meth:`check` raises :class:`LeaseLost` then."""

    name: str  # the lock's name
    ttl: float
    token: int  # the lock row's counter as this holder last swapped it
    expires: float  # time.time() at which the lease lapses unless renewed
    lost: bool
    taken_by: str | None  # who held the lock when this holder found it lost
    released: bool

    def __new__(cls, holder: str, name: str, table: Any, token: int, expires: float, ttl: float) -> Lease:
        lease = super().__new__(cls, holder)
        lease.name, lease.ttl, lease.token, lease.expires = name, ttl, token, expires
        lease.lost, lease.taken_by, lease.released = False, None, False
        lease._table, lease._mutex = table, threading.Lock()  # the mutex orders renewals against the release
        return lease

    @property
    def holder(self) -> str:
        return str.__str__(self)

    def renew(self) -> bool:
        """Extend the lease to ``ttl`` seconds from now by compare-and-swap on its token; False once it is lost."""
        with self._mutex:
            if self.lost or self.released:
                return not self.lost
            now = time.time()
            try:
                swapped = Store._swap(self._table, self.token, self.holder, now + self.ttl, self.token + 1)
            except Exception:  # noqa: BLE001 - the store did not answer: try again later, give up once expired
                swapped = None
            if swapped:
                self.token, self.expires = self.token + 1, now + self.ttl
            elif swapped is False or time.time() > self.expires:
                self._lose()
            return not self.lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the lease is still held. Call it immediately before committing."""
        if not self.lost and time.time() > self.expires - self.ttl / 2:
            self.renew()  # the heartbeat is late (this process stalled?): ask the store now
        if self.lost:
            by = f"taken over by {self.taken_by}" if self.taken_by else "expired without a renewal"
            raise LeaseLost(f"lock {self.name!r} of holder {self.holder} was lost ({by}); not committing")

    def _lose(self) -> None:
        self.lost = True
        try:
            self._table.checkout_latest()
            self.taken_by = self._table.to_arrow().to_pylist()[0]["holder"] or None
        except Exception:  # noqa: BLE001 - who holds it now is only for the message
            self.taken_by = None

    def _beat(self, every: float, stop: threading.Event) -> None:
        while not stop.wait(every) and self.renew():
            pass


class Store:
    """A store URI opened twice: as a LanceDB database and as a pyarrow filesystem rooted at the same place."""

    def __init__(self, uri: str | None = None) -> None:
        import lancedb

        self.uri = store_uri(uri)
        self.local = "://" not in self.uri or self.uri.startswith("file://")
        if self.local:
            self.uri = str(Path(self.uri.removeprefix("file://")).expanduser().resolve())
            Path(self.uri).mkdir(parents=True, exist_ok=True)
            self.fs, self.root = pafs.LocalFileSystem(), self.uri
        else:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
        self.db = lancedb.connect(self.uri)
        self.key = hashlib.sha1(self.uri.encode()).hexdigest()[:12]  # names this store in local caches

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    # ------------------------------------------------------------------ files
    def path(self, *parts: str) -> str:
        """A path inside the store, for :attr:`fs`."""
        return "/".join([self.root.rstrip("/"), *parts])

    def local_path(self, *parts: str) -> Path | None:
        """The same path as a local :class:`Path` when the store is a local folder, else None."""
        return Path(self.path(*parts)) if self.local else None

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def put_dir(self, local: Path, dest: str) -> None:
        """Copy the files of local folder ``local`` (not recursive) to store folder ``dest``."""
        self.fs.create_dir(dest, recursive=True)
        for file in sorted(p for p in Path(local).iterdir() if p.is_file()):
            pafs.copy_files(str(file), f"{dest}/{file.name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)

    def get_dir(self, src: str, local: Path) -> Path:
        """Copy store folder ``src`` to local folder ``local`` (written beside it, then renamed into place)."""
        local = Path(local)
        if local.is_dir():
            return local
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        for info in self.fs.get_file_info(pafs.FileSelector(src)):
            if info.type == pafs.FileType.File:
                pafs.copy_files(info.path, str(tmp / info.base_name), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
        try:
            os.replace(tmp, local)
        except OSError:  # another process fetched it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return local

    def remove_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def list_dirs(self, path: str) -> list[str]:
        """Names of the folders directly under ``path`` (none when it does not exist)."""
        if not self.exists(path):
            return []
        return sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(path))
                      if i.type == pafs.FileType.Directory)

    # ------------------------------------------------------------------ tables
    @contextmanager
    def creating(self) -> Iterator[None]:
        """Hold while creating a table. LanceDB 0.40 does not make creation atomic: two processes (or threads)
        creating one table at once can both succeed, the second as an *overwrite* of the first (measured locally:
        4 of 10 three-way races; on S3 (moto), 7 of 125, the overwriting create coming back at version 2), which
        would reset a lock or drop a bank's first rows. So creations take turns: on a file lock in a local store,
        on the store's ``create`` lease (:meth:`lock`) in an object store."""
        if not self.local:
            with self.lock(CREATE_LOCK):
                yield
            return
        import fcntl

        with open(Path(self.root) / ".decapflow-create.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def table(self, name: str, schema: pa.Schema, data: pa.Table | None = None) -> Any:
        """Open LanceDB table ``name``, creating it (with ``data``, or empty) when it does not exist yet."""
        try:
            return self.db.open_table(name)
        except (FileNotFoundError, ValueError):
            pass
        if not self.local and name == f"_lock-{CREATE_LOCK}":
            return self._create_unguarded(name, schema, data)
        with self.creating():
            try:
                return self.db.open_table(name)  # created while this one waited
            except (FileNotFoundError, ValueError):
                return self.db.create_table(name, data=data, schema=schema)

    def _create_unguarded(self, name: str, schema: pa.Schema, data: pa.Table | None) -> Any:
        """Create the one table that creations cannot take turns on (the ``create`` lease's, made once per object
        store). A creation that landed on top of a concurrent one (version > 1) puts that one back."""
        try:
            table = self.db.create_table(name, data=data, schema=schema)
        except ValueError:  # "already exists": another process made it a moment ago
            return self.db.open_table(name)
        if int(table.version) > 1:
            try:
                table.restore(int(table.version) - 1)
            except Exception as error:  # noqa: BLE001
                if not _conflict(error):
                    raise
                return self.db.open_table(name)  # the other creator moved on; its version stands
        return table

    # ------------------------------------------------------------------ locks
    @contextmanager
    def lock(self, name: str, *, timeout: float = 600.0, ttl: float = 120.0, renew_every: float | None = None,
             heartbeat: bool = True) -> Iterator[Lease]:
        """Hold the lease ``name`` (one writer at a time across processes and machines) for the ``with`` block.

        Waits up to ``timeout`` seconds for another holder, then raises :class:`StoreLocked` naming it. The lease
        lasts ``ttl`` seconds and a heartbeat thread renews it every ``renew_every`` seconds (``ttl / 3``); with
        ``heartbeat=False`` it simply lapses after ``ttl``. Yields a :class:`Lease` (the holder id, a str): call its
        :meth:`Lease.check` right before committing."""
        table = self.table(f"_lock-{name}", LOCK_SCHEMA,
                           pa.table({"name": ["lock"], "holder": [""], "expires": [0.0], "token": [0]},
                                    schema=LOCK_SCHEMA))
        me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + timeout
        pause = 0.02
        while True:
            table.checkout_latest()
            row = table.to_arrow().to_pylist()[0]
            now = time.time()
            if not row["holder"] or row["expires"] < now:
                token = row["token"] + 1
                if self._swap(table, row["token"], me, now + ttl, token):
                    break
            elif time.monotonic() > deadline:
                raise StoreLocked(f"{name!r} in store {self.uri} is held by {row['holder']} "
                                  f"(lease ends in {row['expires'] - now:.0f} s); waited {timeout:.0f} s")
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 1.0)
        lease = Lease(me, name, table, token, now + ttl, ttl)
        stop = threading.Event()
        beat = threading.Thread(target=lease._beat, args=(renew_every or ttl / 3, stop), daemon=True,
                                name=f"lease-{name}")
        if heartbeat:
            beat.start()
        try:
            yield lease
        finally:
            stop.set()
            if heartbeat:
                beat.join(timeout=5)
            with lease._mutex:  # no renewal after this point
                lease.released = True
                released = not lease.lost and self._swap(table, lease.token, "", 0.0, lease.token + 1)
            if not released:
                warnings.warn(f"lock {name!r}: the lease lapsed before it was released (held > {ttl:.0f} s)",
                              stacklevel=2)
            if lease.token // 500 != (token - 1) // 500:  # every swap is a table version: drop old ones now and then
                table.optimize(cleanup_older_than=timedelta(minutes=1))

    @staticmethod
    def _swap(table: Any, expected: int, holder: str, expires: float, token: int) -> bool:
        row = pa.table({"name": ["lock"], "holder": [holder], "expires": [expires], "token": [token]},
                       schema=LOCK_SCHEMA)
        try:
            result = table.merge_insert("name").when_matched_update_all(where=f"target.token = {expected}").execute(row)
        except Exception as error:  # noqa: BLE001 - lance names no class for it
            if _conflict(error):  # a concurrent overwrite (the lease table being created): nothing committed
                return False
            raise
        return result.num_updated_rows == 1


def _conflict(error: Exception) -> bool:
    """Whether LanceDB refused a commit because of a concurrent one (nothing of this commit landed). Seen on moto's
    S3: "Incompatible transaction: This Update transaction is incompatible with concurrent transaction Overwrite"
    when three processes created the lease table and updated it at once."""
    text = str(error)
    return "Incompatible transaction" in text or "Commit conflict" in text or "concurrent transaction" in text


@lru_cache(maxsize=16)
def _cached(uri: str) -> Store:
    return Store(uri)


def get_store(store: Store | str | None = None) -> Store:
    """``store`` itself, or the (cached, per process) :class:`Store` for a URI, ``$DECAPFLOW_STORE`` or
    ``<home>/banks``."""
    return store if isinstance(store, Store) else _cached(store_uri(store))
