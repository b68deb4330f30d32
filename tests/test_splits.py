"""Splits that cannot leak: on caches built by the real precompute path, no held-out window's tokens occur
inside any training window of any kind (short, s2l, long), for one corpus and for two; the evaluation's
long texts and passkey haystacks are held out from training's long stream; the cache records the split."""

import dataclasses
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import zarr

from longred.cli import main
from longred.corpus.embedded import embedded_documents
from longred.corpus.split import TEST, VALIDATION, DocumentSplit, document_sha256
from longred.corpus.windows import SampleSpec, build_samples, cut_samples, resolve_bos
from longred.eval.heldout import LeakError, ReadDocuments, check_not_trained_on, heldout_documents
from longred.models.loading import load_tokenizer
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import run_precompute
from longred.storage import TeacherCache
from longred.train.config import TrainConfig
from longred.train.data import long_windows, run_split

GRAM = 16  # tokens; 16-grams of real text repeat across different documents of these corpora 0 times


def grams(windows_NT: np.ndarray, n: int = GRAM) -> set[tuple[int, ...]]:
    rows = [row.tolist() for row in windows_NT]
    return {tuple(row[i : i + n]) for row in rows for i in range(len(row) - n + 1)}


def precompute(teacher: Path, out: Path, **changes) -> TeacherCache:
    settings = dict(
        out=str(out),
        teacher=str(teacher),
        corpus="embedded:prose",
        heldout_share=0.2,
        short_len=64,
        short_samples=24,
        heldout=6,
        s2l_len=128,
        s2l_samples=6,
        layers=["1", "final"],
        top_k=4,
        shard_samples=8,
        codec="bf16",
        batch_tokens=512,
    )
    run_precompute(PrecomputeConfig(**(settings | changes)), progress=False)
    return TeacherCache(str(out))


