"""The memory formula of one student training step (README, "Memory"): what `longred bench memory` checks
against measurement and projects to Llama-3-8B at 32K.

Terms, in bytes, for a student with P parameters of which P_t train (N tokens per micro-batch, L blocks,
hidden size h, MLP size i, key/value width kv = kv_heads x head_dim, H heads, vocabulary V):

    W  weights           P_frozen * b_frozen + P_t * b_train
    G  gradients         P_t * b_train                      (the parameters' dtype)
    S  optimizer state   P_t * s                            (AdamW: 2 moments; s = 2 * b_train, 2 for 8-bit)
    A  activations       N * (L * c_mode + c_out) * b_act   without checkpointing
                         N * (L * h + c_out) * b_act        with it (the block inputs)
    X  logits chunk      chunk_tokens * V * 12              (fp32 logits, log-softmax, their gradient)
    T  transient         X; with checkpointing max(X, N * c_mode * b_act): one block recomputed in the
                         backward, after the logits' backward is done
    E  head gradient     2 * V * h * b_train when lm_head (or the tied embedding) trains: the accumulated
                         gradient and the one being added to it

    peak = W + S + max(A + T, G) + E

The backward frees each block's activations as it creates that block's gradients, so the peak is at its
start (all activations, the head's gradient) or its end (all gradients, the embedding's being summed
into the tied head's), whichever is larger; the
optimizer state exists from the first step on (the steady state is measured from step 2). c_mode, the
elements a block saves for its backward per token, was counted on transformers' Llama block (SDPA
attention) with `torch.autograd.graph.saved_tensors_hooks` (`count_saved_elements` recounts it):

    all         8h + 4i + 2kv + H + 2   (norm inputs and outputs, q/k/v input, attention q, k, v, output,
                                         log-sum-exp, o_proj input, MLP input, gate, silu, up, down input)
    attention   5h + 3i + 2kv + H + 2   (frozen MLP and norm weights: their inputs are not saved)
    lora        attention + 4r          (the four adapted projections each save their rank-r A output)

c_out (final norm) is 2.5h for `all`, 0.5h otherwise. With FSDP2 CPU offload the device holds only
the bf16 root (embeddings, lm_head) and two gathered blocks at a time; parameters, gradients and the
optimizer state live in host memory. Activation offloading moves the checkpointed block inputs (N * L
* h) to host memory, leaving one block's recomputation on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["ModelShape", "Mode", "estimate", "LLAMA3_8B"]

GB = 1e9


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The shape of a Llama-type student."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    params: int
    """Total parameters (embeddings counted once when tied)."""

    @property
    def kv(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    @property
    def block_params(self) -> int:
        h, kv, i = self.hidden, self.kv, self.intermediate
        return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h

    @property
    def attention_params(self) -> int:
        """q/k/v/o weights of all blocks (no biases: Llama)."""
        return self.layers * (2 * self.hidden**2 + 2 * self.hidden * self.kv)

    def lora_params(self, rank: int) -> int:
        """LoRA A and B of q, k, v, o in every block."""
        h, kv = self.hidden, self.kv
        return self.layers * rank * ((h + h) + (h + kv) + (h + kv) + (h + h))

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers LlamaConfig-like config."""
        h, i, layers, vocab = (
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.vocab_size,
        )
        kv = config.num_key_value_heads * h // config.num_attention_heads
        block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        tied = bool(config.tie_word_embeddings)
        return cls(
            layers=layers,
            hidden=h,
            intermediate=i,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            vocab=vocab,
            tied=tied,
            params=layers * block + vocab * h * (1 if tied else 2) + h,
        )


LLAMA3_8B = ModelShape(
    layers=32,
    hidden=4096,
    intermediate=14336,
    heads=32,
    kv_heads=8,
    vocab=128256,
    tied=False,
    params=32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 2 * 128256 * 4096 + 4096,
)
"""Meta-Llama-3-8B's shape (8.03e9 parameters)."""


@dataclass(frozen=True, kw_only=True)
class Mode:
    """One way to train: which parameters, their bytes, checkpointing and offloading."""

    trainable: str = "all"
    lora_rank: int = 16
    checkpointing: bool = False
    b_train: int = 4
    """Bytes per trainable parameter (and its gradient)."""
    b_frozen: int = 4
    """Bytes per frozen parameter."""
    state_bytes: int = 8
    """Optimizer bytes per trainable parameter (fp32 AdamW: 8; AdamW on bf16 params: 4; 8-bit: 2)."""
    b_act: int = 4
    """Bytes per saved activation element (4 in fp32 on CPU, about 2 under bf16 autocast)."""
    cpu_offload: bool = False
    """FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer state in host memory."""
    activation_offload: bool = False
    """Checkpointed block inputs in host memory."""


def saved_per_token(shape: ModelShape, mode: Mode) -> int:
    """c_mode: elements one block saves for its backward, per token."""
    h, i, kv, heads = shape.hidden, shape.intermediate, shape.kv, shape.heads
    if mode.trainable == "all":
        return 8 * h + 4 * i + 2 * kv + heads + 2
    frozen = 5 * h + 3 * i + 2 * kv + heads + 2
    return frozen + (4 * mode.lora_rank if mode.trainable == "lora" else 0)


def estimate(shape: ModelShape, mode: Mode, *, tokens: int, chunk_tokens: int) -> dict:
    """The formula's terms and peak, in bytes, for the device (and the host under CPU offload).

    Returns:
        {"trainable_params", "weights", "grads", "optimizer", "activations", "logits", "grad_head",
        "peak", "host"} (host: bytes the offloads put in host memory, 0 without).
    """
    trainable = {
        "all": shape.params,
        "attention": shape.attention_params,
        "lora": shape.lora_params(mode.lora_rank),
    }[mode.trainable]
    frozen = 0 if mode.trainable == "all" else shape.params - (trainable if mode.trainable != "lora" else 0)
    weights = frozen * mode.b_frozen + trainable * mode.b_train
    grads = trainable * mode.b_train
    optimizer = trainable * mode.state_bytes
    c_mode = saved_per_token(shape, mode)
    c_out = (5 * shape.hidden) // 2 if mode.trainable == "all" else shape.hidden // 2
    block_inputs = tokens * shape.layers * shape.hidden * mode.b_act
    logits = min(chunk_tokens, tokens) * shape.vocab * 12
    if mode.checkpointing:  # one block's recomputation comes after the logits' backward: never both
        activations = block_inputs + tokens * c_out * mode.b_act
        transient = max(logits, tokens * c_mode * mode.b_act)
    else:
        activations = tokens * (shape.layers * c_mode + c_out) * mode.b_act
        transient = logits
    grad_head = 2 * shape.vocab * shape.hidden * mode.b_train if mode.trainable == "all" else 0
    host = 0
    if mode.activation_offload:
        if not mode.checkpointing:
            raise ValueError("activation offloading applies on top of gradient checkpointing")
        activations -= block_inputs
        host += block_inputs
    if mode.cpu_offload:
        # device: the bf16 root (embeddings + lm_head) and two gathered bf16 blocks; no grads or state
        root = shape.vocab * shape.hidden * (1 if shape.tied else 2) * 2
        host += weights + grads + optimizer
        weights, grads, optimizer, grad_head = root + 2 * shape.block_params * 2, 0, 0, 0
    peak = weights + optimizer + max(activations + transient, grads) + grad_head
    return {
        "trainable_params": trainable,
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits,
        "transient": transient,
        "grad_head": grad_head,
        "peak": peak,
        "host": host,
        "mode": asdict(mode),
    }
