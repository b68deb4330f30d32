#!/usr/bin/env bash
# The `longred bench memory` table on one CUDA GPU: a random-weight Llama-3-8B-shaped student (32 blocks,
# hidden 4096, MLP 14336, GQA 32/8, vocabulary 128256, untied) trained on 8K and 32K-token long texts, per
# memory mode: peak GPU memory (torch.cuda.max_memory_allocated), step time, tokens/s, next to the README's
# formula (longred.benchmarks.memory_formula). A mode that does not fit is recorded as "oom" (the formula
# says which should not). Each (mode, length) runs in a fresh process.
#
# Needs: one CUDA GPU (80 GB for the table as planned) and the longred install (benchmarks/device_setup.sh
# installs it from carried wheels); optional bitsandbytes for the 8-bit AdamW row; nothing is downloaded.
# Run:   bash benchmarks/gpu_memory.sh [OUT_DIR]        (default runs/gpu-memory; about 10 minutes on an H100)
# Writes OUT_DIR/gpu_memory.json: {"device", "rows": [{"mode", "tokens", "peak_gb", "formula_gb",
# "step_s", "tokens_per_s"} or {"mode", "tokens", "error"}]}.
# One step = the long-text micro-step (chunked cross-entropy, the largest of a LongReD step) under bf16
# autocast, 2 steps, the second timed. Full fine-tuning with FSDP2 CPU offload needs about 130 GB of host
# memory for the 8B student's fp32 weights, gradients and AdamW state: skipped on smaller hosts.
set -euo pipefail
OUT=$(realpath -m "${1:-$(dirname "$0")/../runs/gpu-memory}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
source benchmarks/device_setup.sh
rm -f "$OUT/rows.jsonl"
MODES=${MODES:-"lora-r16 lora-r64 attention attention+act-offload full full+cpu-offload full+8bit"}
LENGTHS=${LENGTHS:-"8192 32768"}

for tokens in $LENGTHS; do
  for mode in $MODES; do
    timeout 900 python3 - "$OUT" "$mode" "$tokens" <<'PY' || echo "{\"mode\": \"$mode\", \"tokens\": $tokens, \"error\": \"exit $?\"}" >> "$OUT/rows.jsonl"
import json, sys, time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longred.benchmarks.memory_formula import LLAMA3_8B, Mode, estimate
from longred.train.objectives import StudentObjectives
from longred.train.parallel import Distributed, parallelize
from longred.train.student import build_optimizer
from longred.train.trainable import apply_trainable, cast_frozen, offload_activations

out, name, tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
trainable = "lora" if name.startswith("lora") else name.split("+")[0].replace("full", "all")
rank = int(name.split("-r")[1]) if trainable == "lora" else 16
cpu_offload, act_offload, eightbit = "cpu-offload" in name, "act-offload" in name, "8bit" in name
row = {"mode": name, "tokens": tokens}
host_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 1e6
if cpu_offload and host_gb < 160:
    row["error"] = f"skipped: {host_gb:.0f} GB host memory, FSDP2 CPU offload of 8B needs about 130 GB"
    print(json.dumps(row)); open(out / "rows.jsonl", "a").write(json.dumps(row) + "\n"); sys.exit(0)
dist = Distributed.setup("cuda", single_group=cpu_offload)
config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6}, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("cpu" if cpu_offload else "cuda"):
    student = LlamaForCausalLM(config)  # fp32
student.config.use_cache = False
student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
student.train().requires_grad_(True)
apply_trainable(student, trainable=trainable, lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], seed=0)
if trainable != "all":
    cast_frozen(student, "bfloat16")
objectives = StudentObjectives(student, layers=(), chunk_tokens=1024, s2l_kl_weight=0.0)
model = parallelize(objectives, blocks=student.model.layers, mode="fsdp", world_size=1,
                    device=torch.device("cuda"), compile=False, cpu_offload=cpu_offload)
try:
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.1, kind="adamw8bit" if eightbit else "adamw",
                                device=torch.device("cuda"))
except ValueError as err:
    row["error"] = str(err)
    print(json.dumps(row)); open(out / "rows.jsonl", "a").write(json.dumps(row) + "\n"); sys.exit(0)
labels_BT = torch.randint(0, config.vocab_size, (1, tokens + 1), device="cuda")  # memory does not read values
positions_BT = torch.arange(tokens, device="cuda")[None]
mode = Mode(trainable=trainable, lora_rank=rank, checkpointing=True, b_frozen=2 if trainable != "all" else 4,
            b_act=2, cpu_offload=cpu_offload, activation_offload=act_offload, state_bytes=2 if eightbit else 8)
row["formula_gb"] = round(estimate(LLAMA3_8B, mode, tokens=tokens, chunk_tokens=1024)["peak"] / 1e9, 2)
try:
    times = []
    for _ in range(2):
        torch.cuda.synchronize(); start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16), offload_activations(act_offload, torch.device("cuda")):
            loss = model(labels_BT[:, :-1], positions_BT, objective="ce", labels_BT=labels_BT)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(); optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); times.append(time.perf_counter() - start)
    row |= {"peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "step_s": round(times[-1], 3),
            "tokens_per_s": round(tokens / times[-1], 1), "loss": round(loss.item(), 4)}
except torch.OutOfMemoryError:
    row["error"] = "oom"
row["device"] = torch.cuda.get_device_name()
print(json.dumps(row)); open(out / "rows.jsonl", "a").write(json.dumps(row) + "\n")
dist.close()
PY
  done
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
(out / "gpu_memory.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
for r in rows:
    print(f"{r['mode']:24} {r['tokens']:6}  " + (f"peak {r['peak_gb']:7.2f} GB  formula {r['formula_gb']:7.2f} GB  "
          f"{r['step_s']:7.3f} s/step  {r['tokens_per_s']:9.1f} tok/s" if "peak_gb" in r else r["error"]))
PY
