"""Settings of ``longred precompute`` (YAML keys and flags share these names)."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import ClassVar

from longred.base.config import at_least, check, comma_list, one_of
from longred.base.urls import check_urls
from longred.corpus.windows import PACKINGS, SampleSpec
from longred.ops.capture import DEFAULT_LAYERS, DEFAULT_TOP_K
from longred.storage import CODECS

__all__ = ["PrecomputeConfig"]

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
    """Next-token log-probabilities kept per position."""
    codec: str = "int8"
    """Hidden-state codec: bf16 (lossless), int8 (default), int8-outlier (higher fidelity)."""
    packing: str = _SAMPLES.packing
    """pack: documents joined with EOS and cut; document: one window per long-enough document."""
    batch_tokens: int = 8192
    """Tokens per teacher forward (batch size = batch_tokens // length, at least 1)."""
    shard_samples: int = 64
    """Samples per zarr shard."""
    seed: int = _SAMPLES.seed
    """Sample order and document windows."""
    overwrite: bool = False
    """Replace an existing cache made from other inputs instead of refusing it."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"codec": tuple(sorted(CODECS)), "packing": PACKINGS}

    def __post_init__(self) -> None:
        self.layers = list(comma_list(self.layers))
        problems = at_least(
            self, 1, "short_len", "short_samples", "s2l_len", "top_k", "batch_tokens", "shard_samples"
        )
        problems += at_least(self, 0, "heldout", "s2l_samples")
        problems += one_of(self)
        if not self.layers:
            problems.append("layers must name at least one layer")
        problems += check_urls(self, stores=("out",), folders=())
        check(problems, "precompute")

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
        )
