"""Memory modes of full fine-tuning on CPU: FSDP2 CPU offload (a one-rank group) and activation offloading
train the same trajectory as the plain run, and CPU offload resumes exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_train_config import one_thread  # noqa: F401 (fixture)
from test_train_equivalence import cache_with
from test_train_run import losses, tiny_config

from longred.train import run_training
from longred.train.trainable import offload_activations


@pytest.fixture(scope="module")
def cache(tiny_teacher_dir, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("train-memory")
    return cache_with(
        tiny_teacher_dir, folder, "bf16", short_samples=10, heldout=2, s2l_samples=8, batch_tokens=256
    )


def test_offloads_train_the_plain_trajectory_and_resume(tiny_teacher_dir, cache, tmp_path):
    ckpt = dict(gradient_checkpointing=True, save_every=2)
    run_training(tiny_config(tiny_teacher_dir, cache, tmp_path / "plain", steps=4, **ckpt), progress=False)
    offload = dict(parallel="fsdp", cpu_offload=True, activation_offload=True)
    whole = tmp_path / "offload"
    run_training(tiny_config(tiny_teacher_dir, cache, whole, steps=4, **ckpt, **offload), progress=False)
    plain = losses(tmp_path / "plain")
    for row, reference in zip(losses(whole), plain, strict=True):
        assert row[0] == reference[0] and row[-1] == reference[-1]
        torch.testing.assert_close(row[1:-1], reference[1:-1], rtol=1e-5, atol=1e-6)
    # 2 + 2 steps == 4 steps under CPU offload (checkpoints gathered from the one-rank FSDP2 group)
    resumed = tmp_path / "resumed"
    run_training(tiny_config(tiny_teacher_dir, cache, resumed, steps=2, **ckpt, **offload), progress=False)
    run_training(tiny_config(tiny_teacher_dir, cache, resumed, steps=4, **ckpt, **offload), progress=False)
    assert losses(resumed) == losses(whole)
    final = load_file(whole / "model/model.safetensors")
    for name, tensor in load_file(resumed / "model/model.safetensors").items():
        assert torch.equal(tensor, final[name]), name


def test_activation_offload_packs_the_checkpointed_inputs():
    """Under the context a checkpointed block's input is saved through save_on_cpu's hook."""
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    x_BD = torch.randn(4, 8, requires_grad=True)
    packed = []
    original = torch.autograd.graph.save_on_cpu.__init__

    def spy(self, pin_memory=False, device_type="cuda"):
        original(self, pin_memory=pin_memory, device_type=device_type)
        pack = self.pack_hook
        self.pack_hook = lambda t: packed.append(t.shape) or pack(t)
        torch.autograd.graph.saved_tensors_hooks.__init__(self, self.pack_hook, self.unpack_hook)

    torch.autograd.graph.save_on_cpu.__init__ = spy
    try:
        with offload_activations(True, torch.device("cpu")):
            y = torch.utils.checkpoint.checkpoint(block, x_BD, use_reentrant=False)
        y.sum().backward()
    finally:
        torch.autograd.graph.save_on_cpu.__init__ = original
    assert (4, 8) in packed and x_BD.grad is not None
    packed.clear()
    with offload_activations(False, torch.device("cpu")):
        torch.utils.checkpoint.checkpoint(block, x_BD, use_reentrant=False)
    assert packed == []


def test_cpu_offload_shards_with_the_offload_policy(tiny_teacher_dir):
    """One process: `Distributed.setup(single_group=True)` makes the one-rank group FSDP2 needs, and
    every block is an FSDP2 unit with CPUOffloadPolicy; without the switch nothing is wrapped."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    from longred.models.loading import load_model
    from longred.train.parallel import Distributed, parallelize

    student = load_model(tiny_teacher_dir)

    def fsdp(**offload):
        return parallelize(
            student,
            blocks=student.model.layers,
            mode="fsdp",
            world_size=1,
            device=torch.device("cpu"),
            compile=False,
            **offload,
        )

    assert not isinstance(fsdp(), FSDPModule)
    dist = Distributed.setup("cpu", single_group=True)
    try:
        model = fsdp(cpu_offload=True)
        assert isinstance(model, FSDPModule)
        assert all(
            isinstance(b._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy)
            for b in student.model.layers
        )
        with pytest.raises(
            ValueError, match="cpu_offload is FSDP2's CPUOffloadPolicy: it needs parallel fsdp"
        ):
            parallelize(
                student,
                blocks=student.model.layers,
                mode="ddp",
                world_size=1,
                device=torch.device("cpu"),
                compile=False,
                cpu_offload=True,
            )
    finally:
        dist.close()
