"""The vLLM teacher pass: the same ``CapturedTargets`` as ``TeacherCapture``, from a vLLM engine.

Shape legend: B batch, T tokens, D hidden size, K top-k, S layer slots the engine extracts.

vLLM runs the teacher (tensor / pipeline parallel, paged KV cache, continuous batching); each window
is one request of its T tokens that generates one token. Nothing after ``capture`` differs between
backends: ``fill_shards`` hands these targets to the same ``CacheWriter``.

- Hidden states: vLLM's ``extract_hidden_states`` speculative method keeps the residual stream at the
  requested layer ids in a cache-only layer; a KV connector (``_vllm_connector``) writes each finished
  request's slots to a file with the token ids it ran. vLLM layer id k is Hugging Face
  ``hidden_states[k]`` for k < L; id L is block L's output BEFORE the final norm, so ``final`` is that
  state passed through the teacher's own final-norm module (``final_norm``). vLLM sorts the ids: a
  layer's slot is its id's index among the sorted ids.
- Top-k: prompt log-probs (raw log-softmax of the logits). vLLM's entry at position t is the
  distribution *of* token t (position 0 has none); the cache's position t is the distribution of
  token t + 1. So position t comes from vLLM's t + 1, and the last from the generated token's
  log-probs (hence ``max_model_len >= T + 1``). In the flat layout each position has K + 1 entries,
  the actual token first, then ranks 1..K.
- Guards, each naming the sample: the token ids vLLM's output and its hidden-state file report equal
  the ids stored; the actual-token entries of the prompt log-probs are those ids shifted by one; every
  position has K + 1 entries ranked 1..K; the file has one slot per layer id; ``max_logprobs >= K``;
  the engine's layer ids are the ones asked for.
- Required engine settings (not options): prefix caching off (a repeated window would be computed,
  and extracted, only from its last uncached block), chunked prefill off (the connector extracts whole
  prompts), no tokenizer in the engine (ids in, ids out).

vLLM is imported only when an engine is built; without it ``MissingVllmError`` names the install.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from longred.ops.capture import CapturedTargets, tail_logmass
from longred.ops.layers import check_layers, layer_module
from longred.precompute.vllm_engine import (
    engine_arguments,
    engine_device,
    import_vllm,
    shutdown_engine,
    start_engine,
)
from longred.storage import CacheSpec

__all__ = ["VllmTeacher", "TokenMismatchError", "vllm_layer_ids", "topk_from_flat_logprobs", "final_norm"]


class TokenMismatchError(ValueError):
    """vLLM reports other token ids for a request than the ids the cache stores for that sample."""


def vllm_layer_ids(layers: tuple[str, ...] | list[str], num_layers: int) -> dict[str, int]:
    """Layer name -> vLLM aux layer id: ``"k"`` -> k for k < L, ``"final"`` -> L (block L's pre-norm
    output; the final norm is applied after extraction).

    Raises:
        ValueError: a layer the teacher lacks, or ``str(L)``, the post-norm index (ask for 'final').
    """
    ids = {}
    for name in check_layers(layers, num_layers):
        ids[name] = num_layers if name == "final" else int(name)
        if name != "final" and not 0 <= ids[name] < num_layers:  # check_layers refuses these first
            raise ValueError(f"Layer {name}: vLLM layer ids are 0..{num_layers - 1} and 'final'.")
    return ids


def topk_from_flat_logprobs(
    label: str, prompt, sample, token_ids: list[int], top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The cache's (T, K) top-k ids and log-probs of one window from vLLM's flat log-probs.

    Args:
        label: names the sample in errors.
        prompt: the request's ``prompt_logprobs`` (``FlatLogprobs``, T positions, position 0 empty).
        sample: the generated token's ``logprobs`` (``FlatLogprobs``, 1 position).
        token_ids: the T ids stored for the window.

    Raises:
        TokenMismatchError: the actual-token entries are not the stored ids shifted by one.
        ValueError: a position without K + 1 entries ranked 1..K.
    """
    t, width = len(token_ids), top_k + 1
    if len(prompt) != t or prompt.end_indices[0] != prompt.start_indices[0]:
        raise ValueError(f"{label}: expected {t} prompt positions with position 0 empty, got {len(prompt)}.")
    starts, ends = np.asarray(prompt.start_indices[1:]), np.asarray(prompt.end_indices[1:])
    if not (
        np.array_equal(ends - starts, np.full(t - 1, width))
        and np.array_equal(starts, np.arange(t - 1) * width)
    ):
        raise ValueError(
            f"{label}: every prompt position must hold {width} log-probs (the token, then top {top_k})."
        )
    ids_PW = np.asarray(prompt.token_ids, dtype=np.int64).reshape(t - 1, width)
    logprobs_PW = np.asarray(prompt.logprobs, dtype=np.float32).reshape(t - 1, width)
    ranks_PW = np.asarray(prompt.ranks[: (t - 1) * width], dtype=np.int64).reshape(t - 1, width)
    shifted = np.flatnonzero(ids_PW[:, 0] != np.asarray(token_ids[1:]))
    if shifted.size:
        raise TokenMismatchError(
            f"{label}: vLLM's prompt log-probs score other tokens than the stored ids at positions "
            f"{(shifted + 1).tolist()[:8]} (expected entry t to score stored token t)."
        )
    if len(sample) != 1 or sample.end_indices[0] - sample.start_indices[0] != width:
        raise ValueError(f"{label}: the generated token must carry {width} log-probs.")
    ranks_ok = np.array_equal(ranks_PW[:, 1:], np.broadcast_to(np.arange(1, width), (t - 1, top_k)))
    if not ranks_ok or list(sample.ranks[1:width]) != list(range(1, width)):
        raise ValueError(f"{label}: vLLM's top-{top_k} entries are not ranked 1..{top_k}.")
    ids_TK = np.concatenate([ids_PW[:, 1:], np.asarray([sample.token_ids[1:width]], dtype=np.int64)])
    logprobs_TK = np.concatenate(
        [logprobs_PW[:, 1:], np.asarray([sample.logprobs[1:width]], dtype=np.float32)]
    )
    return ids_TK, logprobs_TK


