import json
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from worker.engine.models import (
    ModelError,
    check_compatible,
    derive_student,
    hub_files,
    layer_indices,
    resolve_model,
)
from worker.engine.spec import InitFromTeacher


def test_layer_selection():
    assert layer_indices(30, 10, "even") == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert layer_indices(30, 3, "first") == [0, 1, 2]
    assert layer_indices(30, 3, "last") == [27, 28, 29]
    with pytest.raises(ModelError, match="exceeds"):
        layer_indices(4, 5, "even")


def test_derived_student_copies_the_chosen_layers(tmp_path):
    teacher_dir = resolve_model("builtin:tiny-teacher")
    out = derive_student(teacher_dir, InitFromTeacher(num_layers=2, strategy="even"), tmp_path / "s")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).state_dict()
    student = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert torch.equal(student["model.layers.1.mlp.up_proj.weight"], teacher["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    check_compatible(teacher_dir, out)


def test_derived_student_keeps_each_kept_layers_attention_kind(tmp_path):
    """A Qwen2 teacher whose layers alternate sliding-window and full attention: the student's config
    lists one kind per kept layer, each the kind that layer had in the teacher."""
    teacher_dir = resolve_model("builtin:tiny-teacher")
    kinds = ["full_attention", "sliding_attention"] * 3
    cfg = Qwen2Config(
        vocab_size=AutoConfig.from_pretrained(teacher_dir).vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=3,
        layer_types=kinds,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "qwen")
    out = derive_student(tmp_path / "qwen", InitFromTeacher(num_layers=3, strategy="last"), tmp_path / "s")
    student = AutoConfig.from_pretrained(out)
    assert student.num_hidden_layers == 3
    assert student.layer_types == kinds[3:]
    assert student.max_window_layers == 0  # layers 3, 4 and 5 are all at or above the teacher's 3
    AutoModelForCausalLM.from_pretrained(out)  # a consistent config loads


def test_unknown_references_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="unknown builtin"):
        resolve_model("builtin:gpt-5")
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelError, match="hub is not reachable"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.monotonic() - started < 5


def test_hub_id_fails_fast_when_offline_without_the_env_var(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ModelError, match="hub is not reachable"):
        resolve_model("someone/some-model")


def _other_vocab_model(path):
    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_end|>", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    cfg = LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_vocabulary_mismatch_is_refused(tmp_path):
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_compatible(resolve_model("builtin:tiny-teacher"), _other_vocab_model(tmp_path / "other"))


def test_config_vocab_smaller_than_tokenizer_is_refused(tmp_path):
    student = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-student"))
    student.save_pretrained(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["vocab_size"] = 1000
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = resolve_model("builtin:tiny-student") / name
        if src.exists():
            (tmp_path / "s" / name).write_bytes(src.read_bytes())
    with pytest.raises(ModelError, match="smaller than the tokenizer"):
        check_compatible(resolve_model("builtin:tiny-teacher"), tmp_path / "s")


def test_content_hash_follows_the_bytes_not_the_path(tmp_path):
    """Teacher outputs are cached under this hash: a model replaced in place must get a new one."""
    import shutil

    from worker.engine.models import content_hash

    model = tmp_path / "teacher"
    shutil.copytree(resolve_model("builtin:tiny-teacher"), model)
    first = content_hash(model)
    assert content_hash(model) == first  # stable (and served from the memo the second time)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert content_hash(copy) == first  # the same bytes elsewhere: the same model
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert content_hash(model) != first


def test_a_hub_model_downloads_only_what_loading_needs_within_the_budget():
    """Not the whole repository: configs, tokenizer and safetensors weights, and only while they fit the
    operator's budget (DISTILL_HUB_MAX_GB)."""
    listing = [
        ("config.json", 700),
        ("model-00001-of-00002.safetensors", 4_000_000_000),
        ("model-00002-of-00002.safetensors", 3_000_000_000),
        ("model.safetensors.index.json", 30_000),
        ("tokenizer.json", 7_000_000),
        ("tokenizer_config.json", 7_000),
        ("pytorch_model.bin", 7_000_000_000),
        ("onnx/model.onnx", 7_000_000_000),
        ("gguf/model-q4.gguf", 4_000_000_000),
        ("README.md", 5_000),
    ]
    files, size = hub_files(listing, budget=8_000_000_000)
    assert sorted(files) == sorted(
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    assert size == 7_007_037_700
    with pytest.raises(ModelError, match=r"take 7.0 GB, more than this service downloads \(5 GB"):
        hub_files(listing, budget=5_000_000_000)
    with pytest.raises(ModelError, match="no .safetensors weights"):
        hub_files([("config.json", 1), ("pytorch_model.bin", 10)], budget=10**12)
