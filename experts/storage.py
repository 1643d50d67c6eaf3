"""Byte-level storage on any pyarrow filesystem URI (a local path, file://, s3://, gs://).

Checkpoints and run artefacts are written through these few functions so that an expert can
write to a local folder or to object storage with the same code. Writes of a single file are
atomic: locally the bytes go to a temporary name that is then renamed; on object stores a PUT
is atomic by nature.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pyarrow.fs as pafs


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a URI or a local path (relative paths allowed)."""
    text = os.fspath(uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    return pafs.FileSystem.from_uri(text)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no such file: {uri}") from error


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically (never a half-written file under its final name)."""
    fs, path = resolve(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode())


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True).encode())


def list_dir(uri: str) -> list[str]:
    """Base names of the entries directly under `uri` (empty when it does not exist)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path)))


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
