"""``longred bench storage``: codec fidelity and size, top-k fidelity, cache I/O, on real teacher activations.

Source: the teacher (default: the embedded SmolLM2-135M-Instruct) run over the embedded prose corpus
(pydoc topics and module docstrings of the standard library). Units:
- ``bytes_per_value``: stored bytes (after Zstd level 1, one sample per chunk as in the cache) per value.
- ``ratio_vs_bf16``: 2 bytes (a bf16 value, the size the method's cache estimates use) / bytes_per_value;
  ``ratio_vs_bf16_zstd`` compares with the ``bf16`` codec's own stored size instead.
- ``cos_*``, ``rel_l2``: per-token cosine and relative L2 error of decoded vs original states.
- ``encode_mb_s`` / ``decode_mb_s``: MB (1e6 bytes) of float32 values per second on one thread.
- ``kl_nats``: mean over tokens of KL(teacher distribution || top-k + tail bucket), the tail's mass
  spread uniformly over the other V - k tokens (what the cache can reproduce).
- ``io``: MB/s of teacher targets as tensors (float32 hidden states and log-probs, int64 ids: what the
  teacher hands to the writer and the reader hands to training), writing through CacheWriter (checks,
  encode, compress, checksum, completion records) and reading back through the streaming reader
  (decompress, decode); ``*_stored_mb_s`` count the cache's arrays before compression instead (int8
  codes are a quarter of float32). Random reads: whole samples by id.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch

from longred.base.io import atomic_write_json
from longred.corpus.documents import iter_documents
from longred.corpus.windows import build_samples
from longred.models.identity import teacher_identity
from longred.models.loading import load_model, load_tokenizer, resolve_teacher
from longred.ops.capture import TeacherCapture
from longred.storage import CODECS, CacheSpec, CacheWriter, KindSpec, TargetStream, TeacherCache, get_codec

__all__ = ["run_storage_benchmark"]

LAYERS = ("1", "8", "15", "22", "29", "final")
TOPK_SIZES = (16, 32, 64)


def run_storage_benchmark(
    *, out: str | None, teacher: str | None = None, samples: int = 16, length: int = 512, io_copies: int = 8
) -> dict:
    """Measure codecs, top-k and I/O; write the JSON to ``out`` (if given) and return it."""
    teacher_dir = resolve_teacher(teacher)
    model = load_model(teacher_dir)
    num_layers = model.config.num_hidden_layers
    layers = tuple(x for x in LAYERS if x == "final" or int(x) < num_layers)
    ids_NT = torch.from_numpy(
        build_samples(
            iter_documents("embedded:prose"),
            load_tokenizer(teacher_dir),
            length=length,
            num_samples=samples,
            corpus="embedded:prose",
        ).input_ids_NT.astype(np.int64)
    )
    capture = TeacherCapture(model, layers=layers, top_k=max(TOPK_SIZES))
    batches = [capture(ids_NT[i : i + 4]) for i in range(0, samples, 4)]
    hidden = {layer: torch.cat([b.hidden[layer] for b in batches]) for layer in layers}
    result = {
        "source": f"{teacher_dir.name}: {samples} x {length} tokens of embedded:prose, "
        f"layers {','.join(layers)}",
        "hidden": _hidden_codecs(hidden),
        "topk": _topk(model, hidden["final"]),
        "io": _io(teacher_dir, ids_NT, hidden, batches, vocab_size=model.config.vocab_size, copies=io_copies),
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
    return result


def _stored_bytes(array_NT: np.ndarray, zstd: numcodecs.Zstd) -> int:
    """Bytes after Zstd level 1 with one sample per chunk, as the cache stores them."""
    return sum(len(zstd.encode(np.ascontiguousarray(row))) for row in array_NT)


def _hidden_codecs(hidden: dict[str, torch.Tensor]) -> dict:
    zstd = numcodecs.Zstd(level=1, checksum=True)
    values = sum(h.numel() for h in hidden.values())
    results, bf16_bytes = {}, None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in CODECS:
            codec = get_codec(name)
            stored, cos, rel, encode_s, decode_s = 0, [], [], 0.0, 0.0
            for original in hidden.values():
                start = time.perf_counter()
                encoded = {k: v.numpy() for k, v in codec.encode(original).items()}
                encode_s += time.perf_counter() - start
                start = time.perf_counter()
                decoded = codec.decode(encoded)
                decode_s += time.perf_counter() - start
                stored += sum(_stored_bytes(a, zstd) for a in encoded.values())
                cos.append(torch.nn.functional.cosine_similarity(decoded, original, dim=-1).flatten())
                rel.append(((decoded - original).norm(dim=-1) / original.norm(dim=-1)).flatten())
            bytes_per_value = stored / values
            bf16_bytes = bf16_bytes or bytes_per_value  # bf16 comes first in CODECS
            results[name] = {
                "params": codec.to_dict(),
                "bytes_per_value": round(bytes_per_value, 4),
                "ratio_vs_bf16": round(2.0 / bytes_per_value, 3),
                "ratio_vs_bf16_zstd": round(bf16_bytes / bytes_per_value, 3),
                "cos_mean": round(torch.cat(cos).mean().item(), 6),
                "cos_min": round(torch.cat(cos).min().item(), 6),
                "rel_l2": round(torch.cat(rel).mean().item(), 5),
                "encode_mb_s": round(values * 4 / 1e6 / encode_s, 1),
                "decode_mb_s": round(values * 4 / 1e6 / decode_s, 1),
            }
    finally:
        torch.set_num_threads(threads)
    return results


@torch.no_grad()
def _topk(model, final_NTD: torch.Tensor) -> dict:
    """Bytes and KL of the top-k + tail representation, from the teacher's post-norm states."""
    zstd = numcodecs.Zstd(level=1, checksum=True)
    vocab = model.config.vocab_size
    sums = {k: {"kl": 0.0, "stored": 0} for k in TOPK_SIZES}
    tokens = 0
    for i in range(0, len(final_NTD), 4):
        final = final_NTD[i : i + 4]
        logprobs = (final @ model.lm_head.weight.T).float().log_softmax(-1)
        tokens += final.shape[0] * final.shape[1]
        for k in TOPK_SIZES:
            top = logprobs.topk(k, dim=-1)
            stored_logprobs = top.values.half()
            tail = logprobs.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
            q = (tail - np.log(vocab - k)).unsqueeze(-1).expand_as(logprobs).clone()
            q.scatter_(-1, top.indices, stored_logprobs.float())
            sums[k]["kl"] += (logprobs.exp() * (logprobs - q)).sum().item()
            for array in (top.indices.numpy().astype(np.uint16), stored_logprobs.numpy(), tail.numpy()):
                sums[k]["stored"] += _stored_bytes(array, zstd)
    return {
        str(k): {"bytes_per_token": round(v["stored"] / tokens, 2), "kl_nats": round(v["kl"] / tokens, 5)}
        for k, v in sums.items()
    }


