"""Byte-level storage on any pyarrow filesystem URI (a local path, file://, s3://, gs://).

Checkpoints and run artefacts are written through these few functions so that an expert can
write to a local folder or to object storage with the same code. Writes of a single file are
atomic: locally the bytes go to a temporary name that is then renamed; on object stores a PUT
is atomic by nature.

Object stores fail for a while now and then (a restart, a network cut, throttling). Every call
here on a remote filesystem retries such transient failures with exponential backoff (0.25 s
doubling up to 8 s) for up to ARCHIPELAGO_STORAGE_RETRY_S seconds (default 60), logging each
retry; past that it raises StorageUnavailable naming the file. Errors that retrying cannot mend
(a missing file or bucket, a refused permission) are raised at once. pyarrow retries a few times
on its own within one call; ours spans the seconds-long outages its retries do not.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

RETRY_ENV = "ARCHIPELAGO_STORAGE_RETRY_S"
PROBE_PREFIX = ".write-probe-"  # the short-lived files of `check_writable`
_FIRST_DELAY_S, _MAX_DELAY_S = 0.25, 8.0
# Words of the errors that pyarrow's S3/GCS clients raise for failures that pass: no connection,
# a timeout, a reset, throttling, a server error.
_TRANSIENT = ("network_connection", "couldn't connect", "connection refused", "connection reset", "timed out",
              "timeout", "slowdown", "slow down", "serviceunavailable", "service unavailable", "internalerror",
              "internal error", "requesttimeout", "503", "broken pipe", "curlcode")
T = TypeVar("T")
logger = logging.getLogger(__name__)


class StorageUnavailable(OSError):
    """The storage kept failing for longer than the retry window."""


def transient(error: BaseException) -> bool:
    """Whether an error of a remote filesystem may pass if the call is tried again."""
    if not isinstance(error, OSError) or isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    text = str(error).lower()
    return any(word in text for word in _TRANSIENT)


def retried(uri: str, what: str, call: Callable[[], T]) -> T:
    """`call()`, retried with backoff while a remote filesystem fails transiently (see the docstring)."""
    if "://" not in os.fspath(uri) or os.fspath(uri).startswith("file://"):
        return call()
    window = float(os.environ.get(RETRY_ENV, "60"))
    start, delay, attempt = time.monotonic(), _FIRST_DELAY_S, 1
    while True:
        try:
            return call()
        except OSError as error:
            waited = time.monotonic() - start
            if not transient(error):
                raise
            if waited + delay > window:
                raise StorageUnavailable(f"{what} {uri}: the storage kept failing for {waited:.1f} s "
                                         f"({attempt} attempts; {RETRY_ENV}={window:g}): {error}") from error
            logger.warning("%s %s failed (attempt %d, %s); retrying in %.2f s", what, uri, attempt, error, delay)
            time.sleep(delay)
            delay, attempt = min(2 * delay, _MAX_DELAY_S), attempt + 1


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a URI or a local path (relative paths allowed)."""
    text = os.fspath(uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    parts = urlsplit(text)
    if parts.scheme == "file":
        return pafs.LocalFileSystem(), parts.path
    # Building an object-store filesystem costs tens of milliseconds: reuse one per bucket and options.
    base = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    fs, root = _filesystem(base, tuple(os.environ.get(name) for name in _FILESYSTEM_ENV))
    return fs, f"{root.rstrip('/')}/{parts.path.lstrip('/')}" if parts.path.strip("/") else root


# The environment that object-store clients read; a cached filesystem is only reused under the same values.
_FILESYSTEM_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


@functools.lru_cache(maxsize=32)
def _filesystem(base: str, environment: tuple[str | None, ...]) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(base)


def join(uri: str, *parts: str) -> str:
    """`uri` extended by path parts; a URI's query (s3://bucket/run?endpoint_override=...) stays at the end."""
    base, query = _split_query(uri)
    return "/".join([base.rstrip("/"), *parts]) + query


def base_name(uri: str) -> str:
    """The last path component of a URI or path (without the URI's query)."""
    return _split_query(uri)[0].rstrip("/").rsplit("/", 1)[-1]


def _split_query(uri: str) -> tuple[str, str]:
    """A URI's path part and its query ("?..." or ""); a local path has no query."""
    if "://" not in uri:
        return uri, ""
    base, mark, query = uri.partition("?")
    return base, mark + query


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return retried(uri, "looking up", lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as stream:
            return stream.read()

    try:
        return retried(uri, "reading", read)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no such file: {uri}") from error


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (never a half-written file under its final name)."""
    retried(uri, "writing", lambda: _write_bytes(uri, data))


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open_output_stream(tmp) as stream:
                stream.write(data)
            os.replace(tmp, path)
        finally:  # a failed write leaves neither the final name nor the temporary file
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


class DamagedFile(ValueError):
    """A file that exists but cannot be read as what it should be (truncated, overwritten, garbage)."""


def read_json(uri: str) -> Any:
    """The JSON value of a file; a damaged file is a DamagedFile naming it."""
    try:
        return json.loads(read_bytes(uri).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFile(f"{uri} is damaged: not valid JSON ({error})") from error


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True).encode())


def list_dir(uri: str) -> list[str]:
    """Base names of the entries directly under `uri` (empty when it does not exist)."""
    fs, path = resolve(uri)

    def names() -> list[str]:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))

    return retried(uri, "listing", names)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)

    def delete() -> None:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    retried(uri, "deleting", delete)


def check_writable(uri: str) -> None:
    """Raise PermissionError naming `uri` unless a file can be created there.

    Nothing is left behind: the probe file is removed, and so are the local folders created for it
    (empty ones only, so a folder another process wrote into meanwhile stays).
    """
    fs, path = resolve(uri)
    created = missing_folders(path) if isinstance(fs, pafs.LocalFileSystem) else []
    probe = join(uri, f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}")
    try:
        write_bytes(probe, b"")
        fs.delete_file(resolve(probe)[1])
    except OSError as error:
        raise PermissionError(f"cannot write to the run directory {uri}: {error}") from error
    finally:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def missing_folders(path: str) -> list[str]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing
