"""Settings of ``longred precompute`` (YAML keys and flags share these names)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import ClassVar

from longred.base.config import at_least, check, comma_list, one_of
from longred.base.urls import check_urls
from longred.corpus.windows import BOS_CHOICES, PACKINGS, SampleSpec
from longred.ops.capture import DEFAULT_LAYERS, DEFAULT_TOP_K
from longred.storage import (
    CODECS,
    DEFAULT_SHORT_POSITIONS,
    DEFAULT_ZSTD_LEVEL,
    POSITION_SAMPLING,
    TOPK_SAMPLES,
    ZSTD_LEVELS,
)

__all__ = ["PrecomputeConfig", "BACKENDS", "DTYPES"]

BACKENDS = ("transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_VLLM_ONLY = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_model_len",
    "kv_cache_gib",
    "engine_args",
)

_SAMPLES = SampleSpec()  # the sample settings' defaults


@dataclass(kw_only=True)
class PrecomputeConfig:
    """Settings of ``longred precompute`` (YAML keys and flags share these names)."""

    out: str
    """Cache path or fsspec URL."""
    teacher: str | None = None
    """Hugging Face model folder; None = the embedded SmolLM2-135M-Instruct."""
    corpus: str = _SAMPLES.corpus
    """Text/JSONL/Parquet file, folder, saved HF dataset, or embedded:prose / embedded:source."""
    field: str = _SAMPLES.field
    """JSONL field or Parquet/dataset column holding the text."""
    s2l_corpus: str | None = _SAMPLES.s2l_corpus
    """Corpus of the short-to-long texts (the paper takes them from a general pre-training corpus);
    None: `corpus`, with the s2l texts cut from documents disjoint from the short texts'."""
    s2l_field: str | None = _SAMPLES.s2l_field
    """Field or column of `s2l_corpus`; None: `field`."""
    short_len: int = _SAMPLES.short_len
    """Tokens per short-distillation sample (T_s; 1/8 of the original window in the paper)."""
    short_samples: int = _SAMPLES.short_samples
    """Short samples for training."""
    heldout: int = _SAMPLES.heldout
    """Extra short samples kept for evaluation (stored, never streamed to training)."""
    s2l_len: int = _SAMPLES.s2l_len
    """Tokens per short-to-long sample: the teacher's original window."""
    s2l_samples: int = _SAMPLES.s2l_samples
    """Short-to-long samples (0 = none)."""
    layers: list[str] = dataclass_field(default_factory=lambda: list(DEFAULT_LAYERS))
    """Layers stored for `short` (HF numbering; 'final' = post-norm). `s2l` always stores 'final'."""
    top_k: int = DEFAULT_TOP_K
    """Next-token log-probabilities kept per position, where a top-k is stored (short_topk, s2l_topk)."""
    short_topk: str = "heldout"
    """Short samples that store the top-k: heldout (evaluation's KL reads it; training never does), all,
    none. Where none is stored the teacher's lm_head does not run."""
    s2l_topk: bool = False
    """Store the s2l samples' top-k (training's s2l_kl_weight > 0 needs it)."""
    short_positions: float = DEFAULT_SHORT_POSITIONS
    """Share of each training short sample's token positions whose hidden states are stored (default 0.5;
    1.0: all); training's L_short averages over exactly those while the student reads the whole text.
    Held-out samples keep all."""
    short_position_sampling: str = "strided"
    """Which positions (drawn from `seed` and the sample id): strided (evenly spaced, random offset) or
    random (uniform without replacement)."""
    codec: str = "int8"
    """Hidden-state codec: bf16 (lossless), int8 (default), int8-outlier (higher fidelity)."""
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    """Zstd level of every stored array (lossless at any level): 1 entropy-codes int8 codes (about 0.6
    bytes per value); -1 stores them about raw (1.0) and decodes about 3x faster, for a reader-bound run."""
    packing: str = _SAMPLES.packing
    """pack: documents joined with EOS and cut; document: one window per long-enough document."""
    batch_tokens: int = 8192
    """Tokens per teacher forward (batch size = batch_tokens // length, at least 1)."""
    shard_samples: int = 64
    """Samples per zarr shard."""
    seed: int = _SAMPLES.seed
    """Sample order and document windows."""
    split_seed: int = _SAMPLES.split_seed
    """Key of the document split (which documents are held out), independent of `seed`; training and
    evaluation must use the same one (they read it from the cache)."""
    heldout_share: float = _SAMPLES.heldout_share
    """Share of documents held out from every training stream (decided per document by a keyed hash);
    the `heldout` samples are cut from them."""
    s2l_share: float | None = _SAMPLES.s2l_share
    """With one corpus for both kinds: share of its training documents dealt to s2l; None: s2l's share
    of the requested tokens."""
    bos: str = _SAMPLES.bos
    """Start every document with the tokenizer's BOS token: always, never, or auto (what the tokenizer
    does for ordinary text: on for Llama-3, off for SmolLM2)."""
    overwrite: bool = False
    """Replace an existing cache made from other inputs instead of refusing it."""
    backend: str = "transformers"
    """Teacher engine: transformers (hooks on the Hugging Face model) or vllm (a vLLM engine, tensor /
    pipeline parallel; same cache, see README 'vLLM teacher backend')."""
    dtype: str = "auto"
    """Teacher dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."""
    tensor_parallel_size: int = 1
    """vllm: GPUs one engine splits each layer over (one engine per node, ranks over nodes)."""
    pipeline_parallel_size: int = 1
    """vllm: pipeline stages of one engine."""
    max_model_len: int | None = None
    """vllm: engine context length (default: the longest window + 1, for the generated token)."""
    gpu_memory_utilization: float = 0.9
    """vllm on CUDA: share of each GPU's memory the engine takes (weights, activations, KV cache)."""
    kv_cache_gib: float | None = None
    """vllm: KV-cache space in GiB (default: on CUDA what gpu_memory_utilization leaves; on CPU one
    batch's need, where vLLM would otherwise reserve 0.9 x RAM)."""
    enforce_eager: bool = True
    """vllm: run eagerly (default: a prefill-only job gains little from compilation and CUDA graphs,
    which cost ~90 s at start-up on CPU); `enforce_eager: false` in YAML compiles."""
    engine_args: dict | None = None
    """vllm: further vllm.LLM arguments (YAML mapping or a JSON object on the command line)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "codec": tuple(sorted(CODECS)),
        "packing": PACKINGS,
        "short_topk": TOPK_SAMPLES,
        "short_position_sampling": POSITION_SAMPLING,
        "bos": BOS_CHOICES,
        "backend": BACKENDS,
        "dtype": DTYPES,
    }

    def __post_init__(self) -> None:
        self.layers = list(comma_list(self.layers))
        problems = at_least(
            self, 1, "short_len", "short_samples", "s2l_len", "top_k", "batch_tokens", "shard_samples"
        )
        problems += at_least(self, 0, "heldout", "s2l_samples")
        problems += one_of(self)
        if not 0.0 < self.short_positions <= 1.0:
            problems.append(f"short_positions must be in (0, 1], got {self.short_positions}")
        if self.zstd_level not in ZSTD_LEVELS:
            problems.append(f"zstd_level must be in [-131072, 22], got {self.zstd_level}")
        if not self.layers:
            problems.append("layers must name at least one layer")
        if not 0.0 <= self.heldout_share < 1.0:
            problems.append(f"heldout_share must be in [0, 1), got {self.heldout_share}")
        if self.heldout and not self.heldout_share:
            problems.append(f"heldout={self.heldout} samples need heldout_share > 0 (held-out documents)")
        if self.s2l_share is not None and not 0.0 < self.s2l_share < 1.0:
            problems.append(f"s2l_share must be in (0, 1) or None, got {self.s2l_share}")
        if self.s2l_field is not None and self.s2l_corpus is None:
            problems.append("s2l_field applies to s2l_corpus; set s2l_corpus too (or drop s2l_field)")
        problems += check_urls(self, stores=("out",), folders=())
        problems += self._engine_problems()
        check(problems, "precompute")

    def _engine_problems(self) -> list[str]:
        if isinstance(self.engine_args, str):
            try:
                self.engine_args = json.loads(self.engine_args)
            except json.JSONDecodeError as err:
                return [f"engine_args must be a JSON object: {err}"]
        problems = at_least(self, 1, "tensor_parallel_size", "pipeline_parallel_size")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.engine_args is not None and not isinstance(self.engine_args, dict):
            problems.append(f"engine_args must be a mapping, got {self.engine_args!r}")
        if self.backend == "transformers":
            default = PrecomputeConfig.__dataclass_fields__
            problems += [
                f"{name} applies to backend 'vllm' only"
                for name in _VLLM_ONLY
                if getattr(self, name) != default[name].default
            ]
        return problems

    def engine_settings(self) -> dict:
        """The vllm engine's settings (``VllmTeacher`` keyword arguments besides dtype)."""
        return {
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_gib": self.kv_cache_gib,
            "enforce_eager": self.enforce_eager,
            "batch_tokens": self.batch_tokens,
            "engine_args": self.engine_args,
        }

    def sample_spec(self) -> SampleSpec:
        """The settings that decide the samples' token ids."""
        return SampleSpec(
            corpus=self.corpus,
            field=self.field,
            short_len=self.short_len,
            short_samples=self.short_samples,
            heldout=self.heldout,
            s2l_len=self.s2l_len,
            s2l_samples=self.s2l_samples,
            packing=self.packing,
            seed=self.seed,
            s2l_corpus=self.s2l_corpus,
            s2l_field=self.s2l_field,
            split_seed=self.split_seed,
            heldout_share=self.heldout_share,
            s2l_share=self.s2l_share,
            bos=self.bos,
        )