def final_norm(teacher_dir: str | os.PathLike[str], dtype: torch.dtype) -> torch.nn.Module:
    """The teacher's own final-norm module (its Hugging Face class, weights from its safetensors).

    Built from the config on the meta device, so only the norm's weights are ever read.
    """
    config = AutoConfig.from_pretrained(teacher_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    norm = layer_module(model.model, "final")
    prefix = next(name for name, module in model.named_modules() if module is norm)
    wanted = {f"{prefix}.{name}" for name, _ in norm.named_parameters()}
    found = {}
    for file in sorted(Path(teacher_dir).glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            found.update({key: weights.get_tensor(key) for key in wanted & set(weights.keys())})
    if found.keys() != wanted:
        raise FileNotFoundError(
            f"Teacher {teacher_dir}: no {sorted(wanted - found.keys())} in its safetensors."
        )
    norm = norm.to_empty(device="cpu")
    norm.load_state_dict({k.removeprefix(prefix + "."): v for k, v in found.items()}, strict=True)
    return norm.to(dtype).eval().requires_grad_(False)


class VllmTeacher:
    """A vLLM engine over the teacher that returns each kind's ``CapturedTargets`` for a batch.

    Args:
        teacher_dir: the Hugging Face folder (the one the cache's fingerprint hashes).
        spec: the cache spec: its kinds' layers (the engine extracts their union), top-k, lengths.
        dtype: torch dtype of the engine; the hidden states come back in it.
        engine: the other ``engine_arguments`` settings.
    """

    def __init__(self, teacher_dir, spec: CacheSpec, *, dtype: torch.dtype, **engine):
        vllm = import_vllm()
        config = AutoConfig.from_pretrained(teacher_dir)
        self.spec, self.dtype = spec, dtype
        names = sorted({n for ks in spec.kinds.values() for n in ks.layers}, key=lambda n: (n == "final", n))
        ids = vllm_layer_ids(names, config.num_hidden_layers)
        self.layer_ids = sorted(set(ids.values()))
        self.slot = {name: self.layer_ids.index(i) for name, i in ids.items()}
        self.device = engine_device()
        self.norm = final_norm(teacher_dir, dtype) if "final" in ids else None
        self.top_k, self.llm = spec.top_k, None
        self.scratch = tempfile.mkdtemp(prefix="longred-vllm-")
        try:
            kwargs = engine_arguments(
                teacher_dir,
                layer_ids=self.layer_ids,
                top_k=spec.top_k,
                max_len=max(ks.length for ks in spec.kinds.values()),
                dtype=str(dtype).removeprefix("torch."),
                scratch=self.scratch,
                device=self.device,
                **engine,
            )
            self.llm = start_engine(kwargs)
            asked = self.llm.llm_engine.vllm_config.speculative_config.draft_model_config.hf_config
            if list(asked.eagle_aux_hidden_state_layer_ids) != self.layer_ids:
                raise ValueError(
                    f"vLLM extracts layer ids {asked.eagle_aux_hidden_state_layer_ids}, not {self.layer_ids}."
                )
        except BaseException:
            self.close()
            raise
        self.sampling = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=self.top_k,
            logprobs=self.top_k,
            detokenize=False,
            flat_logprobs=True,
        )
        # samples that store no top-k: the hidden states only, no log-probs asked for
        self.bare = vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def capture(
        self, kind: str, input_ids_BT: torch.Tensor, sample_ids: list[int], *, topk: bool = True
    ) -> CapturedTargets:
        """The targets of one batch of ``kind`` (``sample_ids`` name the rows in errors), on the CPU; the
        top-k fields are None unless ``topk``."""
        layers = self.spec.kinds[kind].layers
        rows = input_ids_BT.cpu().tolist()
        sampling = self.sampling if topk else self.bare
        outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], sampling, use_tqdm=False)
        states, ids, logprobs = [], [], []
        for row, sample_id, out in zip(rows, sample_ids, outputs, strict=True):
            label = f"{kind} sample {sample_id}"
            _same_tokens(label, "its output", list(out.prompt_token_ids), row)
            states.append(self._states(label, out, row))
            if not topk:
                continue
            top = topk_from_flat_logprobs(
                label, out.prompt_logprobs, out.outputs[0].logprobs, row, self.top_k
            )
            ids.append(top[0])
            logprobs.append(top[1])
        states_BTSD = torch.stack(states)
        hidden = {name: states_BTSD[:, :, self.slot[name]] for name in layers}
        if "final" in hidden:
            hidden["final"] = self.norm(hidden["final"])
        if not topk:
            return CapturedTargets(hidden, None, None, None)
        logprobs_BTK = torch.from_numpy(np.stack(logprobs))
        return CapturedTargets(
            hidden, torch.from_numpy(np.stack(ids)), logprobs_BTK, tail_logmass(logprobs_BTK)
        )

    def _states(self, label: str, out, row: list[int]) -> torch.Tensor:
        """The (T, S, D) states of one request from its connector file (removed once read)."""
        from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
            cleanup_hidden_states,
            load_hidden_states,
        )

        path = (out.kv_transfer_params or {}).get("hidden_states_path")
        if path is None:
            raise ValueError(f"{label}: vLLM returned no hidden-state file.")
        data = load_hidden_states(path)
        cleanup_hidden_states(path)
        _same_tokens(label, "its hidden-state file", data["token_ids"].tolist(), row)
        states_TSD = data["hidden_states"]
        expected = (len(row), len(self.layer_ids), self.spec.hidden_size)
        if tuple(states_TSD.shape) != expected:
            raise ValueError(
                f"{label}: hidden-state file holds {tuple(states_TSD.shape)}, expected (T, layer ids "
                f"{self.layer_ids}, D) = {expected}."
            )
        return states_TSD.to(self.dtype)

    def close(self) -> None:
        """Stop the engine's processes and remove the scratch folder."""
        llm, self.llm = self.llm, None
        if llm is not None:
            shutdown_engine(llm)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> VllmTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _same_tokens(label: str, where: str, seen: list[int], stored: list[int]) -> None:
    if seen != stored:
        differ = [i for i, (a, b) in enumerate(zip(seen, stored, strict=False)) if a != b][:8]
        raise TokenMismatchError(
            f"{label}: the token ids vLLM ran ({where}) differ from the ids stored: {len(seen)} vs "
            f"{len(stored)} tokens, first differences at positions {differ}."
        )