def _io(
    teacher_dir: Path, ids_NT: torch.Tensor, hidden: dict, batches: list, *, vocab_size: int, copies: int
) -> dict:
    n, t = ids_NT.shape
    d = next(iter(hidden.values())).shape[-1]
    layers = tuple(hidden)
    spec = CacheSpec(
        teacher=teacher_identity(teacher_dir),
        tokenizer_sha256="bench",
        corpus_sha256="bench",
        kinds={"short": KindSpec(length=t, num_samples=n * copies, layers=layers)},
        hidden_size=d,
        vocab_size=vocab_size,
        top_k=max(TOPK_SIZES),
        codec={"name": "int8"},
        shard_samples=16,
    )
    logical = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in spec.arrays("short"))
    tensors = n * copies * t * (len(layers) * d * 4 + 8 + spec.top_k * (8 + 4) + 4)
    names = ("topk_ids", "topk_logprobs", "tail_logmass")
    topk = {name: torch.cat([getattr(b, name) for b in batches]) for name in names}
    with tempfile.TemporaryDirectory() as folder:
        url = f"{folder}/bench.zarr"
        start = time.perf_counter()
        with CacheWriter(url, spec) as writer:
            for copy in range(copies):
                for i in range(0, n, 4):
                    rows = slice(i, i + 4)
                    writer.add(
                        "short",
                        sample_ids=list(range(copy * n + i, copy * n + min(i + 4, n))),
                        input_ids=ids_NT[rows],
                        hidden={k: v[rows] for k, v in hidden.items()},
                        **{name: value[rows] for name, value in topk.items()},
                    )
        write_s = time.perf_counter() - start
        cache = TeacherCache(url)
        start = time.perf_counter()
        for _ in TargetStream(cache, "short", shuffle=False):
            pass
        read_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        picks = rng.integers(0, n * copies, size=32)
        start = time.perf_counter()
        for sample in picks:
            cache.read_sample("short", int(sample))
        random_s = time.perf_counter() - start
    return {
        "tensor_mb": round(tensors / 1e6, 1),
        "stored_mb": round(logical / 1e6, 1),
        "write_mb_s": round(tensors / 1e6 / write_s, 1),
        "seq_read_mb_s": round(tensors / 1e6 / read_s, 1),
        "write_stored_mb_s": round(logical / 1e6 / write_s, 1),
        "seq_read_stored_mb_s": round(logical / 1e6 / read_s, 1),
        "random_read_samples_s": round(len(picks) / random_s, 1),
    }
