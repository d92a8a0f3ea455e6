"""Files on a study's storage: a local (or mounted) folder, or a URI pyarrow knows (s3://, gs://, hf://).

One place for what the preflight probes, the token shards and the evaluation exports all do with
storage: resolve a path, join, read and write small files, copy whole folders in and out, delete.
"""

from __future__ import annotations

from pathlib import Path


def resolve_storage_path(path: str) -> str:
    """An absolute local folder (workers have other working directories) or the URI as given."""
    return path if "://" in path else str(Path(path).resolve())


def filesystem(uri: str):
    """(pyarrow filesystem, path) for a local path, a pyarrow URI (s3://, gs://, file://) or hf://."""
    from pyarrow import fs

    if uri.startswith("hf://"):
        from huggingface_hub import HfFileSystem
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(HfFileSystem())), uri[len("hf://"):]
    if "://" in uri:
        found, path = fs.FileSystem.from_uri(uri)
        return found, path.rstrip("/")
    return fs.LocalFileSystem(), str(Path(uri).resolve())


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """`base/part/...`; a URI's query options (s3://b/p?endpoint_override=...) stay at the end, where pyarrow
    reads them."""
    query = ""
    if "://" in base and "?" in base:
        base, query = base.split("?", 1)
        query = "?" + query
    return "/".join([base.rstrip("/"), *parts]) + query


def write_text(uri: str, text: str) -> None:
    found, path = filesystem(uri)
    found.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with found.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(uri: str) -> str | None:
    """The file's text, or None when there is no such file."""
    from pyarrow import fs

    found, path = filesystem(uri)
    if found.get_file_info(path).type != fs.FileType.File:
        return None
    with found.open_input_stream(path) as stream:
        return stream.read().decode()


def exists(uri: str) -> bool:
    from pyarrow import fs

    found, path = filesystem(uri)
    return found.get_file_info(path).type != fs.FileType.NotFound


def copy_tree(source: str, destination: str) -> None:
    """Copy a folder (local path or URI) to another (local path or URI), creating it."""
    from pyarrow import fs

    source_fs, source_path = filesystem(source)
    destination_fs, destination_path = filesystem(destination)
    destination_fs.create_dir(destination_path, recursive=True)
    fs.copy_files(source_path, destination_path, source_filesystem=source_fs, destination_filesystem=destination_fs)


def remove_tree(uri: str) -> None:
    """Delete a folder if it is there (best effort: cleanup only)."""
    try:
        found, path = filesystem(uri)
        found.delete_dir(path)
    except Exception:  # noqa: BLE001 -- a leftover folder is harmless: nothing reads it without its marker
        pass
