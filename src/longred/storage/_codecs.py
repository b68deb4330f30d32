"""Hidden-state codecs: quantization done in torch, outside zarr, so any zarr client reads every array.

Shape legend: N samples, T tokens, D hidden size, K outlier channels; "..." any leading (sample) axes.

A codec turns float hidden states ``hidden_NTD`` into a few named integer/float arrays
(``codes`` and, for the quantized codecs, ``scale`` and the outlier arrays) and back. Encoding runs on
whatever device the input lives on (the teacher's GPU during precompute), so only the compact codes
cross to the host. All arrays are then stored with Zstd (level 1 by default, see FORMAT.md).

Measured on SmolLM2-135M activations (``longred bench storage``, README): ``int8`` keeps cosine >= 0.999
at about a third of bf16's bytes; ``int8-outlier`` also keeps the relative L2 error under 1%.
The cosine losses are invariant to each token's scale, which is why per-token scales are enough.

Training never needs the float32 decode on the host: ``StoredHidden`` carries a layer's stored arrays as
torch tensors (1 byte per value for int8, 2 for bf16, against 4 decoded), moves them to the device as they
are, and decodes there (``decode``), or for the cosine losses hands over ``direction``: for int8 the codes
themselves, whose per-token positive scale cancels in a cosine, so the scale array is never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

__all__ = ["HiddenCodec", "Bf16Codec", "Int8Codec", "Int8OutlierCodec", "StoredHidden", "get_codec", "CODECS"]
__all__ += ["stack_rows"]


def bf16_bits(values: torch.Tensor) -> torch.Tensor:
    """Round to bfloat16 and return the raw 16 bits as int16 (stored as uint16)."""
    return values.to(torch.bfloat16).view(torch.int16)


def bf16_from_bits(bits: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`bf16_bits`: raw 16 bits (numpy or torch) -> a bfloat16 view, no copy."""
    if isinstance(bits, np.ndarray):
        bits = torch.from_numpy(np.ascontiguousarray(bits).view(np.int16))
    return bits.view(torch.bfloat16)


