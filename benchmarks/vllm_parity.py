"""Parity of the vLLM backend with the transformers backend on one teacher: captured targets of the
same samples, fp32 on both sides (the README's parity figures). Run from the vLLM environment:

    .venv-vllm/bin/python benchmarks/vllm_parity.py [--teacher DIR] [--layers 1,8,15,22,final]

Prints, per kind: the largest 1 - cos of every layer over all tokens; top-1 agreement; top-k ids
identical at positions whose top k + 1 log-probs are all more than 1e-5 (and 2e-4) apart; the largest
log-prob and tail differences (tail as log(1 - mass) and as mass).
"""

import argparse
import json

import numpy as np
import torch
from transformers import AutoConfig

from longred.models.loading import load_model, load_tokenizer, resolve_teacher
from longred.precompute.config import PrecomputeConfig
from longred.precompute.job import TransformersTeacher, build_spec_and_samples
from longred.precompute.vllm_capture import VllmTeacher


def compare(a, b, lm_head_VD: torch.Tensor, stats: dict) -> None:
    """Fold one batch's two CapturedTargets into ``stats``."""
    for layer, x in a.hidden.items():
        cos_BT = torch.nn.functional.cosine_similarity(x.double(), b.hidden[layer].double(), dim=-1)
        stats["max_1_minus_cos"][layer] = max(
            stats["max_1_minus_cos"].get(layer, 0.0), (1 - cos_BT).max().item()
        )
    with torch.no_grad():
        top_BTK1 = (
            (a.hidden["final"] @ lm_head_VD.T).log_softmax(-1).topk(a.topk_ids.shape[-1] + 1, dim=-1).values
        )
    gap_BT = (top_BTK1[..., :-1] - top_BTK1[..., 1:]).min(-1).values
    same_BT = (a.topk_ids == b.topk_ids).all(-1)
    for tie in ("1e-5", "2e-4"):
        clear_BT = gap_BT > float(tie)
        done, total = stats[f"topk_ids_identical_gap_{tie}"]
        stats[f"topk_ids_identical_gap_{tie}"] = [
            done + int(same_BT[clear_BT].sum()),
            total + int(clear_BT.sum()),
        ]
    stats["top1_same"] += int((a.topk_ids[..., 0] == b.topk_ids[..., 0]).sum())
    stats["positions"] += same_BT.numel()
    for name, diff in [
        ("max_logprob_diff", a.topk_logprobs - b.topk_logprobs),
        ("max_tail_log_diff", a.tail_logmass - b.tail_logmass),
        ("max_tail_mass_diff", a.tail_logmass.exp() - b.tail_logmass.exp()),
    ]:
        stats[name] = max(stats[name], diff.abs().max().item())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--layers", default="1,8,15,22,final")
    parser.add_argument("--short", default="4x512", help="samples x tokens")
    parser.add_argument("--s2l", default="2x1024", help="samples x tokens")
    args = parser.parse_args()
    teacher_dir = resolve_teacher(args.teacher)
    (short_n, short_t), (s2l_n, s2l_t) = (map(int, x.split("x")) for x in (args.short, args.s2l))
    cfg = PrecomputeConfig(
        out="unused", teacher=str(teacher_dir), short_len=short_t, short_samples=short_n, heldout=0,
        s2l_len=s2l_t, s2l_samples=s2l_n, layers=args.layers, top_k=64, backend="vllm", dtype="float32",
    )  # fmt: skip
    spec, samples = build_spec_and_samples(
        cfg, load_tokenizer(teacher_dir), AutoConfig.from_pretrained(teacher_dir), teacher_dir
    )
    model = load_model(teacher_dir)
    hf, result = TransformersTeacher(model, spec), {}
    with VllmTeacher(teacher_dir, spec, dtype=torch.float32, **cfg.engine_settings()) as engine:
        for kind in spec.kinds:
            n, t = samples[kind].shape
            stats = {"max_1_minus_cos": {}, "top1_same": 0, "positions": 0, "max_logprob_diff": 0.0}
            stats |= {"max_tail_log_diff": 0.0, "max_tail_mass_diff": 0.0}
            stats |= {"topk_ids_identical_gap_1e-5": [0, 0], "topk_ids_identical_gap_2e-4": [0, 0]}
            step = max(1, cfg.batch_tokens // t)
            for first in range(0, n, step):
                ids = list(range(first, min(n, first + step)))
                input_ids_BT = torch.from_numpy(samples[kind][ids].astype(np.int64))
                compare(
                    hf.capture(kind, input_ids_BT, ids),
                    engine.capture(kind, input_ids_BT, ids),
                    model.lm_head.weight,
                    stats,
                )
            stats["top1_agreement"] = stats.pop("top1_same") / stats["positions"]
            result[kind] = {"samples": n, "tokens": n * t, **stats}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
