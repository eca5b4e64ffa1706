"""Paths and URLs to pyarrow filesystems: local paths, file://, s3:// (and anything pyarrow knows).

Jobs pass a filesystem built by cluster.storage (endpoint and credentials from flags or AWS_*
variables); library users can rely on pyarrow's defaults, which read the same variables.
"""
from __future__ import annotations

import os

import pyarrow.fs as pafs


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or URL."""
    uri = str(uri)
    if filesystem is not None:
        return filesystem, uri.split("://", 1)[-1].rstrip("/")
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri[len("file://"):]
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound
