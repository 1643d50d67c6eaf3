"""Leases: one writer at a time for a run directory, or for one expert's folder in it.

A lease is a small JSON file, `<folder>/.lease`, naming its holder (host, pid, start time, what it
does) and an expiry that a heartbeat thread pushes forward while the holder lives. Taking a lease
that someone else holds fails at once with LeaseHeld naming the holder, or waits until it is free.
A lease is stale when it expired (its holder died or hangs, on any host) or when its holder is a
dead process on this host; a stale lease is taken over without waiting for the expiry.

Every step that must be atomic is a compare-and-swap of the storage:
- local and shared file systems: a lease is created by hard-linking a fully written temporary
  file to `.lease` (link fails when the name exists, and is atomic on NFS too); a stale lease is
  taken over by the one process that creates `.lease.takeover-<token>` the same way, which
  checks that the stale lease is still there before it removes it;
- S3 (and S3-compatible stores): conditional PUTs, `If-None-Match: *` to create and `If-Match:
  <etag>` to renew, take over and delete, through boto3 (pyarrow's filesystem has no conditional
  writes). Other object stores (gs://, ...) have none that we can reach: there a writer warns that
  it holds no lease and goes on, as before leases existed; nothing pretends to lock.

A process may take a lease it already holds (nested steps of one fit); it is released when the
outermost holder lets go. No third-party lock library covers both POSIX folders and S3 with
holder metadata and takeover, hence this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from archipelago.experts import storage

logger = logging.getLogger("archipelago.lease")

LEASE_FILE = ".lease"
TTL_ENV = "ARCHIPELAGO_LEASE_TTL_S"  # seconds a lease lives without a heartbeat (default 60)
_ABANDONED_TAKEOVER_S = 30.0  # a takeover marker this old belongs to a taker that died mid-takeover


class LeaseHeld(RuntimeError):
    """Another live writer holds the lease."""


def default_ttl_s() -> float:
    return float(os.environ.get(TTL_ENV, "60"))


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, and until when (seconds since the epoch) unless renewed."""

    host: str
    pid: int
    started: str
    expires: float
    purpose: str
    token: str

    def describe(self) -> str:
        return f"{self.purpose} (pid {self.pid} on {self.host}, since {self.started})"

    def stale(self, now: float) -> bool:
        """Expired, or left by a process of this host that is gone, or by this very process, which
        no longer holds it (its release failed, e.g. while the storage was down)."""
        if now > self.expires:
            return True
        if self.host != socket.gethostname():
            return False
        return not _alive(self.pid) or (self.pid == os.getpid() and self.token not in _tokens)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class _LocalStore:
    """Compare-and-swap on a POSIX file system (see the module docstring); a version is the token."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.created: list[str] = []  # the folders that taking the lease created, deepest first

    def create(self, body: bytes, path: str | None = None) -> str | None:
        path = path or self.path
        self.created = self.created or storage.missing_folders(os.path.dirname(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return _token_of(body)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        return body, _token_of(body)

    def renew(self, version: str, body: bytes) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        storage.write_bytes(self.path, body)  # a temporary file renamed over the lease: never half-written
        return version

    def take_over(self, version: str, body: bytes) -> str | None:
        marker = f"{self.path}.takeover-{version}"
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.path.getmtime(marker) > _ABANDONED_TAKEOVER_S:
                os.unlink(marker)
        if self.create(b"", marker) is None:
            return None
        try:
            current = self.read()
            if current is None or current[1] != version:
                return None
            os.unlink(self.path)
            return self.create(body)
        finally:
            os.unlink(marker)

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            os.unlink(self.path)
        for folder in self.created:  # a failed first step leaves no empty run directory behind
            with contextlib.suppress(OSError):
                os.rmdir(folder)


class _S3Store:
    """Compare-and-swap with S3's conditional requests; a version is the object's ETag."""

    def __init__(self, uri: str) -> None:
        import boto3  # only runs on S3 need it

        parts = urlsplit(uri)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        endpoint = options.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=options.get("region"))
        self.bucket, self.key = parts.netloc, parts.path.lstrip("/")

    def _call(self, method: str, **kwargs: Any) -> Any:
        """The answer of a request; None when its condition failed or the lease does not exist."""
        from botocore.exceptions import ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code", "") in _S3_REFUSALS:
                return None
            raise

    def create(self, body: bytes) -> str | None:
        answer = self._call("put_object", Body=body, IfNoneMatch="*")
        return None if answer is None else answer["ETag"]

    def read(self) -> tuple[bytes, str] | None:
        answer = self._call("get_object")
        return None if answer is None else (answer["Body"].read(), answer["ETag"])

    def renew(self, version: str, body: bytes) -> str | None:
        answer = self._call("put_object", Body=body, IfMatch=version)
        return None if answer is None else answer["ETag"]

    take_over = renew  # overwriting the stale lease only if it is still the one we read

    def delete(self, version: str) -> None:
        self._call("delete_object", IfMatch=version)


_S3_REFUSALS = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404")


def _token_of(body: bytes) -> str:
    try:
        return json.loads(body.decode())["token"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return ""  # unreadable: a lease of no one, taken over at once (a live holder always writes JSON)


def _store(folder: str) -> _LocalStore | _S3Store | None:
    """The lease's storage; None where no conditional write is available to us (see the module doc)."""
    uri = storage.join(folder, LEASE_FILE)
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme in ("", "file"):
        return _LocalStore(storage.resolve(uri)[1])
    if scheme == "s3":
        return _S3Store(uri)
    return None


