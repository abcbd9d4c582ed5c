"""Instruction data: reading records, formatting prompts, tokenizing, and a resumable sample order.

Three record layouts are read: Dolly's (`instruction`, `input`, `output`), `prompt`/`response` (the
prompt is the user's message), and chat `messages` ([{role, content}], the last assistant turn the
response, the turns before it the prompt). A record's response may be missing where the job does not
need gold text, e.g. the builtin demo set, whose references the teacher writes on first use.

Records come from JSONL files, from Hugging Face dataset files (parquet, arrow, a `save_to_disk`
folder; read with pyarrow, a row at a time), or from the hub (`hf:NAME[:split]`, streamed, where a hub
is reachable). `data.columns` names the columns that hold a layout's fields.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .spec import DataSpec

if TYPE_CHECKING:  # the API reads and checks records through this module, and never loads torch
    from transformers import PreTrainedTokenizerBase

BUILTIN_DIR = Path(__file__).with_name("builtin_data")
BUILTIN_SETS = {
    "builtin:demo": BUILTIN_DIR / "demo_train.jsonl",
    "builtin:demo-selection": BUILTIN_DIR / "demo_selection.jsonl",
    "builtin:demo-eval": BUILTIN_DIR / "demo_eval.jsonl",
}
# The held-out sets of builtin:demo (disjoint prompts); other training sets hold out their tail.
DEMO_HELD_OUT = {"selection": "builtin:demo-selection", "eval": "builtin:demo-eval"}

# The MiniLLM paper's prompt template (LMOps tools/process_data_dolly.py), trailing newline included.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


class DataError(ValueError):
    """Data that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    response: str | None
    # A conversation's turns before the user's last message: (role, content), a system prompt first.
    turns: tuple[tuple[str, str], ...] = ()

    @property
    def message(self) -> str:
        """What the user asks, without a template: the chat format's user message, and what sample generations show."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


@dataclass(frozen=True)
class Example:
    """A tokenized record. `response_ids` ends with EOS unless the response was cut to the limit."""

    record: Record
    prompt_ids: list[int]
    response_ids: list[int]


# Files of Hugging Face datasets, read as tables; a folder of them is what `Dataset.save_to_disk` writes.
TABLE_SUFFIXES = (".parquet", ".arrow")
HUB = "hf:"  # hf:NAME[:split], a dataset on the Hugging Face hub


def resolve_source(source: str) -> Path:
    """The file (or dataset folder) a data reference names on this machine."""
    if source in BUILTIN_SETS:
        return BUILTIN_SETS[source]
    if source.startswith("builtin:"):
        raise DataError(f"unknown builtin dataset {source!r}; builtins are: {', '.join(BUILTIN_SETS)}")
    path = Path(source).expanduser()
    if path.is_dir() and _table_files(path, source):
        return path
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    return path


def check_source(source: str, columns: dict[str, str] | None = None) -> None:
    """Raise DataError if the records of `source` cannot be read: no such file, or a first record
    (under `columns`) that is not one, or a hub that is not reachable for hf:NAME."""
    if source.startswith(HUB):
        from .references import hub_reachable

        if not hub_reachable():
            raise DataError(
                f"{source}: the Hugging Face hub is not reachable from this machine; save the dataset where it is "
                "(Dataset.save_to_disk, or to_parquet) and give that folder or file"
            )
        return
    next(iter_records(source, columns), None)


def _table_files(folder: Path, name: str) -> list[Path]:
    """The data files of a `save_to_disk` folder (its state.json lists them) or of any folder of them."""
    state = folder / "state.json"
    if state.is_file():
        try:
            return [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{name}: a state.json that is not a Hugging Face dataset's") from None
    if (folder / "dataset_dict.json").is_file():
        raise DataError(f"{name}: a DatasetDict folder; give the folder of one of its splits (such as {name}/train)")
    return sorted(p for p in folder.iterdir() if p.suffix in TABLE_SUFFIXES)


def held_out_source(train: str, given: str | None, role: str) -> str | None:
    """Where the held-out set `role` ("selection" or "eval", the test set) comes from: the spec's own
    source, builtin:demo's, or None: the tail of the training records."""
    return given or (DEMO_HELD_OUT[role] if train == "builtin:demo" else None)