def _tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A stored array as a torch tensor without a copy (uint16 bits become int16: same bits)."""
    if isinstance(array, torch.Tensor):
        return array
    array = np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        array = array.view(np.int16)
    return torch.from_numpy(array)


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
    parts: ClassVar[tuple[str, ...]]
    """Names of the stored arrays (``array_specs``' keys)."""

    def array_specs(self, hidden_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-token trailing shape and numpy dtype of each stored array (after the (N, T) axes)."""
        raise NotImplementedError

    def encode(self, hidden_NTD: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode float hidden states (N, T, D) on their device; returns tensors ready for ``.numpy()``."""
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Decode stored arrays (leading axes (..., T)) to float32 hidden states (..., T, D).

        Numpy arrays or torch tensors on any device (the result is on theirs)."""
        return self.decode_as(arrays, torch.float32)

    def decode_as(self, arrays: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """As ``decode``, in ``dtype``."""
        raise NotImplementedError

    def direction_parts(self) -> tuple[str, ...]:
        """The arrays ``direction_as`` reads (a subset of ``array_specs``' names)."""
        return self.parts

    def direction_as(self, arrays: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Each token's hidden state times some positive number of its own: all a cosine needs.

        The default is the decode itself; ``int8`` returns its codes (the per-token scale dropped)."""
        return self.decode_as(arrays, dtype)

    def to_dict(self) -> dict:
        return {"name": self.name}


@dataclass(frozen=True)
class Bf16Codec(HiddenCodec):
    """Lossless reference: the raw bfloat16 bits (zarr has no bfloat16 dtype)."""

    name: ClassVar[str] = "bf16"
    parts: ClassVar[tuple[str, ...]] = ("codes",)

    def array_specs(self, hidden_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"codes": ((hidden_size,), "uint16")}

    def encode(self, hidden_NTD: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"codes": bf16_bits(hidden_NTD)}

    def decode_as(self, arrays: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return bf16_from_bits(_tensor(arrays["codes"])).to(dtype)


@dataclass(frozen=True)
class Int8Codec(HiddenCodec):
    """The default: int8 codes with one float32 absmax scale per token."""

    name: ClassVar[str] = "int8"
    parts: ClassVar[tuple[str, ...]] = ("codes", "scale")

    def array_specs(self, hidden_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"codes": ((hidden_size,), "int8"), "scale": ((), "float32")}

    def encode(self, hidden_NTD: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scale = _int8_absmax(hidden_NTD)
        return {"codes": codes, "scale": scale}

    def decode_as(self, arrays: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        scale = _tensor(arrays["scale"])
        return _tensor(arrays["codes"]).to(torch.float32).mul_(scale.unsqueeze(-1)).to(dtype)

    def direction_parts(self) -> tuple[str, ...]:
        return ("codes",)

    def direction_as(self, arrays: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        # scale > 0 per token: codes * scale points where codes do (codes are exact in bf16: |c| <= 127)
        return _tensor(arrays["codes"]).to(dtype)


@dataclass(frozen=True)
class Int8OutlierCodec(HiddenCodec):
    """Higher fidelity: the K largest-magnitude channels of each token kept exactly in bf16, the rest int8.

    Transformer hidden states carry a few huge channels ("massive activations"); with them removed
    the per-token int8 scale fits the ordinary channels, cutting the error by an order of magnitude.
    """

    name: ClassVar[str] = "int8-outlier"
    parts: ClassVar[tuple[str, ...]] = ("codes", "scale", "outlier_idx", "outlier_val")
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

    def decode_as(self, arrays: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        scale = _tensor(arrays["scale"])
        hidden = _tensor(arrays["codes"]).to(torch.float32).mul_(scale.unsqueeze(-1))
        idx = _tensor(arrays["outlier_idx"]).to(torch.int64) & 0xFFFF  # uint16 bits held as int16
        hidden.scatter_(-1, idx, bf16_from_bits(_tensor(arrays["outlier_val"])).float())
        return hidden.to(dtype)

    def to_dict(self) -> dict:
        return {"name": self.name, "outliers": self.outliers}


@dataclass(frozen=True)
class StoredHidden:
    """One layer's hidden states (..., T, D) as the cache stores them: the codec's arrays, undecoded.

    Attributes:
        codec: the cache's codec.
        parts: array name -> tensor with leading axes (..., T): all of the codec's arrays, or only
            ``codec.direction_parts()`` (then only ``direction`` works: int8 without its scales).
    """

    codec: HiddenCodec
    parts: dict[str, torch.Tensor]

    @property
    def shape(self) -> torch.Size:
        """(..., T, D) of the decoded states."""
        return self.parts["codes"].shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def device(self) -> torch.device:
        return self.parts["codes"].device

    def __getitem__(self, index) -> StoredHidden:
        """Index the leading axes (a sample, a slice of samples, rows); the per-token axes stay whole."""
        return StoredHidden(self.codec, {name: t[index] for name, t in self.parts.items()})

    def take(self, positions_K: torch.Tensor) -> StoredHidden:
        """The tokens at ``positions_K`` (int64 (K,)) of one sample (T, D) -> (K, D); a copy."""
        return StoredHidden(self.codec, {name: t[positions_K] for name, t in self.parts.items()})

    @staticmethod
    def stack(items: list[StoredHidden]) -> StoredHidden:
        """A new leading axis over items of the same codec and arrays (the collate of a batch)."""
        names = tuple(items[0].parts)
        if any(tuple(item.parts) != names or item.codec != items[0].codec for item in items):
            raise ValueError("StoredHidden.stack: items hold different codecs or arrays.")
        return StoredHidden(items[0].codec, {n: stack_rows([i.parts[n] for i in items]) for n in names})

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> StoredHidden:
        """The same arrays on ``device``, as stored (1 byte per int8 code crosses, not 4)."""
        return StoredHidden(
            self.codec, {n: t.to(device, non_blocking=non_blocking) for n, t in self.parts.items()}
        )

    def pin_memory(self) -> StoredHidden:
        return StoredHidden(self.codec, {n: t.pin_memory() for n, t in self.parts.items()})

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The hidden states (..., T, D) in ``dtype``, computed where the arrays are.

        Raises:
            ValueError: the scales were not read (a direction-only read of an int8 cache).
        """
        missing = set(self.codec.parts) - set(self.parts)
        if missing:
            raise ValueError(
                f"StoredHidden ({self.codec.name}) holds only {sorted(self.parts)}; decoding needs "
                f"{sorted(missing)} too: read the cache with form='stored', not 'direction'."
            )
        return self.codec.decode_as(self.parts, dtype)

    def direction(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(..., T, D) in ``dtype``, each token a positive multiple of its hidden state (cosine targets)."""
        return self.codec.direction_as(self.parts, dtype)


CODECS: dict[str, type[HiddenCodec]] = {c.name: c for c in (Bf16Codec, Int8Codec, Int8OutlierCodec)}


def get_codec(spec: str | dict) -> HiddenCodec:
    """Build a codec from its name (``"int8"``) or its stored ``to_dict()`` form."""
    params = dict(spec) if isinstance(spec, dict) else {"name": spec}
    name = params.pop("name", None)
    if name not in CODECS:
        raise ValueError(f"Unknown hidden-state codec {name!r}; choose one of {sorted(CODECS)}.")
    return CODECS[name](**params)


def stack_rows(items: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(items)``; a view, not a copy, when the items are consecutive rows of one contiguous
    array (what a shard read in stream order hands out)."""
    first = items[0]
    size = first.numel()
    one_array = first.is_contiguous() and all(
        item.is_contiguous()
        and item.shape == first.shape
        and item.dtype == first.dtype
        and item.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and item.storage_offset() == first.storage_offset() + k * size
        for k, item in enumerate(items)
    )
    if not one_array:
        return torch.stack(items)
    return first.as_strided((len(items), *first.shape), (size, *first.stride()), first.storage_offset())
