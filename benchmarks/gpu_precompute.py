"""Precompute throughput on one GPU with a random-weight model of Llama-3-8B's shape (no download).

Prints tokens/s of the bare forward and of the full precompute, overhead_ratio and model FLOP
utilisation (MFU = model FLOPs / time / the GPU's dense bf16 peak). Run through gpu_precompute.sh.
"""

import argparse
import json

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longred.benchmarks.precompute import measure_precompute

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(config: LlamaConfig, params: int, length: int) -> float:
    """2 x parameters (matmuls, embeddings excluded) + causal attention scores and values."""
    embedding = config.vocab_size * config.hidden_size
    attention = 2 * config.num_hidden_layers * length * config.hidden_size  # QK^T and AV, causal half
    return 2 * (params - embedding) + attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA3_8B, dtype=torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.samples, args.length), dtype=np.int64)
    result = measure_precompute(
        model,
        ids,
        teacher={"name": "random-llama3-8b-shape", "config_sha256": "-", "weights_sha256": "random"},
        layers=("1", "9", "12", "14", "15", "final"),
        top_k=64,
        codec="int8",
        batch_size=args.batch_size,
        repeats=2,
    )
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    per_token = flops_per_token(config, params, args.length)
    result.update(
        device=name,
        model="Llama-3-8B shape, random bf16 weights",
        params=params,
        attn_implementation=model.config._attn_implementation,
    )
    if peak:
        result["mfu_forward"] = round(per_token * result["tokens_per_s_forward"] / peak, 4)
        result["mfu_precompute"] = round(per_token * result["tokens_per_s_precompute"] / peak, 4)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