def split_held_out(
    data: DataSpec, records: list[Record], counts: dict[str, int]
) -> tuple[list[Record], dict[str, list[Record]]]:
    """(training records, {"eval": test records, "selection": selection records}).

    Each held-out set is read from its source (`held_out_source`), or else taken from the tail of
    `records`, `counts[role]` of them: the records end [… training … | selection | test], so the test
    hold-out is the same records whether or not a selection set is given.
    """
    held_out = {}
    for role in ("eval", "selection"):
        source = held_out_source(data.train, getattr(data, role), role)
        if source:
            held_out[role] = read_records(source, data.columns)
            continue
        count = counts[role]
        if len(records) <= count:
            raise DataError(
                f"data.train has {len(records)} records: too few to hold out {count} for data.{role} "
                f"and train on the rest; give data.{role} or more records"
            )
        records, held_out[role] = records[:-count], records[-count:]
    return records, held_out


# The longest line (one record) a data file may have: reading a file, an upload's check included, then
# takes memory bounded by it, whatever the file's size.
MAX_LINE_BYTES = 16 * 1024 * 1024


def json_lines(path: Path, name: str) -> Iterator[tuple[object, str]]:
    """(object, "NAME:LINE") for each non-blank line of a JSONL file, one line in memory at a time; a
    line that is not JSON, not UTF-8 text or longer than MAX_LINE_BYTES, and a file that cannot be
    read, are reported."""
    try:
        with path.open("rb") as lines:
            number = 0
            while raw := lines.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{name}:{number}: a line longer than {MAX_LINE_BYTES} bytes")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{name}:{number}: not UTF-8 text") from None
                if line.strip():
                    yield parse_json_line(line, f"{name}:{number}"), f"{name}:{number}"
    except OSError as err:
        raise DataError(f"{name}: cannot be read: {err.strerror or err}") from None


def parse_json_line(line: str, where: str) -> object:
    """One JSON value; anything json.loads refuses, or cannot finish, is a DataError naming `where`."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON: {err.msg}") from None
    except RecursionError:  # json.loads recurses once per level: [[[[...]]]] 100,000 deep
        raise DataError(f"{where}: not valid JSON: nested too deeply") from None
    except ValueError as err:  # an integer of more than 4,300 digits
        raise DataError(f"{where}: not valid JSON: {err}") from None


def iter_records(source: str, columns: dict[str, str] | None = None) -> Iterator[Record]:
    """The records of `source`, one at a time; a bad one is reported with its line or row number.
    `columns`: the field of a record layout each of those columns holds, e.g. {"question": "prompt"}."""
    rows = _hub_rows(source) if source.startswith(HUB) else _rows(resolve_source(source), source)
    for obj, where in rows:
        if columns and isinstance(obj, dict):
            obj = {columns.get(name, name): value for name, value in obj.items()}
        yield _parse_record(obj, where)


def read_records(source: str, columns: dict[str, str] | None = None, limit: int | None = None) -> list[Record]:
    """The first `limit` records of `source` (all without it), at least one."""
    records = list(itertools.islice(iter_records(source, columns), limit))
    if not records:
        raise DataError(f"{source}: no records")
    return records


def count_table_rows(path: Path, name: str) -> int:
    """The rows of a Parquet or Arrow file, every batch decoded (one that does not is a DataError). Their
    layout is checked where a job reads them, with its data.columns."""
    return sum(1 for _ in _rows(path, name))


def _rows(path: Path, name: str) -> Iterator[tuple[object, str]]:
    """(row, where) of a JSONL file, or of a dataset's files (parquet or arrow), a batch in memory at a time."""
    if not (path.is_dir() or path.suffix in TABLE_SUFFIXES):
        yield from json_lines(path, name)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    for file in _table_files(path, name) if path.is_dir() else [path]:
        try:
            if file.suffix == ".parquet":
                batches = pq.ParquetFile(file).iter_batches(batch_size=256)
            else:  # save_to_disk writes Arrow's stream format; other tools its file format
                source = pa.memory_map(str(file))
                try:
                    batches = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    batches = pa.ipc.open_file(source)
                    batches = (batches.get_batch(i) for i in range(batches.num_record_batches))
            for batch in batches:
                for row in batch.to_pylist():
                    number += 1
                    yield row, f"{name}: row {number}"
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{name}: not a dataset file this service reads (parquet or arrow): {err}") from None


