"""Corpus documents, streamed in a fixed order, and the content hash that names a corpus in a cache.

Documents stream from text files, JSONL, Parquet (record batches, never the whole file), a Hugging
Face dataset folder (memory-mapped Arrow), or the embedded stdlib corpus (`embedded:prose`,
`embedded:source`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from longred.corpus.embedded import EMBEDDED_KINDS, embedded_documents

EMBEDDED_PREFIX = "embedded:"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECORD_SUFFIXES = (".jsonl", ".parquet")
_ACCEPTED = ", ".join((*TEXT_SUFFIXES, *RECORD_SUFFIXES))
_DATASET_MARKERS = ("dataset_info.json", "state.json")
_ROWS_PER_BATCH = 1024
_HUB_DATASET = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.\[\]:%+-]+)?$")
_CHUNK = 1 << 20


def iter_documents(path: str | Path, *, field: str = "text") -> Iterator[str]:
    """Stream a corpus's documents in a fixed order.

    Args:
        path: `embedded:prose` / `embedded:source`; a .txt/.md/.py/.rst file (one document); a .jsonl or
            .parquet file (one document per record); a folder of such files (recursive, sorted by
            path, hidden files skipped); a glob of such files (`shards/*.jsonl`, sorted); an fsspec
            URL or URL glob (`hf://datasets/org/name/data/*.parquet`, `s3://...`); a dataset folder
            written by `datasets.save_to_disk`; or a Hub dataset `org/name[:config][@split]`, streamed
            with `datasets` (never loaded whole; split `train` unless given).
        field: the record field / column holding the text (JSONL, Parquet, datasets).

    Returns:
        An iterator of document strings. The path is checked at once; fields and records at
        the latest when read.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unknown extension or embedded kind, a folder with no readable file; a missing
            field or a bad record (naming file, line or row, and field).
    """
    if isinstance(path, str) and path.startswith(EMBEDDED_PREFIX):
        kind = path[len(EMBEDDED_PREFIX) :]
        if kind not in EMBEDDED_KINDS:
            kinds = ", ".join(EMBEDDED_PREFIX + k for k in EMBEDDED_KINDS)
            raise ValueError(f"Unknown embedded corpus {path!r}; choose one of {kinds}.")
        return embedded_documents(kind)
    if isinstance(path, str) and (_is_url(path) or _is_glob(path)):
        files = _matched_files(path)
        return (document for file in files for document in _file_documents(file, field=field))
    root = Path(path)
    if _is_dataset_folder(root):
        return _dataset_documents(root, field=field)
    if isinstance(path, str) and not root.exists() and _HUB_DATASET.match(path):
        return _hub_documents(path, field=field)
    return (document for file in _corpus_files(root) for document in _file_documents(file, field=field))


def corpus_sha256(path: str | Path, *, field: str = "text") -> str:
    """A stable hash of a corpus's identity: the field name plus every file read (relative path and
    bytes), or for an embedded corpus the text of its documents.

    Raises:
        the errors of `iter_documents` for a bad path.
    """
    digest = hashlib.sha256(f"longred-corpus-v1\0{field}\0".encode())
    if isinstance(path, str) and path.startswith(EMBEDDED_PREFIX):
        for document in iter_documents(path, field=field):
            data = document.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()
    if isinstance(path, str) and (_is_url(path) or _is_glob(path)):
        for file in _matched_files(path):  # remote files by name, size and the store's own checksum
            info = file.fs.info(file.path)
            stamp = info.get("sha256") or info.get("ETag") or info.get("etag") or info.get("mtime", "")
            local = file.fs.protocol in ("file", ("file", "local"))
            if not local:
                digest.update(f"{file.path}\0{info.get('size')}\0{stamp}\0".encode())
                continue
            digest.update(f"{file.path}\0{info.get('size')}\0".encode())
            with file as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()
    root = Path(path)
    if isinstance(path, str) and not root.exists() and _HUB_DATASET.match(path):
        digest.update(f"hub-dataset\0{path}\0".encode())  # identified by name, config and split
        return digest.hexdigest()
    if _is_dataset_folder(root):
        files = sorted(file for file in root.rglob("*") if file.is_file() and not _hidden(file, root))
    else:
        files = _corpus_files(root)
    for file in files:
        name = file.relative_to(root).as_posix() if root.is_dir() else ""
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _corpus_files(root: Path) -> list[Path]:
    """The files a file or folder corpus reads, in order."""
    if not root.exists():
        raise FileNotFoundError(f"Corpus {str(root)!r} does not exist.")
    if root.is_file():
        if root.suffix.lower() not in (*TEXT_SUFFIXES, *RECORD_SUFFIXES):
            raise ValueError(
                f"Corpus file {str(root)!r}: unknown extension {root.suffix!r}; accepted: {_ACCEPTED}."
            )
        return [root]
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise ValueError(
            f"Corpus {str(root)!r} is a DatasetDict; pass one split folder instead: "
            + ", ".join(str(root / split) for split in splits)
        )
    files = sorted(
        (
            file
            for file in root.rglob("*")
            if file.is_file()
            and file.suffix.lower() in (*TEXT_SUFFIXES, *RECORD_SUFFIXES)
            and not _hidden(file, root)
        ),
        key=lambda file: file.relative_to(root).as_posix(),
    )
    if not files:
        raise ValueError(
            f"Corpus folder {str(root)!r} has no files with an accepted extension ({_ACCEPTED})."
        )
    return files


def _is_url(path: str) -> bool:
    head, sep, _ = path.partition("://")
    return bool(sep) and head.isidentifier()


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _matched_files(pattern: str) -> list:
    """The fsspec files a URL or glob names, sorted by path; accepted extensions only."""
    import fsspec

    files = fsspec.open_files(pattern, mode="rb")
    kept = sorted(
        (f for f in files if Path(f.path).suffix.lower() in (*TEXT_SUFFIXES, *RECORD_SUFFIXES)),
        key=lambda f: f.path,
    )
    if not kept:
        raise FileNotFoundError(
            f"Corpus {pattern!r} matches no file with an accepted extension ({_ACCEPTED}); "
            f"{len(files)} file(s) matched in all."
        )
    return kept


def _file_documents(file, *, field: str) -> Iterator[str]:
    """Documents of a local `Path` or an fsspec `OpenFile`."""
    suffix = Path(file.path if hasattr(file, "fs") else file).suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(file, field=field)
    elif suffix == ".parquet":
        yield from _parquet_documents(file, field=field)
    else:
        with _open(file) as stream:
            data = stream.read()
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"Corpus file {_name(file)!r} is not UTF-8 text ({error.reason}).") from error


def _open(file):
    return file.open("rb") if isinstance(file, Path) else file


def _name(file) -> str:
    return str(file) if isinstance(file, Path) else file.full_name


def _jsonl_documents(file, *, field: str) -> Iterator[str]:
    import io

    with _open(file) as raw, io.TextIOWrapper(raw, encoding="utf-8") as lines:
        file = _name(file)
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}, line {number}: not valid JSON ({error.msg}).") from error
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{file}, line {number}: no field {field!r} (found: {keys}).")
            yield _text(record[field], where=f"{file}, line {number}", field=field)


def _parquet_documents(file, *, field: str) -> Iterator[str]:
    with _open(file) as stream:
        yield from _parquet_rows(pq.ParquetFile(stream), _name(file), field=field)


def _parquet_rows(parquet: pq.ParquetFile, file: str, *, field: str) -> Iterator[str]:
    if field not in parquet.schema_arrow.names:
        columns = ", ".join(parquet.schema_arrow.names)
        raise ValueError(f"{file}: no column {field!r} (columns: {columns}).")
    row = 0
    for batch in parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[field]):
        for value in batch.column(0).to_pylist():
            yield _text(value, where=f"{file}, row {row}", field=field)
            row += 1


def _dataset_documents(root: Path, *, field: str) -> Iterator[str]:
    import datasets  # about 1 s to import; only dataset folders need it

    dataset = datasets.load_from_disk(str(root))
    if field not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise ValueError(f"Dataset {str(root)!r}: no column {field!r} (columns: {columns}).")

    def rows() -> Iterator[str]:
        row = 0
        for batch in dataset.select_columns([field]).iter(batch_size=_ROWS_PER_BATCH):
            for value in batch[field]:
                yield _text(value, where=f"{root}, row {row}", field=field)
                row += 1

    return rows()


def _hub_documents(name: str, *, field: str) -> Iterator[str]:
    """A Hub dataset `org/name[:config][@split]`, streamed (fixed order: shards as published)."""
    import datasets

    repo, _, split = name.partition("@")
    repo, _, config = repo.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config or None, split=split or "train", streaming=True)
    except Exception as err:  # offline, unknown or gated: say what was tried
        from huggingface_hub import constants

        offline = (
            " (HF_HUB_OFFLINE is set: Hub datasets need the network)" if constants.HF_HUB_OFFLINE else ""
        )
        raise FileNotFoundError(
            f"Corpus {name!r} is not a local path, and loading it as a Hub dataset failed{offline}: {err}"
        ) from err
    if dataset.column_names is not None and field not in dataset.column_names:
        raise ValueError(
            f"Hub dataset {name!r}: no column {field!r} (columns: {', '.join(dataset.column_names)})."
        )
    for row, record in enumerate(dataset):
        yield _text(record[field], where=f"{name}, row {row}", field=field)


def _text(value: object, *, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, not a string.")
    return value


def _is_dataset_folder(root: Path) -> bool:
    return root.is_dir() and all((root / marker).is_file() for marker in _DATASET_MARKERS)


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)
