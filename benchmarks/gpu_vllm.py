"""vLLM-backend precompute throughput on GPUs with a random-weight model of Llama-3-8B's shape.

No download: the folder holds only config.json and the final norm's weight (the capture applies the
teacher's final norm itself); vLLM makes random weights (load_format "dummy"). Prints tokens/s of the
engine's bare prefill and of the vLLM precompute (extraction of 6 layers + top-64, int8 codec, zarr
writes), their ratio, and model FLOP utilisation (MFU = model FLOPs / time / the GPUs' dense bf16
peak). Run through gpu_vllm.sh.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from gpu_precompute import LLAMA3_8B, PEAK_BF16_FLOPS, flops_per_token
from safetensors.torch import save_file
from transformers import LlamaConfig

from longred.benchmarks.precompute import bench_spec
from longred.benchmarks.vllm_precompute import measure_vllm_precompute


def parameters(config: LlamaConfig) -> int:
    """Weights of a Llama of this shape (embeddings and untied lm_head included)."""
    d, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    block = d * (d + 2 * kv) + d * d + 3 * d * i + 2 * d
    return 2 * config.vocab_size * d + layers * block + d


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32, help="windows per generate call")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    args = parser.parse_args()
    config = LlamaConfig(**LLAMA3_8B, dtype=torch.bfloat16, tie_word_embeddings=False)
    folder = Path(tempfile.mkdtemp(prefix="llama3-8b-shape-"))
    config.save_pretrained(folder)
    save_file(
        {"model.norm.weight": torch.ones(config.hidden_size, dtype=torch.bfloat16)},
        folder / "norm.safetensors",
    )
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.samples, args.length), dtype=np.int64)
    teacher = {"name": "random-llama3-8b-shape", "config_sha256": "-", "weights_sha256": "random"}
    spec = bench_spec(
        config,
        ids,
        teacher=teacher,
        layers=("1", "9", "12", "14", "15", "final"),
        top_k=64,
        codec="int8",
        batch_size=args.batch_size,
    )
    result = measure_vllm_precompute(
        folder,
        ids,
        spec,
        dtype=torch.bfloat16,
        batch_size=args.batch_size,
        repeats=2,
        tensor_parallel_size=args.tensor_parallel_size,
        engine_args={"load_format": "dummy"},
    )
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    per_token = flops_per_token(config, parameters(config), args.length)
    result.update(
        device=f"{args.tensor_parallel_size} x {name}",
        model="Llama-3-8B shape, random bf16 weights (vLLM dummy load)",
        params=parameters(config),
        samples=args.samples,
        length=args.length,
        batch_size=args.batch_size,
    )
    if peak:
        gpus_peak = peak * args.tensor_parallel_size
        result["mfu_vllm_prefill"] = round(per_token * result["tokens_per_s_vllm_prefill"] / gpus_peak, 4)
        result["mfu_vllm_precompute"] = round(
            per_token * result["tokens_per_s_vllm_precompute"] / gpus_peak, 4
        )
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
