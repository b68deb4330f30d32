"""Checkpoints: everything a rerun of the same command needs to continue exactly where the run stopped.

One checkpoint is one folder `out/checkpoints/step-NNNNNN/`:

    model/          the student (save_pretrained: config.json with the extended RoPE, safetensors) + tokenizer
    optimizer.pt    AdamW state as a full, parameter-name-keyed state dict (any world size can read it)
    rng.pt          each rank's torch RNG states (CPU and CUDA)
    state.json      step, tokens, time_s, world_size, each rank's stream positions, effective weights
    config.json     the resolved TrainConfig; cache.json: the cache's fingerprint (null without a cache)

It is written into a scratch folder and renamed into place by rank 0 after every rank has contributed, so
a folder named step-N is always complete; the `keep` newest are kept. Full state dicts come from
`torch.distributed.checkpoint.state_dict` (one code path for one process, DDP and FSDP2; with FSDP2 they
are gathered to rank 0 on the CPU, so rank 0 needs the student's and optimizer's full size in host
memory: 16 bytes per parameter). The teacher is never passed here, and `save_checkpoint` checks that the
saved tensors are exactly the student's.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from longred.train.config import RESUMABLE_CHANGES

__all__ = ["latest_checkpoint", "save_checkpoint", "load_checkpoint", "check_resumable", "checkpoint_name"]

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    folder = Path(out) / "checkpoints"
    done = (
        sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / "state.json").is_file())
        if folder.is_dir()
        else []
    )
    return done[-1] if done else None


def check_resumable(folder: Path, *, config: dict, fingerprint: dict | None, world_size: int) -> None:
    """Refuse to continue from `folder` with changed settings (but `steps`, `save_every`,
    `keep_checkpoints`), another cache or another world size (stream positions are per rank). The run
    is its settings and its own state: `out` may differ (a moved or renamed run folder resumes).

    Raises:
        ValueError: naming every difference.
    """
    saved = json.loads((folder / "config.json").read_text())
    problems = [
        f"{k}: {saved.get(k)!r} -> {config.get(k)!r}"
        for k in sorted(set(saved) | set(config))
        if k not in RESUMABLE_CHANGES | {"out"} and saved.get(k) != config.get(k)
    ]
    if json.loads((folder / "cache.json").read_text()) != fingerprint:
        problems.append("the cache's fingerprint differs from the one the run started with")
    state = json.loads((folder / "state.json").read_text())
    if state["world_size"] != world_size:
        problems.append(f"world size {state['world_size']} -> {world_size}")
    if problems:
        raise ValueError(
            f"{folder.parent.parent} holds a run with other settings ({'; '.join(problems)}); use another "
            "out, or rerun with the settings it was started with."
        )


def save_checkpoint(
    folder: Path,
    *,
    model: nn.Module,
    student: nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    state: dict,
    streams: dict,
    config: dict,
    fingerprint: dict | None,
    keep: int,
) -> None:
    """Write a checkpoint (collective: every rank calls it; rank 0 writes).

    Args:
        folder: the checkpoint folder to create (out/checkpoints/step-NNNNNN).
        model: the module the optimizer was built from (maybe DDP- or FSDP2-wrapped).
        student: the `*ForCausalLM` inside it (saved with save_pretrained).
        tokenizer: saved beside the student so model/ is a complete Hugging Face folder.
        state: JSON-able run state (step, tokens, time_s, ...); this rank's `streams` are added per rank.
        config, fingerprint: the resolved config and the cache's fingerprint.
        keep: checkpoints kept (older ones deleted).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # tied weights (lm_head = embed_tokens) are stored once, as save_pretrained does
    tied = set(student.all_tied_weights_keys)
    model_sd = {k: v for k, v in get_model_state_dict(student, options=_FULL).items() if k not in tied}
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    rng = {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    per_rank = [None] * world
    if world > 1:
        dist.all_gather_object(per_rank, {"streams": streams, "rng": rng})
    else:
        per_rank = [{"streams": streams, "rng": rng}]
    if rank == 0:
        expected = set(student.state_dict()) - tied
        if set(model_sd) != expected:
            raise RuntimeError(
                f"Checkpoint tensors differ from the student's: {sorted(set(model_sd) ^ expected)[:5]}"
            )
        scratch = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            scratch.mkdir(parents=True)
            student.save_pretrained(scratch / "model", state_dict=model_sd)
            tokenizer.save_pretrained(scratch / "model")
            torch.save(optim_sd, scratch / "optimizer.pt")
            torch.save([r["rng"] for r in per_rank], scratch / "rng.pt")
            (scratch / "config.json").write_text(json.dumps(config, indent=1))
            (scratch / "cache.json").write_text(json.dumps(fingerprint, indent=1))
            full_state = {**state, "world_size": world, "streams": [r["streams"] for r in per_rank]}
            # state.json last: it marks the folder complete
            (scratch / "state.json").write_text(json.dumps(full_state, indent=1))
        except (OSError, RuntimeError) as err:  # torch.save on a full disk raises a bare RuntimeError
            shutil.rmtree(scratch, ignore_errors=True)
            free_mb = shutil.disk_usage(folder.parent).free / 2**20
            raise OSError(
                f"writing checkpoint {folder} failed ({' '.join(str(err).split())[:200]}); {free_mb:.0f} MiB "
                f"free in {folder.parent}. The last complete checkpoint is kept: free space and rerun."
            ) from err
        shutil.rmtree(folder, ignore_errors=True)
        scratch.rename(folder)
        for old in sorted(p for p in folder.parent.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    if world > 1:
        dist.barrier()


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer and this rank's RNG states; return the run state with this rank's streams.

    The student's weights are not loaded here: the run builds the student from `folder / "model"`.

    Returns:
        state.json's dict with `streams` replaced by this rank's entry.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    broadcast = dist.is_initialized()
    optim_sd = _load_tensors(folder / "optimizer.pt") if rank == 0 or not broadcast else {}
    set_optimizer_state_dict(
        model,
        optimizer,
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast),
    )
    rng = _load_tensors(folder / "rng.pt")[rank]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((folder / "state.json").read_text())
    state["streams"] = state["streams"][rank]
    return state


def _load_tensors(path: Path):
    """torch.load restricted to tensors and plain containers: a pickled object is refused, never run.

    Raises:
        ValueError: the file holds anything else (naming it).
    """
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than tensors and plain values; refusing to load it (a checkpoint file "
            "holds only those). Delete that checkpoint folder to resume from an older one."
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable torch tensor file: {err}") from err
