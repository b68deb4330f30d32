"""Corpus formats, the embedded stdlib corpus, corpus hashing and fixed-length sample building."""

import itertools
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from longred.corpus.documents import corpus_sha256, iter_documents
from longred.corpus.embedded import stdlib_sources
from longred.corpus.windows import SampleSet, build_samples

WORDS = 300
EOS = 1


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: "w<i>" -> i + 2, anything else -> <unk> (0), EOS "</s>" -> 1."""
    vocab = {"<unk>": 0, "</s>": EOS} | {f"w{i}": i + 2 for i in range(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def words(start: int, count: int) -> str:
    return " ".join(f"w{i % WORDS}" for i in range(start, start + count))


def ids(start: int, count: int) -> list[int]:
    return [i % WORDS + 2 for i in range(start, start + count)]


def rows(array_NT: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(map(tuple, array_NT.tolist()))


# --- reading -----------------------------------------------------------------------------------


def test_text_files_and_folders(tmp_path):
    for name, text in {
        "b.md": "md",
        "a.txt": "txt",
        "sub/c.py": "py",
        "sub/d.rst": "rst",
        "notes.bin": "skipped",
        ".hidden/e.txt": "skipped",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert list(iter_documents(tmp_path)) == ["txt", "md", "py", "rst"]
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["txt"]


def test_jsonl(tmp_path):
    file = tmp_path / "docs.jsonl"
    file.write_text('{"text": "one", "body": "x"}\n\n{"text": "two", "body": "y"}\n')
    assert list(iter_documents(file)) == ["one", "two"]
    assert list(iter_documents(file, field="body")) == ["x", "y"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"text": "ok"}\n{"body": "no text"}\n', r"docs.jsonl, line 2: no field 'text' \(found: body\)"),
        ('{"text": "ok"}\n{"text": "a",\n', r"docs.jsonl, line 2: not valid JSON"),
        ('{"text": 3}\n', r"docs.jsonl, line 1: field 'text' is int, not a string"),
    ],
)
def test_bad_jsonl_line_names_file_line_and_field(tmp_path, lines, message):
    (tmp_path / "docs.jsonl").write_text(lines)
    documents = iter_documents(tmp_path / "docs.jsonl")
    with pytest.raises(ValueError, match=message):
        list(documents)


def test_parquet_in_record_batches(tmp_path):
    texts = [f"doc {i}" for i in range(2500)]
    pq.write_table(
        pa.table({"id": range(2500), "text": texts}), tmp_path / "docs.parquet", row_group_size=700
    )
    assert list(iter_documents(tmp_path / "docs.parquet")) == texts
    with pytest.raises(ValueError, match=r"docs.parquet: no column 'body' \(columns: id, text\)"):
        list(iter_documents(tmp_path / "docs.parquet", field="body"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match=r"nulls.parquet, row 1: field 'text' is NoneType"):
        list(iter_documents(tmp_path / "nulls.parquet"))


def test_dataset_folder(tmp_path):
    texts = [f"document {i}" for i in range(5)]
    datasets.Dataset.from_dict({"text": texts, "id": list(range(5))}).save_to_disk(tmp_path / "ds")
    assert list(iter_documents(tmp_path / "ds")) == texts
    with pytest.raises(ValueError, match=r"no column 'content' \(columns: text, id\)"):
        iter_documents(tmp_path / "ds", field="content")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    splits.save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"is a DatasetDict; pass one split folder instead: .*dd/train"):
        iter_documents(tmp_path / "dd")


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt' does not exist"):
        iter_documents(tmp_path / "missing.txt")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(
        ValueError, match=r"unknown extension '.csv'; accepted: .txt, .md, .py, .rst, .jsonl, .parquet"
    ):
        iter_documents(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="has no files with an accepted extension"):
        iter_documents(tmp_path)
    with pytest.raises(ValueError, match="choose one of embedded:prose, embedded:source"):
        iter_documents("embedded:poetry")


def test_embedded_prose_is_pydoc_topics_then_module_docstrings():
    documents = iter_documents("embedded:prose")
    head = list(itertools.islice(documents, len(topics) + 1))
    assert head[: len(topics)] == [topics[name] for name in sorted(topics)]
    assert any(text.startswith('The "if" statement') for text in head)
    assert head[-1].startswith("Record of phased-in incompatible language changes."), "__future__'s docstring"


def test_embedded_source_is_sorted_stdlib_without_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = stdlib_sources()
    relative = [path.relative_to(root).as_posix() for path in paths]
    assert relative == sorted(relative)
    assert not [p for p in relative if {"test", "tests", "idlelib", "site-packages"} & set(p.split("/"))]
    assert "json/decoder.py" in relative
    first = next(iter_documents("embedded:source"))
    assert first == paths[0].read_text(encoding="utf-8")


def test_corpus_hash(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text('{"text": "beta"}\n')
    first = corpus_sha256(tmp_path)
    assert first == corpus_sha256(tmp_path)
    assert corpus_sha256(tmp_path, field="body") != first
    (tmp_path / "a.txt").write_text("alphA")
    assert corpus_sha256(tmp_path) != first
    assert corpus_sha256("embedded:source") == corpus_sha256("embedded:source")


# --- samples -----------------------------------------------------------------------------------


def test_pack_shapes_eos_and_disjoint_heldout(tokenizer):
    documents = [words(0, 10), words(10, 5), words(15, 20), words(35, 40)]
    samples = build_samples(documents, tokenizer, length=8, num_samples=6, heldout=2)
    assert isinstance(samples, SampleSet)
    assert samples.input_ids_NT.shape == (6, 8) and samples.input_ids_NT.dtype == np.int32
    assert samples.heldout_NT.shape == (2, 8) and samples.heldout_NT.dtype == np.int32
    stream = ids(0, 10) + [EOS] + ids(10, 5) + [EOS] + ids(15, 20) + [EOS] + ids(35, 40) + [EOS]
    windows = np.array(stream[:64]).reshape(8, 8)
    both = np.concatenate([samples.input_ids_NT, samples.heldout_NT])
    assert rows(both) == rows(windows), "consecutive windows of the EOS-joined stream"
    assert not set(rows(samples.input_ids_NT)) & set(rows(samples.heldout_NT))


def test_seed_determines_order(tokenizer):
    documents = [words(i * 50, 50) for i in range(6)]
    first = build_samples(documents, tokenizer, length=16, num_samples=12, heldout=3, seed=7)
    again = build_samples(documents, tokenizer, length=16, num_samples=12, heldout=3, seed=7)
    other = build_samples(documents, tokenizer, length=16, num_samples=12, heldout=3, seed=8)
    assert np.array_equal(first.input_ids_NT, again.input_ids_NT)
    assert np.array_equal(first.heldout_NT, again.heldout_NT)
    assert not np.array_equal(first.input_ids_NT, other.input_ids_NT)


def test_document_mode_takes_one_window_per_long_document(tokenizer):
    starts = [0, 100, 200]
    documents = [words(0, 30), words(50, 5), words(100, 12), words(200, 25), ""]
    samples = build_samples(
        documents, tokenizer, length=12, num_samples=2, heldout=1, mode="document", seed=3
    )
    both = np.concatenate([samples.input_ids_NT, samples.heldout_NT])
    sources = []
    for window in both.tolist():
        matches = [
            s for s, n in zip(starts, (30, 12, 25), strict=True) if _is_slice(window, ids(s, n) + [EOS])
        ]
        assert len(matches) == 1, window
        sources.append(matches[0])
    assert sorted(sources) == starts, "one window from each long document, none from the short one"


def _is_slice(window: list[int], tokens: list[int]) -> bool:
    return any(tokens[i : i + len(window)] == window for i in range(len(tokens) - len(window) + 1))


def test_reading_stops_once_enough_tokens(tokenizer):
    consumed = 0

    def documents():
        nonlocal consumed
        for i in range(100_000):
            consumed += 1
            yield words(i, 100)

    samples = build_samples(documents(), tokenizer, length=64, num_samples=4)
    assert samples.input_ids_NT.shape == (4, 64)
    assert consumed < 100, f"read {consumed} documents for 256 tokens"


def test_embedded_corpus_builds_samples(tokenizer):
    samples = build_samples(iter_documents("embedded:prose"), tokenizer, length=128, num_samples=8, heldout=2)
    assert samples.input_ids_NT.shape == (8, 128)
    assert samples.heldout_NT.shape == (2, 128)


def test_not_enough_text_says_available_vs_requested(tokenizer):
    with pytest.raises(
        ValueError, match=r"Corpus tiny has only 3 samples of 8 tokens \(mode 'pack'\); requested 5 \+ 1"
    ):
        build_samples(
            [words(0, 20), words(20, 6)], tokenizer, length=8, num_samples=5, heldout=1, corpus="tiny"
        )
    with pytest.raises(
        ValueError, match=r"has only 1 samples of 8 tokens \(mode 'document'\); requested 2 \+ 0"
    ):
        build_samples([words(0, 20), words(20, 6)], tokenizer, length=8, num_samples=2, mode="document")


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match=r"length=0 must be >= 1; heldout=-1 must be >= 0; mode='tail'"):
        build_samples([], tokenizer, length=0, num_samples=1, heldout=-1, mode="tail")