def _hub_rows(source: str) -> Iterator[tuple[object, str]]:
    """(row, where) of hf:NAME[:split] (default split: train), streamed: only what is read is downloaded."""
    name, _, split = source.removeprefix(HUB).partition(":")
    from datasets import load_dataset

    try:
        rows = load_dataset(name, split=split or "train", streaming=True)
    except Exception as err:  # the hub's and the library's many errors: not found, private, no such split
        raise DataError(f"{source}: {err}") from None
    for number, row in enumerate(rows, 1):
        yield row, f"{source}: row {number}"


ROLES = ("system", "user", "assistant")


def _parse_messages(messages: object, where: str) -> Record:
    """A chat record: [{role, content}, ...], a system prompt first if any; the last assistant turn is
    the response (none if the conversation ends with the user's message)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    turns = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be {{role: system|user|assistant, content: text}}")
        turns.append((m["role"], m["content"]))
    response = turns.pop()[1] if turns[-1][0] == "assistant" else None
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise DataError(f"{where}: `messages` must end with a user's message, or a user's and the assistant's answer")
    return Record(turns[-1][1], "", response or None, tuple(turns[:-1]))


def _parse_record(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record is a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _parse_messages(obj["messages"], where)
    if "instruction" in obj:
        fields = ("instruction", "input", "output")
    elif "prompt" in obj:
        fields = ("prompt", None, "response")
    else:
        raise DataError(
            f"{where}: a record needs `instruction` (Dolly layout), `prompt` (prompt/response layout) or `messages` "
            "(chat layout); data.columns maps other column names to these"
        )
    values = []
    for name in fields:
        value = obj.get(name, "") if name else ""
        if name and value is not None and not isinstance(value, str):
            raise DataError(f"{where}: `{name}` must be a string, got {type(value).__name__}")
        values.append(value)
    instruction, context, response = values
    if not instruction.strip():
        raise DataError(f"{where}: `{fields[0]}` is empty")
    return Record(instruction, context or "", response if response else None)


def format_prompt(record: Record, prompt_format: str, tokenizer: PreTrainedTokenizerBase) -> str:
    if prompt_format == "alpaca":
        # A conversation's earlier turns are the template's input, as a transcript.
        context = record.input or "\n".join(f"{role.capitalize()}: {content}" for role, content in record.turns)
        if context:
            return (
                f"{ALPACA_PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{record.instruction}\n\n"
                f"### Input:\n{context}\n\n### Response:\n"
            )
        return f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{record.instruction}\n\n### Response:\n"
    if not tokenizer.chat_template:
        raise DataError("data.prompt_format: `chat` needs a tokenizer with a chat template; use `alpaca`")
    messages = [{"role": role, "content": content} for role, content in record.turns]
    return tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": record.message}], add_generation_prompt=True, tokenize=False
    )


def tokenize(
    records: list[Record], tokenizer: PreTrainedTokenizerBase, prompt_format: str, max_prompt: int, max_response: int
) -> tuple[list[Example], int]:
    """Tokenize records; those whose prompt exceeds `max_prompt` tokens are skipped (returned count).

    Prompt and response are encoded separately: both prompt formats end in a newline, so there is no
    token that straddles the boundary.
    """
    examples, skipped = [], 0
    for record in records:
        prompt_ids = tokenizer.encode(format_prompt(record, prompt_format, tokenizer), add_special_tokens=False)
        if len(prompt_ids) > max_prompt:
            skipped += 1
            continue
        response_ids = []
        if record.response is not None:
            response_ids = tokenizer.encode(record.response, add_special_tokens=False) + [tokenizer.eos_token_id]
        examples.append(Example(record, prompt_ids, response_ids[:max_response]))
    return examples, skipped