_held: dict[str, int] = {}  # folders whose lease this process holds, with how many times taken
_tokens: set[str] = set()  # the tokens of the leases this process holds
_held_lock = threading.Lock()


class Lease:
    """The lease of `folder` while a `with` block runs (see the module docstring).

    `wait`: False fails at once when the lease is held; True waits for it; a number waits that many
    seconds at most. Ray task retries pass a wait longer than the TTL, so that a retried task takes
    over the lease of its dead first attempt on another node.
    """

    def __init__(self, folder: str, purpose: str, wait: bool | float = False, ttl_s: float | None = None,
                 poll_s: float = 0.5) -> None:
        self.folder, self.purpose, self.wait, self.poll_s = folder, purpose, wait, poll_s
        self.ttl_s = ttl_s if ttl_s is not None else default_ttl_s()
        self.key = storage.join(folder, LEASE_FILE)
        self.token, self.started = uuid.uuid4().hex, datetime.now(UTC).isoformat(timespec="seconds")
        self.lost = False  # set when a renewal found the lease taken over (this process hung past its TTL)
        self._store: _LocalStore | _S3Store | None = None
        self._version = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        with _held_lock:
            if _held.get(self.key):
                _held[self.key] += 1
                return self
        self._store = _store(self.folder)
        if self._store is None:
            logger.warning("%s: no lease (%s has no conditional writes here): two writers at once are not kept "
                           "apart", self.folder, self.folder.split("://")[0] + "://")
        else:
            with _held_lock:
                _tokens.add(self.token)  # before the lease exists, so that it is never taken for a leftover
            try:
                self._version = self._acquire()
            except BaseException:
                _tokens.discard(self.token)
                raise
            self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.folder}", daemon=True)
            self._thread.start()
        with _held_lock:
            _held[self.key] = 1
        return self

    def __exit__(self, *exc: Any) -> None:
        with _held_lock:
            _held[self.key] -= 1
            if _held[self.key]:
                return
            del _held[self.key]
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._store is not None and not self.lost:
            try:
                self._store.delete(self._version)
            except Exception as error:  # storage unreachable: the lease lapses at its expiry instead
                logger.warning("%s: could not release the lease (%s); it lapses in %.0f s", self.folder, error,
                               self.ttl_s)
        _tokens.discard(self.token)

    def _body(self) -> bytes:
        mine = Holder(host=socket.gethostname(), pid=os.getpid(), started=self.started,
                      expires=time.time() + self.ttl_s, purpose=self.purpose, token=self.token)
        return json.dumps(asdict(mine)).encode()

    def _acquire(self) -> str:
        """Create the lease, take over a stale one, or wait; the version of the lease we now hold."""
        deadline = None if self.wait is True else time.monotonic() + (0 if self.wait is False else float(self.wait))
        announced = False
        while True:
            if (version := self._store.create(self._body())) is not None:
                return version
            current = self._store.read()
            if current is None:
                continue  # released between our two requests
            theirs = _parse(current[0])
            if theirs is None or theirs.stale(time.time()):  # unreadable: never written by a live holder
                if (version := self._store.take_over(current[1], self._body())) is not None:
                    logger.warning("%s: took over the stale lease of %s", self.folder,
                                   theirs.describe() if theirs else "an unreadable lease file")
                    return version
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.folder} is in use by {theirs.describe()}; wait for it (--wait) or use "
                                f"another run directory")
            if not announced:
                logger.warning("%s is in use by %s: waiting", self.folder, theirs.describe())
                announced = True
            time.sleep(self.poll_s)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                version = self._store.renew(self._version, self._body())
            except Exception as error:  # storage down for a moment: the lease outlives two missed beats
                logger.warning("%s: could not renew the lease (%s); trying again in %.0f s", self.folder, error,
                               self.ttl_s / 3)
                continue
            if version is None:
                self.lost = True
                logger.error("%s: the lease of %s was taken over by another writer", self.folder, self.purpose)
                return
            self._version = version


def _parse(body: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(body.decode()))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return None


def holder(folder: str) -> Holder | None:
    """Who holds the lease of `folder` now (None when no one does)."""
    store = _store(folder)
    current = store.read() if store is not None else None
    return None if current is None else _parse(current[0])
