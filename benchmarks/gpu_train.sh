#!/usr/bin/env bash
# Training step on one H100: a random-weight Llama of about 1B parameters (hidden 2048, 16 blocks, GQA 32/8,
# MLP 8192) with 8K-token long texts, offline (cached teacher targets) vs online (the frozen teacher in memory).
#
# Needs: one CUDA GPU with >= 40 GB and the longred install (pip install -e .; without network,
# benchmarks/device_setup.sh installs it from carried wheels); nothing is downloaded.
# Run:   bash benchmarks/gpu_train.sh [OUT_DIR]        (default runs/gpu-train; about 5 minutes)
# Writes OUT_DIR/bench_train.json ({"device", "model", "offline": {"step_s", "peak_mem_mb"}, "online": ...,
# "step_ratio", "mem_saved_mb"}, as `longred bench train`) and OUT_DIR/gpu_train.json, which adds tokens/s.
# One step = 1 long text x 8192 tokens + 8 short x 256 + 1 s2l x 2048 (original window 2048, skipped positions
# spanning 8192), bf16 autocast, fp32 AdamW states, gradient checkpointing.
set -euo pipefail
OUT=$(realpath -m "${1:-$(dirname "$0")/../runs/gpu-train}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
source benchmarks/device_setup.sh

python3 - "$OUT" <<'PY'
import json, sys, time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longred.benchmarks.train import run_train_benchmark
from longred.models.tiny import build_tiny_teacher

out = Path(sys.argv[1])
assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
model_dir = out / "random-1b"
if not (model_dir / "model.safetensors").is_file() and not (model_dir / "model.safetensors.index.json").is_file():
    build_tiny_teacher(model_dir, max_position_embeddings=2048)  # its BPE tokenizer (ids < 512) and folder
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
                         eos_token_id=0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    print(f"random model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    for stale in model_dir.glob("model*.safetensors*"):  # the tiny model's weights
        stale.unlink()
    model.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()

settings = dict(long_len=8192, short_len=256, short_samples=32, s2l_len=2048, s2l_samples=8, short_batch=8,
                layers=("1", "4", "8", "12", "final"), steps=6, rope="abf:theta=500000")
start = time.time()
result = run_train_benchmark(str(out / "bench_train.json"), teacher=str(model_dir), **settings)
tokens = settings["long_len"] + settings["short_batch"] * settings["short_len"] + settings["s2l_len"]
for mode in ("offline", "online"):
    result[mode]["tokens_per_s"] = round(tokens / result[mode]["step_s"], 1)
result["tokens_per_step"] = tokens
result["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
result["wall_s"] = round(time.time() - start, 1)
(out / "gpu_train.json").write_text(json.dumps(result, indent=1) + "\n")
print(json.dumps(result, indent=1))
PY
