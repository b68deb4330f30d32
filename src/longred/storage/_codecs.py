"""Hidden-state codecs: quantization done in torch, outside zarr, so any zarr client reads every array.

Shape legend: N samples, T tokens, D hidden size, G groups of ``GROUP`` values, K outlier channels.

A codec turns float hidden states ``hidden_NTD`` into a few named integer/float arrays
(``codes`` and, for the quantized codecs, ``scale`` and the outlier arrays) and back. Encoding runs on
whatever device the input lives on (the teacher's GPU during precompute), so only the compact codes
cross to the host. All arrays are then stored with Zstd level 1 (see FORMAT.md).

Measured on SmolLM2-135M activations (``longred bench storage``, README): ``int8`` keeps cosine >= 0.999
at about a third of bf16's bytes; ``int8-outlier`` also keeps the relative L2 error under 1%.
The cosine losses are invariant to each token's scale, which is why per-token scales are enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

__all__ = ["HiddenCodec", "Bf16Codec", "Int8Codec", "Int8OutlierCodec", "get_codec", "CODECS"]


def bf16_bits(values: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 and return the raw 16 bits as int16 (stored as uint16)."""
    return values.to(torch.bfloat16).view(torch.int16)


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`bf16_bits`: raw uint16 bits -> float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()


def _int8_absmax(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per token (last axis): value ~= code * scale."""
    hidden = hidden.float()
    absmax = torch.linalg.vector_norm(hidden, ord=float("inf"), dim=-1, keepdim=True)  # no |x| temporary
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    codes = (hidden * scale.reciprocal()).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale.squeeze(-1)


@dataclass(frozen=True)
class HiddenCodec:
    """Base class: ``encode`` -> dict of arrays, ``decode`` -> float32 tensor of the original shape."""

    name: ClassVar[str]

    def array_specs(self, hidden_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-token trailing shape and numpy dtype of each stored array (after the (N, T) axes)."""
        raise NotImplementedError

    def encode(self, hidden_NTD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode float hidden states (N, T, D) on their device; returns tensors ready for ``.numpy()``."""
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        """Decode stored arrays (leading axes (..., T)) to float32 hidden states (..., T, D)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"name": self.name}


@dataclass(frozen=True)
class Bf16Codec(HiddenCodec):
    """Lossless reference: the raw bfloat16 bits (zarr has no bfloat16 dtype)."""

    name: ClassVar[str] = "bf16"

    def array_specs(self, hidden_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"codes": ((hidden_size,), "uint16")}

    def encode(self, hidden_NTD: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"codes": bf16_bits(hidden_NTD)}

    def decode(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        return bf16_from_bits(arrays["codes"])


@dataclass(frozen=True)
class Int8Codec(HiddenCodec):
    """The default: int8 codes with one float32 absmax scale per token."""

    name: ClassVar[str] = "int8"

    def array_specs(self, hidden_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"codes": ((hidden_size,), "int8"), "scale": ((), "float32")}

    def encode(self, hidden_NTD: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scale = _int8_absmax(hidden_NTD)
        return {"codes": codes, "scale": scale}

    def decode(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        codes = torch.from_numpy(np.ascontiguousarray(arrays["codes"]))
        scale = torch.from_numpy(np.ascontiguousarray(arrays["scale"]))
        return codes.float().mul_(scale.unsqueeze(-1))


@dataclass(frozen=True)
class Int8OutlierCodec(HiddenCodec):
    """Higher fidelity: the K largest-magnitude channels of each token kept exactly in bf16, the rest int8.

    Transformer hidden states carry a few huge channels ("massive activations"); with them removed
    the per-token int8 scale fits the ordinary channels, cutting the error by an order of magnitude.
    """

    name: ClassVar[str] = "int8-outlier"
    outliers: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.outliers <= 256:
            raise ValueError(f"int8-outlier codec: outliers must be in [1, 256]. Got {self.outliers}.")

    def array_specs(self, hidden_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        if self.outliers >= hidden_size:
            raise ValueError(
                f"int8-outlier: outliers ({self.outliers}) must be < hidden size ({hidden_size})"
            )
        return {
            "codes": ((hidden_size,), "int8"),
            "scale": ((), "float32"),
            "outlier_idx": ((self.outliers,), "uint16"),
            "outlier_val": ((self.outliers,), "uint16"),
        }

    def encode(self, hidden_NTD: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = hidden_NTD.float()
        idx_NTK = hidden.abs().topk(self.outliers, dim=-1).indices
        val_NTK = hidden.gather(-1, idx_NTK)
        rest = hidden.scatter(-1, idx_NTK, 0.0)
        codes, scale = _int8_absmax(rest)
        return {
            "codes": codes,
            "scale": scale,
            "outlier_idx": idx_NTK.to(torch.int32).to(torch.int16),  # D < 65536: same bits as uint16
            "outlier_val": bf16_bits(val_NTK),
        }

    def decode(self, arrays: dict[str, np.ndarray]) -> torch.Tensor:
        codes = torch.from_numpy(np.ascontiguousarray(arrays["codes"]))
        scale = torch.from_numpy(np.ascontiguousarray(arrays["scale"]))
        hidden = codes.float().mul_(scale.unsqueeze(-1))
        idx = torch.from_numpy(np.ascontiguousarray(arrays["outlier_idx"]).astype(np.int64))
        hidden.scatter_(-1, idx, bf16_from_bits(arrays["outlier_val"]))
        return hidden

    def to_dict(self) -> dict:
        return {"name": self.name, "outliers": self.outliers}


CODECS: dict[str, type[HiddenCodec]] = {c.name: c for c in (Bf16Codec, Int8Codec, Int8OutlierCodec)}


def get_codec(spec: str | dict) -> HiddenCodec:
    """Build a codec from its name (``"int8"``) or its stored ``to_dict()`` form."""
    params = dict(spec) if isinstance(spec, dict) else {"name": spec}
    name = params.pop("name", None)
    if name not in CODECS:
        raise ValueError(f"Unknown hidden-state codec {name!r}; choose one of {sorted(CODECS)}.")
    return CODECS[name](**params)
