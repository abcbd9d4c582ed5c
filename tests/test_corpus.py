"""The LM term's corpus: reading data.pretrain, cutting it into chunks, and the teacher's own text."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.engine.corpus import TEACHER_TEXT, check_corpus, chunk, is_text_jsonl, read_texts
from worker.engine.data import DataError
from worker.engine.models import load_tokenizer, resolve_model, smollm2_tokenizer_dir
from worker.engine.teacher_data import OPENINGS, teacher_text


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_tokenizer_dir())


def test_jsonl_records_and_plain_text(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "One doc."}) + "\n\n" + json.dumps({"text": "Two."}) + "\n")
    assert read_texts(str(tmp_path / "c.jsonl")) == ["One doc.", "Two."]
    (tmp_path / "c.txt").write_text("A whole file\nis one document.\n")
    assert read_texts(str(tmp_path / "c.txt")) == ["A whole file\nis one document.\n"]
    assert is_text_jsonl(tmp_path / "c.jsonl") and not is_text_jsonl(tmp_path / "c.txt")


@pytest.mark.parametrize(
    "line,message",
    [
        ("{oops", r"c\.jsonl:2: not valid JSON"),
        ('{"instruction": "x"}', r'c\.jsonl:2: a pretraining record is \{"text"'),
        ('{"text": 5}', r"c\.jsonl:2: a pretraining record"),
    ],
)
def test_bad_corpus_lines_are_named(tmp_path, line, message):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_texts(str(tmp_path / "c.jsonl"))


def test_sources_that_cannot_be_used():
    check_corpus(TEACHER_TEXT)
    with pytest.raises(DataError, match="no such file"):
        check_corpus("/nonexistent.txt")
    with pytest.raises(DataError, match="unknown builtin corpus"):
        check_corpus("builtin:demo")


def test_documents_end_with_eos_and_are_cut_into_equal_chunks(tokenizer):
    texts = ["alpha beta gamma delta", "epsilon zeta eta theta iota kappa"]
    stream = [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]]
    chunks = chunk(texts, tokenizer, 4)
    assert all(len(c) == 4 for c in chunks) and len(chunks) == len(stream) // 4
    assert sum(chunks, []) == stream[: len(chunks) * 4]  # in order, across documents; the short tail is dropped
    assert tokenizer.eos_token_id in sum(chunks, [])
    assert chunk(texts, tokenizer, len(stream) + 1) == []


class Refuses(torch.nn.Module):
    def forward(self, **_):
        raise AssertionError("the teacher ran again: not cached")


def test_teacher_text_starts_from_generic_openings_and_is_cached(tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-teacher")).eval()
    args = dict(documents=5, max_new_tokens=8, vocab_size=len(tokenizer), device=torch.device("cpu"), seed=3)
    texts = teacher_text(teacher, "builtin:tiny-teacher", tokenizer, **args)
    assert len(texts) == 5 and all(t.startswith(opening) for t, opening in zip(texts, OPENINGS))
    assert all(len(tokenizer.encode(t, add_special_tokens=False)) > 1 for t in texts)
    assert teacher_text(Refuses(), "builtin:tiny-teacher", tokenizer, **args) == texts
