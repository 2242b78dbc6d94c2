"""One filesystem layer for local paths, ``file://``, ``s3://`` and ``gs://`` (``pyarrow.fs``).

S3-compatible endpoints and credentials come from the standard environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``..., instance roles); nothing
secret is ever taken from a URI or the command line, and :func:`redact`
removes any userinfo or query string a URI carries before it is printed or
stored.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")

_URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_QUERY = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s?]*)\?\S*")


class UnsafeURIError(ValueError):
    """A URI that carries credentials or a query string (refused: secrets belong in the environment)."""


def redact(text: str) -> str:
    """``text`` (a URI or a message holding URIs) with each URI's userinfo and query string removed."""
    return _QUERY.sub(r"\1", _USERINFO.sub(r"\1***@", str(text)))


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or URI.

    Userinfo and query strings are refused: credentials belong in the environment.
    """
    uri = str(uri)
    if not _URI_SCHEME.match(uri):
        return pafs.LocalFileSystem(), str(Path(uri).absolute())
    if "@" in uri.split("/", 3)[2] or "?" in uri:
        raise UnsafeURIError(
            f"{redact(uri)}: credentials or query strings in URIs are not accepted; "
            "use the standard environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)"
        )
    scheme, rest = uri.split("://", 1)
    if scheme == "s3":
        return _s3_filesystem(), rest.rstrip("/")
    if scheme == "file":
        return pafs.LocalFileSystem(), rest
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended with '/' (works for local paths and URIs)."""
    return "/".join([str(uri).rstrip("/"), *parts])


def read_bytes(uri: str) -> bytes:
    """The whole object or file at ``uri``."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(uri: str) -> bool:
    """Whether a file (not a directory) exists at ``uri``."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def delete(uri: str) -> None:
    """Delete the file or object at ``uri``."""
    fs, path = resolve(uri)
    fs.delete_file(path)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Make ``data`` appear at ``uri`` whole or not at all.

    Local files are written under a unique temporary name in the same folder
    and renamed over the target. An S3 object becomes visible only when its
    single PUT completes, so it is written directly.
    """
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


PERMANENT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
"""Errors about the object itself: retrying cannot help, so they are raised at once."""


def retry_transient(action: Callable[[], T], *, attempts: int = 4, base_delay_s: float = 0.5) -> T:
    """Run ``action``, retrying other ``OSError`` (network, throttling, outage) with exponential backoff."""
    for attempt in range(attempts):
        try:
            return action()
        except PERMANENT_ERRORS:
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(base_delay_s * 2**attempt)
    raise AssertionError("unreachable")
