"""Corpus documents, streamed in a fixed order, and the content hash that names a corpus in a cache.

Documents stream from text files, JSONL, Parquet (record batches, never the whole file), a Hugging
Face dataset folder (memory-mapped Arrow), or the embedded stdlib corpus (`embedded:prose`,
`embedded:source`).
"""

from __future__ import annotations

import hashlib
import json
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
_CHUNK = 1 << 20


def iter_documents(path: str | Path, *, field: str = "text") -> Iterator[str]:
    """Stream a corpus's documents in a fixed order.

    Args:
        path: `embedded:prose` / `embedded:source`; a .txt/.md/.py/.rst file (one document); a .jsonl or
            .parquet file (one document per record); a folder of such files (recursive, sorted by
            path, hidden files skipped); or a dataset folder written by `datasets.save_to_disk`.
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
    root = Path(path)
    if _is_dataset_folder(root):
        return _dataset_documents(root, field=field)
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
    root = Path(path)
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


def _file_documents(file: Path, *, field: str) -> Iterator[str]:
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(file, field=field)
    elif suffix == ".parquet":
        yield from _parquet_documents(file, field=field)
    else:
        try:
            yield file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"Corpus file {str(file)!r} is not UTF-8 text ({error.reason}).") from error


def _jsonl_documents(file: Path, *, field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as lines:
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


def _parquet_documents(file: Path, *, field: str) -> Iterator[str]:
    parquet = pq.ParquetFile(file)
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


def _text(value: object, *, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, not a string.")
    return value


def _is_dataset_folder(root: Path) -> bool:
    return root.is_dir() and all((root / marker).is_file() for marker in _DATASET_MARKERS)


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)
