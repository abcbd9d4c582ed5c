"""How much memory a MiniLLM job takes on each GPU, from the models' shapes and the job's settings.

    python bench/memory_model.py      # the table of docs/performance.md: the largest pairs per GPU size

An estimate, term by term, of what the engine holds at its peak (the update of a phase), per GPU:

- teacher weights: 2 bytes a parameter in bf16, split over the GPUs when sharded (deepspeed.shard_teacher);
- student: 2 bytes (bf16 weights) + 4 (fp32 master copy) + 8 (AdamW moments) + 2 (gradients) a
  parameter, the last three split over the GPUs from ZeRO-1/2 on, all four at ZeRO-3;
- the update's activations: the student's layers keep about 34·hidden bytes a token for the backward
  (bf16; transformers' Llama-like layers), 2·hidden with gradient checkpointing plus one layer's worth;
- the update's logits: the student's (B × Lr × V, bf16, and the fp32 gradient the chunked loss writes),
  and the teacher's for the micro-batch (bf16);
- the phase's kept teacher logits: rollouts per GPU × Lr × V × 2 bytes, or nothing when recomputed;
- decoding: both models' KV caches for a sampling batch (layers × 2 × KV heads × head dim × 2 bytes a
  position) and a few fp32 copies of the batch's next-token logits;
- 1.5 GiB for the CUDA context, NCCL buffers and allocator slack.

`bench/memory.py` measures what the model predicts for the terms that grow with the job's size (the
kept logits); the table below uses the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's shape, as its config.json gives it."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attention + mlp + 2 * self.hidden) + embeddings

    def kv_bytes_per_position(self) -> int:
        return self.layers * 2 * self.kv_heads * (self.hidden // self.heads) * 2


# Published configs (config.json of each model).
TEACHERS = [
    Shape("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152_064, False),
    Shape("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128_256, False),
    Shape("Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152_064, False),
    Shape("Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152_064, False),
    Shape("Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128_256, False),
]
STUDENTS = [
    Shape("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151_936, True),
    Shape("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128_256, True),
    Shape("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151_936, True),
    Shape("Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128_256, True),
    Shape("Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151_936, True),
    Shape("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152_064, False),
]
FAMILY = {"Qwen": 152_064, "Llama": 128_256}  # teacher and student must share a vocabulary


@dataclass(frozen=True)
class Settings:
    gpus: int = 8
    zero_stage: int = 3
    shard_teacher: bool = True
    gradient_checkpointing: bool = True
    keep_teacher_logits: bool = False
    rollouts_per_phase: int = 256
    rollout_batch_size: int = 32
    micro_batch: int = 8
    prompt_tokens: int = 256
    response_tokens: int = 256


def kept_teacher_logits(settings: Settings, vocab: int) -> int:
    """The phase's teacher logits on each GPU when they are kept (bf16)."""
    return settings.rollouts_per_phase // settings.gpus * settings.response_tokens * vocab * 2


def per_gpu(teacher: Shape, student: Shape, s: Settings) -> dict[str, int]:
    """Bytes per GPU at the peak of a phase, term by term (see the module's docstring)."""
    vocab = max(teacher.vocab, student.vocab)
    split = s.gpus if s.zero_stage == 3 else 1
    state_split = s.gpus if s.zero_stage >= 1 else 1
    tokens = s.micro_batch * (s.prompt_tokens + s.response_tokens)
    activations = student.layers * tokens * student.hidden * (2 if s.gradient_checkpointing else 34)
    if s.gradient_checkpointing:
        activations += tokens * student.hidden * 34  # the one layer recomputed at a time
    decode_rows = s.rollout_batch_size
    decode_positions = decode_rows * (s.prompt_tokens + s.response_tokens)
    return {
        "teacher weights": teacher.params * 2 // (s.gpus if s.shard_teacher else 1),
        "student weights and optimizer": student.params * 2 // split + student.params * 14 // state_split,
        "update activations": activations,
        "update logits": s.micro_batch * s.response_tokens * vocab * (2 + 4 + 2),
        "kept teacher logits": kept_teacher_logits(s, vocab) if s.keep_teacher_logits else 0,
        "decoding": (teacher.kv_bytes_per_position() + student.kv_bytes_per_position()) * decode_positions
        + decode_rows * vocab * 4 * 4,
        "runtime": int(1.5 * GIB),
    }


def fits(teacher: Shape, student: Shape, s: Settings, gib: float) -> bool:
    return sum(per_gpu(teacher, student, s).values()) <= gib * GIB


def table(settings: Settings, gpu_sizes: tuple[int, ...] = (24, 80, 141)) -> str:
    """Markdown: for each teacher and GPU size, the largest student of its family that fits."""
    lines = [f"| teacher | {' | '.join(f'{g} GB per GPU' for g in gpu_sizes)} |", "|---|" + "---|" * len(gpu_sizes)]
    for teacher in TEACHERS:
        family = [
            s for s in STUDENTS if s.name.split("-")[0] == teacher.name.split("-")[0] and s.params < teacher.params
        ]
        cells = []
        for gib in gpu_sizes:
            best = max((s for s in family if fits(teacher, s, settings, gib)), key=lambda s: s.params, default=None)
            cells.append(
                f"{best.name} ({sum(per_gpu(teacher, best, settings).values()) / GIB:.0f} GB)" if best else "none"
            )
        lines.append(f"| {teacher.name} ({teacher.params / 1e9:.1f}B) | {' | '.join(cells)} |")
    return "\n".join(lines)


LAYOUTS = {
    "1 GPU: ZeRO-0, the whole teacher on the GPU, 64 rollouts a phase": Settings(
        gpus=1, zero_stage=0, shard_teacher=False, rollouts_per_phase=64
    ),
    "8 GPUs: ZeRO-3, the teacher sharded (deepspeed.shard_teacher), 256 rollouts a phase": Settings(),
}


def main() -> None:
    s = Settings()
    print(
        f"Gradient checkpointing, teacher logits recomputed, rollouts decoded {s.rollout_batch_size} at a time, "
        f"micro-batch {s.micro_batch}, {s.prompt_tokens} prompt + {s.response_tokens} response tokens, bf16. "
        "Each cell: the largest student of the teacher's family that fits, with the estimated peak per GPU."
    )
    for title, settings in LAYOUTS.items():
        print(f"\n{title}:\n")
        print(table(settings))


if __name__ == "__main__":
    main()
