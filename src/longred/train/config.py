"""TrainConfig: every setting of one `longred train` run, checked once, before anything is loaded.

The config is flat because it is the command line (`add_config_arguments` makes one flag per field, and
a YAML file in configs/ may set the same keys); the components take the typed pieces they need
(`PositionSampler`, `LRSchedule`, `step_plan`) from it. Checks that need the cache or the model (layers
stored, hidden size, lengths) happen when the run is built (`longred.train.student`, `.data`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from longred.base.config import at_least, check, comma_list, one_of
from longred.base.rope import RopeSpec, parse_rope_spec
from longred.base.urls import check_urls
from longred.corpus.windows import PACKINGS
from longred.train.tracking import REPORT_TO

__all__ = ["TrainConfig", "METHODS", "RESUMABLE_CHANGES", "SHORT_CORPUS_SETTINGS"]

METHODS = ("longred-c", "longred-u", "long-cpt", "mix-cpt")
"""LongReD with CREAM / uniform skipped positions; long-text-only and mixed-text continual pre-training."""
RESUMABLE_CHANGES = frozenset({"steps", "save_every", "keep_checkpoints", "report_to", "push_to_hub"})
"""Settings a rerun on the same `out` may change; any other difference refuses to resume."""
TRAINABLE = ("all", "attention", "lora")
"""Which student parameters train (longred.train.trainable)."""
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The attention projections of Llama, Mistral, Qwen2/3 blocks (module names inside `self_attn`)."""
SHORT_CORPUS_SETTINGS = ("short_len", "short_samples", "s2l_len", "s2l_samples", "top_k")
"""How the texts are cut from short_corpus (`longred precompute`'s settings of the same names)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Settings of `longred train` (YAML keys and flags share these names)."""

    # run -------------------------------------------------------------------------------------------
    out: str
    """Run folder: checkpoints/, model/ (the final student), metrics.jsonl, loss_curves.png."""
    method: str = "longred-c"
    """longred-c (CREAM skipped positions), longred-u (uniform), long-cpt (long texts only) or mix-cpt
    (cross-entropy on long, short and s2l texts)."""
    steps: int = 512
    """Optimizer steps; rerunning with a larger value continues a finished run."""
    seed: int = 0
    """Seed of the data order, the skipped positions and the long-text windows."""

    # model -----------------------------------------------------------------------------------------
    rope: RopeSpec
    """Extended RoPE of the student, e.g. abf:theta=2e7, pi:factor=4, yarn:factor=4 (longred.base.rope)."""
    long_len: int
    """Tokens per long text (T_long); each long sample holds long_len + 1 tokens."""
    extended_len: int | None = None
    """Window the skipped s2l positions span, and the student's new max length (default: long_len)."""
    teacher: str | None = None
    """Teacher model folder (the embedded SmolLM2-135M-Instruct when unset); loaded for teacher_mode
    online and the default student."""
    student: str | None = None
    """Initial student weights (default: the teacher's)."""
    allow_other_student: bool = False
    """Train a student whose weights or tokenizer differ from the teacher's (the cache's or the online
    one) instead of refusing."""
    dtype: str = "float32"
    """Student parameter dtype (float32 keeps fp32 master weights; compute is bf16 autocast on GPU)."""
    attn_implementation: str | None = None
    """sdpa, eager, flex_attention or flash_attention_2 (default: flash on CUDA when installed, else sdpa)."""

    # data ------------------------------------------------------------------------------------------
    cache: str | None = None
    """Teacher cache from `longred precompute` (short and s2l samples and targets); not needed by long-cpt."""
    short_corpus: str | None = None
    """Instead of a cache (teacher_mode online, mix-cpt): the corpus the short and s2l texts are cut from,
    exactly as `longred precompute` cuts them (with heldout 0)."""
    short_field: str = "text"
    """JSONL field or Parquet/dataset column of short_corpus."""
    short_len: int | None = None
    """With short_corpus: tokens per short text (default: precompute's, 1024)."""
    short_samples: int | None = None
    """With short_corpus: short texts cut (default: precompute's, 256)."""
    s2l_len: int | None = None
    """With short_corpus: tokens per s2l text, the original window (default: precompute's, 8192)."""
    s2l_samples: int | None = None
    """With short_corpus: s2l texts cut (default: precompute's, 16)."""
    top_k: int | None = None
    """With short_corpus: top-k of the live teacher's log-probabilities for s2l_kl_weight (default: 64)."""
    short_positions: float | None = None
    """With short_corpus: share of each short text's positions L_short averages over, drawn as precompute
    draws them (strided, from `seed` and the text's id), so a cache precomputed with the same
    short_positions trains the same (default: precompute's, 0.5); a cache fixes it."""
    long_corpus: str
    """Long-text corpus: file, folder, HF dataset folder, or embedded:prose / embedded:source."""
    long_field: str = "text"
    """JSONL field or Parquet/dataset column holding the long texts."""
    long_packing: str = "pack"
    """pack: documents joined with EOS and cut; document: one window per long-enough document."""
    long_samples: int = 1024
    """Long windows tokenized once (kept in out/data/); the stream cycles through them."""
    split_seed: int | None = None
    """Key of the document split (`longred.corpus.split`): documents it holds out are never read by the
    long stream (nor by short_corpus's texts). None: the cache's split, else precompute's default (0)."""
    heldout_share: float | None = None
    """Share of documents the split holds out. None: the cache's, else precompute's default (0.05)."""
    layers: list[str] | None = None
    """Distilled short-text layers, a subset of the cache's (default: all stored; with short_corpus:
    precompute's default layers)."""
    long_batch: int = 1
    """Long texts per micro-batch per rank."""
    short_batch: int = 8
    """Short texts per micro-batch per rank."""
    s2l_batch: int = 1
    """Short-to-long texts per micro-batch per rank."""

    # objectives ------------------------------------------------------------------------------------
    combine: str = "weighted"
    """weighted: one micro-batch per stream and step, L = L_long + a1 L_short + a2 L_s2l; interleaved:
    `interleave` micro-steps per step, each loss times its alpha, averaged (the authors' schedule)."""
    interleave: str = "8,6,2"
    """Micro-steps per optimizer step for long, short, s2l (combine interleaved)."""
    alpha_short: float = 5.0
    """a1, weight of L_short (docs/METHOD.md: 5 at 32K, 2 at 128K)."""
    alpha_s2l: float = 10.0
    """a2, weight of L_s2l (docs/METHOD.md: 10 at 32K, 15 at 128K)."""
    s2l_kl_weight: float = 0.0
    """Adds this times KL(teacher top-k + tail || student) to L_s2l (0: cosine only, as the paper)."""
    teacher_mode: str = "offline"
    """offline: targets streamed from the cache; online: the frozen teacher computes them live (on the
    cache's texts, or on texts cut from short_corpus: no cache needed)."""
    online_rounding: bool = False
    """teacher_mode online: round the live targets as the cache stores them (codec, float16 top-k)."""
    chunk_tokens: int = 1024
    """Tokens projected onto the vocabulary at once in cross-entropy and KL."""

    # optimisation ----------------------------------------------------------------------------------
    lr: float = 2e-5
    """Peak learning rate (AdamW, betas 0.9 / 0.95)."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices (norm weights and biases are not decayed)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many steps."""
    decay: str = "constant"
    """constant, or cosine from lr down to min_lr_ratio * lr at the last step (a rerun with more steps
    stretches the rest of the decay)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine decay, as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""

    # machinery -------------------------------------------------------------------------------------
    parallel: str = "ddp"
    """Under torchrun: ddp (replicated weights) or fsdp (FSDP2 fully_shard per block)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward."""
    compile: bool = False
    """torch.compile each transformer block."""
    device: str | None = None
    """cpu, cuda, cuda:N (default: cuda:LOCAL_RANK when available, else cpu)."""
    save_every: int = 0
    """Checkpoint every N steps (the last step is always saved; 0: only the last)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in out/checkpoints (older ones are deleted)."""
    push_to_hub: str | None = None
    """Hub repository (org/name) the final student is uploaded to after training (needs a token)."""
    report_to: str = "none"
    """Experiment tracking: none, tensorboard (out/tensorboard), wandb, trackio or mlflow (extras)."""

    # memory (README "Memory") ----------------------------------------------------------------------
    trainable: str = "all"
    """all (full fine-tuning), attention (only the q/k/v/o projections; the paper's PET) or lora (peft
    adapters; the final model/ is merged, adapter/ beside it)."""
    lora_rank: int = 16
    """trainable lora: rank r of every adapter."""
    lora_alpha: float = 32.0
    """trainable lora: scaling alpha (the update is alpha / r * B A)."""
    lora_dropout: float = 0.0
    """trainable lora: dropout on the adapters' input."""
    lora_target_modules: list[str] | None = None
    """trainable lora: module names adapted (default: q_proj,k_proj,v_proj,o_proj)."""
    frozen_dtype: str | None = None
    """Dtype of the frozen parameters (trainable attention or lora): bfloat16 halves them while the
    trainable ones keep `dtype` and fp32 AdamW state; needs CUDA (bf16 autocast). Default: dtype."""
    cpu_offload: bool = False
    """parallel fsdp: FSDP2 CPUOffloadPolicy (parameters, gradients and AdamW state in host memory)."""
    activation_offload: bool = False
    """With gradient_checkpointing: keep the checkpointed block inputs in (pinned) host memory."""
    optimizer: str = "adamw"
    """adamw (torch, state in the parameters' dtype) or adamw8bit (bitsandbytes, CUDA only: 2 bytes of
    state per parameter instead of 8)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "method": METHODS,
        "combine": ("weighted", "interleaved"),
        "teacher_mode": ("offline", "online"),
        "long_packing": PACKINGS,
        "decay": ("constant", "cosine"),
        "parallel": ("ddp", "fsdp"),
        "dtype": ("float32", "bfloat16"),
        "report_to": REPORT_TO,
        "trainable": TRAINABLE,
        "optimizer": ("adamw", "adamw8bit"),
    }

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = list(comma_list(self.layers))
        problems = one_of(self)
        problems += at_least(
            self, 1, "steps", "long_samples", "long_batch", "short_batch", "s2l_batch", "chunk_tokens"
        )
        problems += at_least(self, 1, "keep_checkpoints")
        problems += at_least(
            self,
            0,
            "warmup_steps",
            "save_every",
            "alpha_short",
            "alpha_s2l",
            "s2l_kl_weight",
            "weight_decay",
            "grad_clip",
        )
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.long_len < 2:
            problems.append(f"long_len must be >= 2, got {self.long_len}")
        if self.extended_len is not None and self.extended_len < self.long_len:
            problems.append(
                f"extended_len ({self.extended_len}) must be >= long_len ({self.long_len}); "
                "unset it to use long_len"
            )
        try:
            self.rope = parse_rope_spec(self.rope)  # parsed once: every later use holds the spec
        except ValueError as err:
            problems.append(f"rope: {err}")
        problems += self._objective_problems()
        problems += check_urls(self, stores=("cache",), folders=("out",))
        problems += self._memory_problems()
        check(problems, "train")

    def _memory_problems(self) -> list[str]:
        if self.lora_target_modules is not None:
            self.lora_target_modules = list(comma_list(self.lora_target_modules))
        problems = at_least(self, 1, "lora_rank")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        lora_set = [
            name
            for name in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")
            if getattr(self, name) != _DEFAULTS[name]
        ]
        if lora_set and self.trainable != "lora":
            problems.append(f"{', '.join(lora_set)} apply to trainable lora, not {self.trainable}")
        if self.frozen_dtype is not None:
            if self.frozen_dtype not in ("float32", "bfloat16"):
                problems.append(f"frozen_dtype must be float32 or bfloat16, got {self.frozen_dtype!r}")
            if self.trainable == "all":
                problems.append("frozen_dtype applies to trainable attention or lora (all trains everything)")
        if self.cpu_offload and self.parallel != "fsdp":
            problems.append(
                f"cpu_offload is FSDP2's CPUOffloadPolicy: it needs parallel fsdp, got {self.parallel}"
            )
        if self.activation_offload and not self.gradient_checkpointing:
            problems.append(
                "activation_offload offloads the checkpointed block inputs: set gradient_checkpointing"
            )
        return problems

    def _objective_problems(self) -> list[str]:
        problems = []
        distils = self.method in ("longred-c", "longred-u")
        given = [name for name in SHORT_CORPUS_SETTINGS if getattr(self, name) is not None]
        if self.short_corpus is None:
            problems += [
                f"{name} applies to the texts cut from short_corpus; a cache fixes it" for name in given
            ]
        problems += at_least(self, 1, *given)
        if self.short_positions is not None:
            if self.short_corpus is None or not distils:
                problems.append(
                    "short_positions applies to L_short on the texts cut from short_corpus (methods "
                    "longred-c, longred-u); a cache fixes it"
                )
            if not 0.0 < self.short_positions <= 1.0:
                problems.append(f"short_positions must be in (0, 1], got {self.short_positions}")
        if self.short_corpus is not None and self.method == "long-cpt":
            problems.append("short_corpus is unused: method long-cpt trains on long texts only")
        if self.heldout_share is not None and not 0.0 <= self.heldout_share < 1.0:
            problems.append(f"heldout_share must be in [0, 1), got {self.heldout_share}")
        if self.cache is not None and self.short_corpus is not None:
            problems.append("set cache or short_corpus, not both (a cache holds its own short and s2l texts)")
        if self.cache is None and self.method != "long-cpt":
            if distils and self.teacher_mode == "offline":
                problems.append(
                    f"method {self.method} with teacher_mode offline needs a cache (set cache); or set "
                    "teacher_mode online with short_corpus, or use method long-cpt"
                )
            elif self.short_corpus is None:
                problems.append(f"method {self.method} needs short and s2l texts: set cache or short_corpus")
        if self.online_rounding and self.cache is None:
            problems.append("online_rounding rounds live targets as a cache's codec does; it needs a cache")
        if self.teacher_mode == "online" and not distils:
            problems.append(
                f"teacher_mode online computes distillation targets; method {self.method} has none"
            )
        if self.online_rounding and self.teacher_mode != "online":
            problems.append("online_rounding needs teacher_mode online")
        if self.s2l_kl_weight > 0 and not distils:
            problems.append(f"s2l_kl_weight is a distillation term; method {self.method} has none")
        try:
            counts = self.interleave_counts
        except ValueError:
            problems.append(f"interleave must be three integers 'long,short,s2l', got {self.interleave!r}")
        else:
            if self.combine == "interleaved" and (min(counts) < 0 or counts[0] < 1):
                problems.append(
                    f"interleave needs >= 1 long and >= 0 short/s2l micro-steps, got {self.interleave!r}"
                )
            if self.combine == "interleaved" and self.method != "long-cpt" and min(counts[1:]) < 1:
                problems.append(
                    f"method {self.method} needs >= 1 short and s2l micro-step in interleave, "
                    f"got {self.interleave!r}"
                )
        return problems

    # derived ---------------------------------------------------------------------------------------
    @property
    def window(self) -> int:
        """The student's new maximum length: the extended window."""
        return self.extended_len or self.long_len

    @property
    def interleave_counts(self) -> tuple[int, int, int]:
        """(long, short, s2l) micro-steps of an interleaved optimizer step."""
        parts = [int(x) for x in comma_list(str(self.interleave))]
        if len(parts) != 3:
            raise ValueError(f"interleave needs 3 counts, got {self.interleave!r}")
        return parts[0], parts[1], parts[2]

    @property
    def streams(self) -> tuple[str, ...]:
        """The data streams this method trains on."""
        return ("long",) if self.method == "long-cpt" else ("long", "short", "s2l")

    @property
    def distils(self) -> bool:
        """Whether short and s2l texts are distilled (LongReD) rather than trained with cross-entropy."""
        return self.method in ("longred-c", "longred-u")

    @property
    def lora_modules(self) -> list[str]:
        """The module names LoRA adapts."""
        return self.lora_target_modules or list(ATTENTION_PROJECTIONS)

    def to_dict(self) -> dict:
        """The resolved settings, JSON- and YAML-able (the RoPE spec as its canonical string)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"rope": str(self.rope)}


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name.startswith("lora_")}