def cache_windows(cache: TeacherCache) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(held-out short windows, {kind: training windows}) as stored in the cache."""
    group = zarr.open_group(cache.url, mode="r")
    short, s2l = group["short/input_ids"][:], group["s2l/input_ids"][:]
    heldout = list(cache.spec.kinds["short"].heldout)
    training = np.setdiff1d(np.arange(len(short)), heldout)
    return short[heldout], {"short": short[training], "s2l": s2l}


def whole_long_stream(config: dict, tokenizer, corpus: Path, folder: Path, cache=None) -> np.ndarray:
    """Training's long windows (real `long_windows`, the run's split), as many as the corpus's training
    documents fill: the stream reads every document it may read, so one it should not read would show."""
    train = TrainConfig(
        out=str(folder), rope="abf:theta=1e6", long_corpus=str(corpus), long_len=256, **config
    )
    split = run_split(train, cache)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tokens = sum(
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1
        for t in texts
        if not split.is_heldout(document_sha256(t))
    )
    train = dataclasses.replace(train, long_samples=tokens // 257)
    return np.asarray(
        long_windows(train, tokenizer, folder=folder / "data", rank=0, barrier=lambda: None, split=split)
    )


@pytest.mark.parametrize("two_corpora", [False, True], ids=["one corpus", "two corpora"])
def test_no_heldout_token_sequence_in_any_training_window(
    tiny_teacher_dir, prose_jsonl, tmp_path, two_corpora
):
    # one corpus: short, s2l and long texts all from prose_jsonl. Two corpora: short texts from
    # embedded:prose, s2l and long from prose_jsonl, which is embedded:prose's head: a document held out
    # of one corpus is held out of the other, because the split is a function of the text.
    corpora = {"corpus": "embedded:prose", "s2l_corpus": str(prose_jsonl)} if two_corpora else {}
    cache = precompute(tiny_teacher_dir, tmp_path / "cache.zarr", **({"corpus": str(prose_jsonl)} | corpora))
    tokenizer = load_tokenizer(tiny_teacher_dir)
    long_NT = whole_long_stream({"cache": cache.url}, tokenizer, prose_jsonl, tmp_path / "run", cache)
    heldout_NT, training = cache_windows(cache)
    training["long"] = long_NT
    assert len(heldout_NT) == 6 and all(len(w) for w in training.values())
    held = grams(heldout_NT)
    for kind, windows_NT in training.items():
        shared = held & grams(windows_NT)
        assert not shared, f"{len(shared)} held-out {GRAM}-grams inside {kind} training windows"
    # the cache's record names disjoint documents; so does the long stream's
    documents = cache.spec.split["documents"]
    assert not set(documents["heldout"]) & (set(documents["short"]) | set(documents["s2l"]))
    if not two_corpora:  # one corpus: the two kinds are cut from disjoint documents
        assert not set(documents["short"]) & set(documents["s2l"])
    recorded = json.loads((tmp_path / "run" / "data" / "long.json").read_text())["record"]
    assert not set(recorded["documents"]) & set(documents["heldout"])
    assert cache.spec.split["corpora"]["s2l"]["corpus"] == str(prose_jsonl)


def test_evaluation_long_texts_are_held_out_of_the_long_stream(tiny_teacher_dir, prose_jsonl, tmp_path):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    split = DocumentSplit(seed=0, heldout_share=0.2)
    train = {"method": "long-cpt", "heldout_share": 0.2}
    long_NT = whole_long_stream(train, tokenizer, prose_jsonl, tmp_path / "run")
    # what `longred eval` reads: long texts and passkey haystacks from held-out documents
    read = ReadDocuments(heldout_documents(str(prose_jsonl), field="text", split=split))
    eval_NT = build_samples(read, tokenizer, length=256, num_samples=4, mode="document").input_ids_NT
    shared = grams(eval_NT) & grams(long_NT)
    assert not shared, f"{len(shared)} evaluated {GRAM}-grams inside training's long windows"
    model_dir = tmp_path / "run" / "model"
    assert check_not_trained_on(model_dir, read.digests, what="long texts") > 0
    trained = json.loads((tmp_path / "run" / "data" / "long.json").read_text())["record"]["documents"]
    with pytest.raises(LeakError, match="long stream"):
        check_not_trained_on(model_dir, [read.digests[0], trained[0]], what="long texts")


def test_cache_info_prints_the_split(tiny_teacher_dir, tmp_path, capsys):
    cache = precompute(tiny_teacher_dir, tmp_path / "cache.zarr", short_samples=8, heldout=2, s2l_samples=2)
    assert main(["cache", "info", cache.url]) == 0
    out = capsys.readouterr().out
    documents = cache.spec.split["documents"]
    assert "longred-split-v1: seed 0, 20.0% of documents held out" in out
    assert f"heldout  {len(documents['heldout'])} documents of embedded:prose" in out
    assert f"s2l      {len(documents['s2l'])} documents of embedded:prose" in out


def test_bos_follows_the_tokenizer_unless_set(tiny_teacher_dir):
    tokenizer = load_tokenizer(tiny_teacher_dir)
    assert resolve_bos("auto", tokenizer) is False  # no BOS token: windows start as the text does
    with pytest.raises(ValueError, match="no BOS token"):
        resolve_bos("always", tokenizer)
    tokenizer.add_special_tokens(
        {"bos_token": "<|bos|>"}
    )  # give it one; "always" starts each document with it
    texts = [text[:40] for text in islice(embedded_documents("prose"), 3)]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    expected = [t for doc in ids for t in (tokenizer.bos_token_id, *doc, tokenizer.eos_token_id)]
    window = build_samples(texts, tokenizer, length=len(expected), num_samples=1, bos=True).input_ids_NT
    assert window[0].tolist() == expected
    _, record = cut_samples(
        SampleSpec(short_len=32, short_samples=4, heldout=0, s2l_samples=0, bos="always"), tokenizer
    )
    assert record["bos"] is True


def test_the_split_rule_is_the_one_format_md_spells_out():
    import hashlib

    def spelled_out(text: str, seed: int, share: float, salt: str = "heldout") -> bool:
        d = hashlib.sha256(text.encode("utf-8")).hexdigest()
        key = hashlib.sha256(f"longred-split-v1\0{salt}\0{seed}\0{d}".encode()).digest()
        return int.from_bytes(key[:8], "big") / 2**64 < share

    texts = list(islice(embedded_documents("prose"), 200))
    for seed, share in ((0, 0.05), (3, 0.5)):
        split = DocumentSplit(seed=seed, heldout_share=share)
        chosen = [split.is_heldout(document_sha256(t)) for t in texts]
        assert chosen == [spelled_out(t, seed, share) for t in texts]
        assert 0.5 * share < sum(chosen) / len(texts) < 1.5 * share
        parts = [split.part(document_sha256(t)) for t in texts]
        assert parts == [VALIDATION if spelled_out(t, seed, 0.5, "validation") else TEST for t in texts]


def test_validation_and_test_parts_are_disjoint_and_the_cache_holds_only_test(tiny_teacher_dir, tmp_path):
    cache = precompute(tiny_teacher_dir, tmp_path / "cache.zarr", short_samples=8, heldout=4, s2l_samples=2)
    split = DocumentSplit.from_record(cache.spec.split)
    assert split.validation_share == 0.5
    parts = {
        part: {
            document_sha256(t)
            for t in heldout_documents("embedded:prose", field="text", split=split, part=part)
        }
        for part in (VALIDATION, TEST)
    }
    every = {document_sha256(t) for t in heldout_documents("embedded:prose", field="text", split=split)}
    assert parts[VALIDATION] and parts[TEST] and not parts[VALIDATION] & parts[TEST]
    assert parts[VALIDATION] | parts[TEST] == every
    documents = cache.spec.split["documents"]
    assert set(documents["heldout"]) <= parts[TEST], "the cache's held-out samples are test texts"
    trained = set(documents["short"]) | set(documents["s2l"])
    assert not parts[VALIDATION] & trained


def test_a_split_recorded_before_the_parts_has_no_validation_part():
    record = DocumentSplit(seed=0, heldout_share=0.2).to_dict()
    del record["validation_share"]
    old = DocumentSplit.from_record(record)
    texts = list(islice(embedded_documents("prose"), 100))
    assert list(old.select(texts, role=TEST, kinds=("long",))) == list(
        old.select(texts, role="heldout", kinds=("long",))
    )
    with pytest.raises(ValueError, match="no validation part"):
        next(old.select(texts, role=VALIDATION, kinds=("long",)))
