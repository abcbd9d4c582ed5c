"""Pretraining text for MiniLLM's LM term (the paper's L_PT): read, tokenized, cut into chunks.

`data.pretrain` names the corpus:

- a JSONL file of {"text": ...} records (one document each), as uploads are stored;
- a plain text file (any other suffix): one document;
- `builtin:teacher-text`: free text the teacher samples once from a few generic openings (cached;
  `teacher_data.teacher_text`), for a job that has no corpus of its own: the project ships no
  third-party text.

As the reference code prepares OpenWebText (tools/process_data_pretrain.py), every document is
followed by EOS, the documents are concatenated and cut into chunks of minillm.lm_chunk_tokens
tokens (reference: 512), and the remainder shorter than a chunk is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .data import DataError, json_lines

if TYPE_CHECKING:  # the API checks uploads through this module, and never loads torch
    from transformers import PreTrainedTokenizerBase

TEACHER_TEXT = "builtin:teacher-text"


def check_corpus(source: str) -> None:
    """Raise DataError unless `source` is the builtin corpus or an existing file."""
    if source == TEACHER_TEXT:
        return
    if source.startswith("builtin:"):
        raise DataError(f"unknown builtin corpus {source!r}; the builtin corpus is {TEACHER_TEXT}")
    if not Path(source).expanduser().is_file():
        raise DataError(f"{source}: no such file")


def is_text_jsonl(path: Path) -> bool:
    """Whether a JSONL file holds {"text": ...} records (judged by its first record)."""
    try:
        obj, _ = next(json_lines(path, str(path)), (None, None))
    except DataError:
        return False  # read as records, whose reader reports the line
    return isinstance(obj, dict) and "text" in obj and not {"instruction", "prompt"} & obj.keys()


def iter_text_records(path: Path, name: str) -> Iterator[str]:
    """The documents of a JSONL file of {"text": ...} records, one at a time; a bad line is reported as NAME:LINE."""
    for obj, where in json_lines(path, name):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{where}: a pretraining record is {{"text": "..."}}')
        yield obj["text"]


def read_text_records(path: Path, name: str) -> list[str]:
    """The documents of a JSONL file of {"text": ...} records (at least one)."""
    texts = list(iter_text_records(path, name))
    if not texts:
        raise DataError(f"{name}: no records")
    return texts


def read_texts(source: str) -> list[str]:
    """The documents of a corpus file: {"text": ...} records if it is .jsonl/.json, else the whole file."""
    check_corpus(source)
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json"):
        return read_text_records(path, source)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{source}: no text")
    return [text]


def chunk(texts: list[str], tokenizer: PreTrainedTokenizerBase, chunk_tokens: int) -> list[list[int]]:
    """Documents, each followed by EOS, concatenated and cut into chunks of exactly `chunk_tokens`."""
    stream = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [stream[i : i + chunk_tokens] for i in range(0, len(stream) - chunk_tokens + 1, chunk_tokens)]
