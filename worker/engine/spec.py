"""The job spec: one pydantic model shared by the CLI, the API and the worker.

A spec is read from YAML or JSON. Unknown fields are rejected, so a typo never silently falls back
to a default. Defaults follow the MiniLLM paper and its reference code (LMOps `minillm/`) unless a
comment says otherwise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Method = Literal["minillm", "gkd", "kd", "seqkd", "sft"]

# Whole numbers are stored in 32-bit columns and handed to 32-bit C code (seeds, sizes).
INT32_MAX = 2**31 - 1
# The kernel's limits on a path (Linux NAME_MAX and PATH_MAX less its NUL).
NAME_MAX, PATH_MAX = 255, 4095


def _fits_a_path(value: str) -> str:
    """A model or data reference may be looked up on disk; past the kernel's limits that lookup
    fails with ENAMETOOLONG instead of answering "no such file", so such a value is refused here."""
    if len(value.encode()) > PATH_MAX or any(len(part.encode()) > NAME_MAX for part in value.split("/")):
        raise ValueError(f"is longer than a path can be ({NAME_MAX} bytes between slashes, {PATH_MAX} in all)")
    return value


Reference = Annotated[str, AfterValidator(_fits_a_path)]

# Upper bounds that a worker can use: a number past them is a typo or an attack, and would otherwise be
# accepted and fail only on a worker (a batch of 2**31 sequences, a step count past the 32-bit column).
MAX_STEPS = 1_000_000  # optimizer steps of a stage, warmup and intervals; two stages stay far below 2**31
MAX_BATCH = 4096  # sequences per micro-batch or per generation call, micro-batches per step, PPO epochs
MAX_TOKENS = 131_072  # a 128k context
MAX_RECORDS = 10_000_000  # records, prompts, rollouts, documents
MAX_COUNT = 1024  # layers, devices, checkpoints kept
Beta = Annotated[float, Field(ge=0, lt=1)]  # an AdamW beta: a decay rate


class _Section(BaseModel):
    # inf and nan are refused by every float field: `learning_rate: 1e999` reads as inf in YAML and JSON.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value):
        """Every whole number fits 32 bits; no text holds a NUL (PostgreSQL refuses it, paths end there)."""
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and not -INT32_MAX - 1 <= v <= INT32_MAX:
                raise ValueError(f"must be between {-INT32_MAX - 1} and {INT32_MAX}")
            if isinstance(v, str) and "\x00" in v:
                raise ValueError("must not contain a NUL character")
        return value


class InitFromTeacher(_Section):
    num_layers: int = Field(
        ge=1, le=MAX_COUNT, description="How many of the teacher's decoder layers the student keeps."
    )
    strategy: Literal["even", "first", "last"] = Field(
        "even", description="Which layers: evenly spaced (first and last included), the first block, or the last block."
    )


class StudentSpec(_Section):
    model: Reference | None = Field(
        None,
        description="Local Hugging Face directory, hub id, or builtin:NAME. Leave empty to derive from the teacher.",
    )
    init_from_teacher: InitFromTeacher | None = Field(
        None, description="Build the student from a subset of the teacher's layers (embeddings and head are copied)."
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> StudentSpec:
        if (self.model is None) == (self.init_from_teacher is None):
            raise ValueError("give exactly one of student.model and student.init_from_teacher")
        return self


# The fields of the record layouts (worker/engine/data.py): Dolly's, prompt/response, chat messages.
RecordField = Literal["instruction", "input", "output", "prompt", "response", "messages"]


class DataSpec(_Section):
    train: Reference = Field(
        "builtin:demo",
        description="Training set: a JSONL file (Dolly layout instruction/input/output, prompt/response, or chat "
        "messages), a Hugging Face dataset's parquet or arrow file or save_to_disk folder, hf:NAME[:split] where the "
        "hub is reachable, or builtin:demo (the project's own instructions; the teacher writes the references).",
    )
    selection: Reference | None = Field(
        None,
        description="Selection set: scored every eval.every_steps steps to choose the best checkpoint (highest "
        "Rouge-L); kept apart from the test set. Same forms as `train`. Empty: builtin:demo-selection for "
        "builtin:demo, else eval.selection_num_prompts training records are held out (those just before the test "
        "hold-out).",
    )
    eval: Reference | None = Field(
        None,
        description="Test set: scores the best checkpoint, the final model, the initial student and the teacher at "
        "the end of the job. Same forms as `train`. Empty: builtin:demo-eval for builtin:demo, else the last "
        "eval.num_prompts training records are held out.",
    )
    pretrain: Reference | None = Field(
        None,
        description="Pretraining corpus of MiniLLM's LM term (the paper's L_PT): a JSONL file of {\"text\": ...} "
        "records, a plain text file (one document), dataset:ID, or builtin:teacher-text (free text the teacher "
        "samples once from a few generic openings; cached). Empty: the LM term is off (see minillm.lm_data).",
    )
    teacher_text_documents: int = Field(
        256,
        ge=1,
        le=MAX_RECORDS,
        description="How many documents the teacher writes for builtin:teacher-text, each up to "
        "minillm.lm_chunk_tokens tokens (sampled once, then cached).",
    )
    prompt_format: Literal["chat", "alpaca"] = Field(
        "chat",
        description="`chat`: the teacher tokenizer's chat template; `alpaca`: the template of the MiniLLM paper.",
    )
    max_prompt_tokens: int = Field(
        256, ge=8, le=MAX_TOKENS, description="Records whose prompt is longer are skipped (as the paper does)."
    )
    max_response_tokens: int = Field(
        256, ge=1, le=MAX_TOKENS, description="Responses are cut to this many tokens; also the sampling length."
    )
    max_train_records: int | None = Field(
        None, ge=1, le=MAX_RECORDS, description="Use only the first N training records."
    )
    columns: dict[Annotated[str, Field(min_length=1, max_length=200)], RecordField] | None = Field(
        None,
        max_length=20,
        description="Columns of train, selection and eval that hold a record layout's fields under other names, "
        'e.g. {"question": "prompt", "answer": "response"} or {"conversations": "messages"}.',
    )


# The main method's learning rate when a spec gives none: the best of the rates bench/learning_rates.py tried
# for each method on the demo pair (a 10-layer student of SmolLM2-135M-Instruct, Dolly), docs/learning-rates.md.
DEFAULT_LEARNING_RATES: dict[str, float] = {
    "minillm": 5e-06,
    "gkd": 0.0001,
    "kd": 0.0003,
    "seqkd": 0.0003,
    "sft": 0.0001,
}


class TrainingSpec(_Section):
    steps: int = Field(
        1000, ge=1, le=MAX_STEPS, description="Optimizer steps of the main method (after any recovery stage)."
    )
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Sequences per micro-batch per process.")
    gradient_accumulation: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Peak learning rate of the main method. Empty: the method's default, measured on the demo pair "
        "(docs/learning-rates.md): "
        + ", ".join(f"{method} {rate:g}" for method, rate in DEFAULT_LEARNING_RATES.items())
        + " (the MiniLLM paper: 5e-6).",
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Shape after warmup (paper, MiniLLM: constant)."
    )
    warmup_steps: int = Field(100, ge=0, le=MAX_STEPS, description="Linear warmup steps (paper: 100).")
    weight_decay: float = Field(1e-6, ge=0, le=1, description="AdamW weight decay (reference code: 1e-6).")
    adam_betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW betas (reference code: 0.9, 0.95).")
    grad_clip: float = Field(1.0, gt=0, le=1e6, description="Gradient norm clipping.")
    seed: int = Field(10, description="Seed of every random choice: data order, sampling, initialisation.")
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each decoder layer's inputs from the student's forward and recompute the rest in "
        "the backward: activation memory for about a third more compute per step, in every method's updates.",
    )


class RecoverySpec(_Section):
    method: Literal["sft", "kd"] = Field(
        "kd", description="Stage run before the main method so the student starts from a sensible model."
    )
    steps: int = Field(100, ge=1, le=MAX_STEPS, description="Optimizer steps of the recovery stage.")
    learning_rate: float = Field(5e-4, gt=0, le=1, description="Peak learning rate of the recovery stage.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps of the recovery stage.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field("cosine", description="Shape after warmup.")


class MiniLLMSpec(_Section):
    teacher_mix_alpha: float = Field(0.2, ge=0, le=1, description="α in p̃ = α·teacher + (1−α)·student when sampling.")
    clip_range: float = Field(0.2, gt=0, le=10, description="PPO clip range ε on the importance ratio.")
    ppo_epochs: int = Field(4, ge=1, le=MAX_BATCH, description="Passes over each phase's rollouts.")
    # The reference samples 256 rollouts on 4+ GPUs with a global minibatch of 64: 16 updates per
    # phase. 64 rollouts at batch 8 on one process gives 32, so a default job resamples ~30 times.
    rollouts_per_phase: int = Field(
        64, ge=1, le=MAX_RECORDS, description="Rollouts sampled per phase, over all processes."
    )
    rollout_batch_size: int = Field(
        64,
        ge=1,
        le=MAX_BATCH,
        description="Prompts decoded together, at most: a process decodes its rollouts in batches of this size "
        "(one batch at the defaults). Larger batches decode faster and hold larger KV caches (the reference: 16).",
    )
    teacher_logits: Literal["auto", "keep", "recompute"] = Field(
        "auto",
        description="The single-step term needs the teacher's whole distribution at every rollout token. keep: "
        "kept for the phase from sampling (fastest; rollouts × response tokens × vocabulary × 2 bytes per process); "
        "recompute: the teacher runs again on each update's micro-batch (memory independent of the phase's size); "
        "auto: keep while that fits minillm.teacher_logits_budget_gb.",
    )
    teacher_logits_budget_gb: float = Field(
        4.0,
        gt=0,
        le=1e6,
        description="The most memory (GB per process, on its device) that teacher_logits auto lets the phase's "
        "teacher logits take before it recomputes them instead.",
    )
    length_normalization: bool = Field(True, description="Divide the long-term return by the number of future tokens.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of future rewards (paper: 1; reference code: 0.95).")
    reward_clip: float = Field(
        50.0,
        gt=0,
        le=1e4,
        description="Clip each token's reward log p_teacher − log q_student to ±this "
        "(reference code: ±100 on rewards it scales ×2, the same bound).",
    )
    whiten_advantages: bool = Field(
        True, description="Normalise advantages to zero mean, unit variance (valid tokens only)."
    )
    single_step: bool = Field(
        True, description="Add the exact per-token reverse KL over the vocabulary (single-step term)."
    )
    # The LM term as the paper has it: L_PT = −E_{d∼D_PT} log q_θ(d), a plain next-token loss on
    # chunks of pretraining text, added with weight lm_coef (reference: 1, 512-token chunks). The
    # reference code's L_PT mixes 0.5·cross-entropy + 0.5·word-level forward KL to the teacher
    # (losses.py::pt_loss, --kd-ratio 0.5). The default follows the paper (kd_ratio 0): the term is
    # there to keep the student a language model on general text (the paper's ablation: without it
    # classification accuracy drops), which the plain loss does without a teacher forward over the
    # LM batch; kd_ratio 0.5 reproduces the code.
    lm_data: Literal["pretrain", "train_responses"] = Field(
        "pretrain",
        description="Text of the LM term. pretrain: data.pretrain, the paper's L_PT (off when data.pretrain is empty); "
        "train_responses: the training set's responses (not the paper's L_PT; the teacher writes them where the "
        "data has none).",
    )
    lm_coef: float = Field(1.0, ge=0, le=1e4, description="Weight of the LM term (reference: 1); 0 turns it off.")
    kd_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of word-level forward KL to the teacher in the LM term, the rest being "
        "next-token cross-entropy: 0 is the paper's L_PT, 0.5 the reference code's.",
    )
    lm_chunk_tokens: int = Field(
        512,
        ge=2,
        le=MAX_TOKENS,
        description="Tokens per chunk of data.pretrain (reference: 512, of which 511 are predicted).",
    )
    temperature: float = Field(
        1.0, ge=0.01, le=100, description="Sampling temperature for rollouts (top-k 0, top-p 1)."
    )


class GKDSpec(_Section):
    # TRL's GKDTrainer (Agarwal et al., "On-Policy Distillation of Language Models", arXiv 2306.13649): its
    # names and defaults. At beta 1 and lmbda 1 it is MiniLLM's single-step term alone: the exact
    # per-token reverse KL on the student's own samples, without the long-term return or teacher mixing.
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="β of the generalised Jensen-Shannon divergence: 0 forward KL(teacher‖student), 1 reverse "
        "KL(student‖teacher), between: β·KL(p‖m) + (1−β)·KL(q‖m) with m = β·p + (1−β)·q (TRL: 0.5).",
    )
    lmbda: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of micro-batches trained on responses the student samples itself (on-policy); the rest "
        "train on the training responses, or the teacher's samples with seq_kd (TRL: 0.5).",
    )
    seq_kd: bool = Field(
        False, description="Off-policy micro-batches train on responses the teacher samples for their prompts."
    )
    temperature: float = Field(
        0.9,
        ge=0.01,
        le=100,
        description="Temperature of the sampling and of both distributions in the divergence (TRL: 0.9).",
    )


class KDSpec(_Section):
    kd_ratio: float = Field(0.5, ge=0, le=1, description="Loss = (1−r)·cross-entropy + r·forward KL(teacher‖student).")


# Each seed is a full pass of sampling and scoring; a bound also keeps a stored spec small.
MAX_SEEDS = 100


class EvalSpec(_Section):
    # The paper's protocol: sampled responses scored on a held-out test set, averaged over 5 seeds;
    # the checkpoint reported is the one with the best Rouge-L on a separate selection (validation) set.
    every_steps: int = Field(
        100,
        ge=0,
        le=MAX_STEPS,
        description="Score the selection set every N steps, and at the end, to choose the best checkpoint "
        "(0: only at the end).",
    )
    num_prompts: int = Field(64, ge=1, le=MAX_RECORDS, description="Test-set prompts (paper: the 500 of DollyEval).")
    seeds: list[int] = Field(
        [10, 20, 30, 40, 50],
        min_length=1,
        max_length=MAX_SEEDS,
        description="Sampling seeds on the test set; each score is the mean over seeds (paper: 10, 20, 30, 40, 50). "
        "One seed costs a fifth.",
    )
    selection_num_prompts: int = Field(
        32, ge=1, le=MAX_RECORDS, description="Selection-set prompts scored at each evaluation."
    )
    selection_seeds: list[int] = Field(
        [10],
        min_length=1,
        max_length=MAX_SEEDS,
        description="Sampling seeds on the selection set (the reference code samples its validation set once).",
    )
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="Prompts per generation call.")
    no_repeat_ngram_size: int = Field(6, ge=0, le=64, description="Paper's eval protocol: no repeated 6-grams.")
    sample_kl: bool = Field(
        False,
        description="Also score reverse_kl_samples: the per-token reverse KL to the teacher on the model's own "
        "sampled responses, per seed (what MiniLLM minimises; the default KLs are on the gold responses). Costs one "
        "student and one teacher forward per sampled batch.",
    )
    samples: int = Field(
        3,
        ge=0,
        le=16,
        description="Sample generations kept with each evaluation: the first N prompts of the set, with "
        "their reference and the response sampled under the first seed (the same prompts for every model and step; "
        "0: none).",
    )

    @field_validator("seeds", "selection_seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds


class CheckpointSpec(_Section):
    every_steps: int = Field(
        100,
        ge=0,
        le=MAX_STEPS,
        description="Save every N steps (0: only the final model). A checkpoint can be chosen as best only "
        "if the selection set is scored at its step (eval.every_steps).",
    )
    keep: int = Field(2, ge=1, le=MAX_COUNT, description="How many recent checkpoints to keep (the best is also kept).")


class DeepSpeedSpec(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage; 0 is fastest on a single process.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 where the hardware supports it, else fp32. fp16 needs a GPU."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state on the CPU (ZeRO 1-3).")
    shard_teacher: bool = Field(
        False,
        description="Split the frozen teacher's weights over the job's processes (ZeRO-3 inference), for a "
        "teacher bigger than one device: each holds 1/resources.devices of them and gathers each layer's weights as "
        "it runs it. Needs resources.devices 2 or more; the student's zero_stage is independent.",
    )


class ResourcesSpec(_Section):
    devices: int = Field(
        1, ge=1, le=MAX_COUNT, description="Data-parallel processes: one per GPU, or CPU processes without GPUs."
    )
    accelerator: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: GPUs when present, else CPU.")
    compile_decoding: bool = Field(
        False,
        description="Decode MiniLLM's rollouts with the per-token step compiled (torch.compile over a static KV "
        "cache; CUDA graphs on a GPU), where no model's forward is collective (ZeRO-3 without a gathered student, a "
        "sharded teacher). The first phase compiles (a minute or more); on CPUs it is slower (docs/performance.md).",
    )
    max_run_minutes: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Stop the job, failed (TimeLimit), once an attempt has run this long. Empty: the operator's "
        "cap (DISTILL_MAX_RUN_MINUTES), which a job may only lower.",
    )


class TrackingSpec(_Section):
    trackers: list[Literal["mlflow", "tensorboard", "wandb"]] = Field(
        [],
        max_length=3,
        description="Where the job's parameters, metrics, evaluations and best checkpoint are recorded besides the "
        "service: mlflow (the server at MLFLOW_TRACKING_URI), tensorboard (event files in the job's folder) and "
        "wandb (Weights & Biases, as the worker's WANDB_* variables say). Empty: the operator's DISTILL_TRACKERS.",
    )
    experiment: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The MLflow experiment or W&B project of the job's run. Empty: the job's name.",
    )


class JobSpec(_Section):
    name: str = Field("distill-job", min_length=1, max_length=200, description="A label for people.")
    method: Method = Field(
        "minillm", description="minillm, gkd (generalised on-policy KD), kd (word-level), seqkd or sft."
    )
    teacher: Reference = Field("builtin:smollm2-135m-instruct", description="Local directory, hub id, or builtin:NAME.")
    student: StudentSpec = Field(..., description="The model that is trained.")
    data: DataSpec = Field(
        DataSpec(), description="Training, selection and test data, the pretraining corpus, prompt format, lengths."
    )
    training: TrainingSpec = Field(
        TrainingSpec(), description="Steps, batch, optimizer and schedule of the main method."
    )
    recovery: RecoverySpec | None = Field(None, description="Optional SFT/KD stage before the main method.")
    minillm: MiniLLMSpec = Field(
        MiniLLMSpec(), description="MiniLLM parameters, its LM term included (used when method is minillm)."
    )
    gkd: GKDSpec = Field(GKDSpec(), description="GKD parameters (used when method is gkd).")
    kd: KDSpec = Field(KDSpec(), description="Word-level KD parameters (method kd, and a kd recovery stage).")
    eval: EvalSpec = Field(
        EvalSpec(), description="When and how to evaluate: the selection and test sets' sizes and seeds."
    )
    checkpoints: CheckpointSpec = Field(CheckpointSpec(), description="When to save and how many to keep.")
    deepspeed: DeepSpeedSpec = Field(DeepSpeedSpec(), description="ZeRO stage, precision, offload.")
    resources: ResourcesSpec = Field(ResourcesSpec(), description="How many devices, and which kind.")
    tracking: TrackingSpec = Field(TrackingSpec(), description="Experiment trackers: MLflow, TensorBoard.")

    @model_validator(mode="before")
    @classmethod
    def _method_learning_rate(cls, data: object) -> object:
        """A spec without training.learning_rate gets its method's (`DEFAULT_LEARNING_RATES`), written into it."""
        if not isinstance(data, dict) or data.get("method", "minillm") not in DEFAULT_LEARNING_RATES:
            return data  # not a spec, or a method its own field refuses
        rate = DEFAULT_LEARNING_RATES[data.get("method", "minillm")]
        training = data.get("training")
        if training is None or (isinstance(training, dict) and training.get("learning_rate") is None):
            return {**data, "training": {**(training or {}), "learning_rate": rate}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
        if self.deepspeed.shard_teacher and self.resources.devices == 1:
            raise ValueError(
                "deepspeed.shard_teacher needs resources.devices 2 or more: one process holds the whole teacher"
            )
        if self.data.pretrain:  # never silently unused
            if self.method != "minillm":
                raise ValueError("data.pretrain is used only by method minillm (its LM term)")
            if self.minillm.lm_data != "pretrain" or self.minillm.lm_coef == 0:
                raise ValueError("data.pretrain is unused with minillm.lm_data train_responses or minillm.lm_coef 0")
        return self

    @property
    def updates_per_phase(self) -> int:
        """MiniLLM optimizer steps taken on one phase's rollouts before the next phase samples anew."""
        minibatch = self.resources.devices * self.training.batch_size * self.training.gradient_accumulation
        return self.minillm.rollouts_per_phase // minibatch * self.minillm.ppo_epochs

    @property
    def total_steps(self) -> int:
        return self.training.steps + (self.recovery.steps if self.recovery else 0)

    def fingerprint(self) -> str:
        """Stable hash of everything that shapes the result; a resumed run must have the same one.
        How many sample answers an evaluation keeps, how long a job may run and where it is tracked do
        not shape it, nor do GKD's parameters in a job of another method (and runs from before
        `eval.samples`, `resources.max_run_minutes`, `tracking` and `gkd` keep their hash)."""
        exclude = {"eval": {"samples"}, "resources": {"max_run_minutes"}, "tracking": True}
        if self.method != "gkd":
            exclude["gkd"] = True
        shaping = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


class SpecError(ValueError):
    """A spec that cannot be read; the message names the field."""


def format_validation_error(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())


def parse_spec(data: dict) -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a spec from a YAML or JSON file (JSON is YAML)."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML/JSON: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec is a mapping of fields, got {type(data).__name__}")
    return parse_spec(data)
