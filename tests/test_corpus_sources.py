"""Corpora beyond a local file or folder: globs, fsspec URLs (read through the filesystem, never whole),
and Hub dataset names, which fail offline with a message saying so."""

import json
from pydoc_data.topics import topics

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longred.corpus.documents import corpus_sha256, iter_documents

TEXTS = list(topics.values())[:6]  # real text on every machine: the pydoc topics


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[2 * i : 2 * i + 2])
        (folder / f"part-{i}.jsonl").write_text(lines)
    (folder / "notes.md").write_text("not a shard")
    return folder


def test_local_glob_reads_matching_files_in_order(shards):
    assert list(iter_documents(str(shards / "part-*.jsonl"))) == TEXTS
    assert corpus_sha256(str(shards / "part-*.jsonl")) != corpus_sha256(str(shards / "part-0*.jsonl"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        iter_documents(str(shards / "*.parquet"))


def test_fsspec_url_and_url_glob():
    fs = fsspec.filesystem("memory")
    for i in range(2):
        table = pa.table({"text": TEXTS[3 * i : 3 * i + 3]})
        with fs.open(f"/corpus-test/data/train-{i}.parquet", "wb") as stream:
            pq.write_table(table, stream)
    with fs.open("/corpus-test/one.jsonl", "w") as stream:
        stream.write(json.dumps({"body": TEXTS[0]}) + "\n")
    try:
        assert list(iter_documents("memory://corpus-test/data/*.parquet")) == TEXTS
        assert list(iter_documents("memory://corpus-test/one.jsonl", field="body")) == TEXTS[:1]
        with pytest.raises(ValueError, match=r"one.jsonl, line 1: no field 'text'"):
            list(iter_documents("memory://corpus-test/one.jsonl"))
        first = corpus_sha256("memory://corpus-test/data/*.parquet")
        assert first == corpus_sha256("memory://corpus-test/data/*.parquet")
    finally:
        fs.rm("/corpus-test", recursive=True)


def test_hub_dataset_name_offline_says_so(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not a local path.*Hub dataset.*HF_HUB_OFFLINE is set"):
        next(iter_documents("longred-test-nobody/no-such-dataset:default@train"))
