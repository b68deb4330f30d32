"""Regression: through the training path, a skipped-position s2l sample still attends to all its tokens.

transformers v5 reads jumps in position_ids as packed-sequence boundaries unless a mask is passed
(train/attention.py); this checks the trainer's own s2l micro-batch, the student's forward under
gradient checkpointing in train mode, and the loss it returns.

Legend: B batch, T tokens, D hidden size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_train_config import CONFIGS, one_thread  # noqa: F401 (fixture)
from test_train_equivalence import cache_with

from longred.base.config import load_config
from longred.models.loading import load_model
from longred.train import TrainConfig
from longred.train.trainer import Trainer


@pytest.fixture
def trainer(tiny_teacher_dir, tmp_path):
    cache = cache_with(
        tiny_teacher_dir,
        tmp_path,
        "bf16",
        short_samples=4,
        s2l_samples=2,
        layers=["1", "final"],
        batch_tokens=8192,
    )
    config = load_config(
        TrainConfig,
        path=str(CONFIGS / "tiny-cpu.yaml"),
        overrides=dict(
            out=str(tmp_path / "run"),
            teacher=str(tiny_teacher_dir),
            cache=cache,
            long_samples=2,
            gradient_checkpointing=True,
        ),
    )
    trainer = Trainer(config, progress=False)
    trainer.setup()
    yield trainer
    trainer.close()


def _full_causal_additive_mask(batch: int, tokens: int) -> torch.Tensor:
    future_TT = torch.ones(tokens, tokens, dtype=torch.bool).triu(diagonal=1)
    return (
        torch.zeros(tokens, tokens)
        .masked_fill(future_TT, torch.finfo(torch.float32).min)
        .expand(batch, 1, -1, -1)
    )


def test_s2l_sample_keeps_one_causal_sequence(trainer, tiny_teacher_dir):
    batch = trainer.micro_batch("s2l", step=0, index=1)
    ids_BT, pos_BT = batch.input_ids_BT, batch.position_ids_BT
    assert pos_BT.shape == (1, 64) and int(pos_BT.max()) >= 64 and bool((pos_BT.diff(dim=1) > 1).any())

    seen = []
    rotary = trainer.student.model.rotary_emb
    handle = rotary.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    try:
        assert trainer.student.training and trainer.student.is_activation_checkpointing
        loss = trainer.model(ids_BT, pos_BT, objective="s2l", targets=batch.targets)
        loss.backward()
    finally:
        handle.remove()
    assert torch.equal(seen[0], pos_BT), "the skipped positions must reach the rotary embedding"

    final_BTD = trainer.objectives.hidden_states(ids_BT, pos_BT)["final"].detach()
    changed_BT = ids_BT.clone()
    changed_BT[:, 0] = (changed_BT[:, 0] + 1) % trainer.student.config.vocab_size
    changed_BTD = trainer.objectives.hidden_states(changed_BT, pos_BT)["final"].detach()
    assert bool(((final_BTD - changed_BTD).abs().amax(dim=-1) > 1e-4).all()), "every token must see token 0"

    reference = load_model(
        tiny_teacher_dir,
        rope=trainer.config.rope,
        max_position_embeddings=trainer.config.window,
        attn_implementation="eager",
    )
    with torch.no_grad():
        want_BTD = reference.model(
            input_ids=ids_BT,
            position_ids=pos_BT,
            use_cache=False,
            attention_mask=_full_causal_additive_mask(*ids_BT.shape),
        ).last_hidden_state
    torch.testing.assert_close(final_BTD, want_BTD, atol=1e-5, rtol=0)
    teacher_BTD = batch.targets["hidden"]["final"].decode()  # cached targets come as stored
    cosine = F.cosine_similarity(want_BTD, teacher_BTD, dim=-1)
    torch.testing.assert_close(loss.detach(), 1 - cosine.mean(), atol=1e-6, rtol=0)
