import json

import pytest

from worker.engine.data import DataError, Record, format_prompt, read_records, split_held_out, tokenize
from worker.engine.models import load_tokenizer, smollm2_tokenizer_dir
from worker.engine.spec import DataSpec
from worker.engine.stages.base import sample_order


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_tokenizer_dir())


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_reads_both_layouts(tmp_path):
    dolly = {"instruction": "Summarize.", "input": "A long note.", "output": "A note.", "category": "summarization"}
    path = write(tmp_path / "dolly.jsonl", [json.dumps(dolly)])
    assert read_records(path) == [Record("Summarize.", "A long note.", "A note.")]
    path = write(tmp_path / "pr.jsonl", [json.dumps({"prompt": "Say hi", "response": "Hi!"})])
    assert read_records(path) == [Record("Say hi", "", "Hi!")]


def test_the_tests_own_dataset_has_gold_responses(dataset):
    records = read_records(str(dataset / "train.jsonl"))
    assert len(records) == 64 and all(r.response for r in records)
    assert any(r.input for r in records)  # both prompt templates (with and without input) are exercised


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r":3: not valid JSON"),
        ('{"text": "x"}', r":3: a record needs `instruction`"),
        ('{"instruction": 5}', r":3: `instruction` must be a string"),
        ('{"instruction": "  "}', r":3: `instruction` is empty"),
        ("[1, 2]", r":3: a record is a JSON object"),
    ],
)
def test_bad_line_is_reported_with_its_number(tmp_path, line, message):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    path = write(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_a_file_that_is_not_utf8_text_is_reported_with_the_line(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n\xff\xfe\x00 binary\n')
    with pytest.raises(DataError, match=r"binary.jsonl:2: not UTF-8 text"):
        read_records(str(path))


def test_a_line_past_the_longest_allowed_is_reported_before_it_is_read_whole(tmp_path, monkeypatch):
    """Reading a file takes memory bounded by its longest allowed line, whatever the file holds."""
    import worker.engine.data as data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 100)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "x" * 200}))
    with pytest.raises(DataError, match=r"long.jsonl:2: a line longer than 100 bytes"):
        read_records(str(path))


def test_missing_file_and_unknown_builtin():
    with pytest.raises(DataError, match="no such file"):
        read_records("/nonexistent.jsonl")
    with pytest.raises(DataError, match="unknown builtin dataset"):
        read_records("builtin:nope")


def test_builtin_demo_sets_have_prompts_only_and_are_disjoint():
    train, selection, test = (read_records(f"builtin:{name}") for name in ("demo", "demo-selection", "demo-eval"))
    assert (len(train), len(selection), len(test)) == (288, 32, 64)
    assert all(r.response is None for r in train + selection + test)
    prompts = [{(r.instruction, r.input) for r in records} for records in (train, selection, test)]
    assert sum(map(len, prompts)) == len(set().union(*prompts))


def _records(n: int) -> list[Record]:
    return [Record(f"instruction {i}", "", f"answer {i}") for i in range(n)]


def test_held_out_sets_come_from_the_tail_of_the_training_records():
    data = DataSpec(train="mine.jsonl")
    train, held_out = split_held_out(data, _records(20), {"eval": 4, "selection": 3})
    assert train == _records(13)
    assert held_out["selection"] == _records(16)[13:] and held_out["eval"] == _records(20)[16:]


def test_a_given_selection_set_leaves_the_test_hold_out_unchanged(tmp_path):
    path = write(tmp_path / "selection.jsonl", [json.dumps({"prompt": "p", "response": "r"})])
    data = DataSpec(train="mine.jsonl", selection=path)
    train, held_out = split_held_out(data, _records(20), {"eval": 4, "selection": 3})
    assert held_out["selection"] == [Record("p", "", "r")]
    assert train == _records(16) and held_out["eval"] == _records(20)[16:]


def test_builtin_demo_holds_out_nothing_from_training():
    train, held_out = split_held_out(DataSpec(), _records(20), {"eval": 4, "selection": 3})
    assert train == _records(20)
    assert held_out["selection"] == read_records("builtin:demo-selection")
    assert held_out["eval"] == read_records("builtin:demo-eval")


def test_too_few_records_to_hold_out_name_the_field():
    with pytest.raises(DataError, match=r"too few to hold out 3 for data\.selection"):
        split_held_out(DataSpec(train="mine.jsonl"), _records(5), {"eval": 2, "selection": 3})


def test_alpaca_template_is_the_papers():
    prompt = format_prompt(Record("Add 2 and 2.", "", None), "alpaca", None)
    assert prompt.endswith("### Instruction:\nAdd 2 and 2.\n\n### Response:\n")
    with_input = format_prompt(Record("Summarise.", "Some text.", None), "alpaca", None)
    assert "paired with an input" in with_input and "### Input:\nSome text.\n\n### Response:\n" in with_input


def test_chat_template_and_tokenization(tokenizer):
    records = [Record("What is 2+2?", "", "4"), Record("x " * 400, "", "y")]
    examples, skipped = tokenize(records, tokenizer, "chat", max_prompt=64, max_response=8)
    assert skipped == 1 and len(examples) == 1
    ex = examples[0]
    assert tokenizer.decode(ex.prompt_ids).endswith("<|im_start|>assistant\n")
    assert ex.response_ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ex.response_ids[:-1]) == "4"
    long, _ = tokenize([Record("q", "", "word " * 50)], tokenizer, "chat", 64, 8)
    assert len(long[0].response_ids) == 8 and long[0].response_ids[-1] != tokenizer.eos_token_id


def test_sample_order_is_resumable_and_covers_each_pass():
    whole = sample_order(10, seed=3, start=0, count=25)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert whole[10:20] != whole[:10]
    assert sample_order(10, seed=3, start=7, count=9) == whole[7:16]
    assert sample_order(10, seed=4, start=0, count=10) != whole[:10]


CHAT = {
    "messages": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
}


def test_a_chat_record_is_its_last_answer_and_the_turns_before_it_rendered_by_the_chat_template(tmp_path, tokenizer):
    path = write(tmp_path / "chat.jsonl", [json.dumps(CHAT), json.dumps({"messages": CHAT["messages"][:2]})])
    conversation, question = read_records(path)
    assert conversation == Record(
        "And of Italy?",
        "",
        "Rome.",
        (("system", "Answer in one word."), ("user", "Capital of France?"), ("assistant", "Paris.")),
    )
    assert question == Record("Capital of France?", "", None, (("system", "Answer in one word."),))  # a prompt only
    expected = tokenizer.apply_chat_template(CHAT["messages"][:-1], add_generation_prompt=True, tokenize=False)
    assert format_prompt(conversation, "chat", tokenizer) == expected
    alpaca = format_prompt(conversation, "alpaca", None)  # earlier turns: the template's input, as a transcript
    assert (
        "### Instruction:\nAnd of Italy?\n\n### Input:\nSystem: Answer in one word.\nUser: Capital of France?\n"
        in alpaca
    )


@pytest.mark.parametrize(
    "messages,message",
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": 5}], r"messages\[0\] must be"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\] must be"),
        ([{"role": "assistant", "content": "hi"}], "must end with a user's message"),
        ([{"role": "system", "content": "s"}], "must end with a user's message"),
    ],
)
def test_a_bad_chat_record_is_named_by_line(tmp_path, messages, message):
    path = write(tmp_path / "chat.jsonl", [json.dumps(CHAT), json.dumps({"messages": messages})])
    with pytest.raises(DataError, match=rf"chat.jsonl:2: .*{message}"):
        read_records(path)


def test_hugging_face_dataset_files_parquet_arrow_and_save_to_disk_folders_are_read_with_column_names(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"question": [f"Question {i}?" for i in range(5)], "answer": [f"Answer {i}." for i in range(5)]}
    data = Dataset.from_dict(rows)
    data.to_parquet(str(tmp_path / "qa.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    columns = {"question": "prompt", "answer": "response"}
    expected = [Record(f"Question {i}?", "", f"Answer {i}.") for i in range(5)]
    for source in (tmp_path / "qa.parquet", tmp_path / "saved", arrow):
        assert read_records(str(source), columns) == expected, source
    assert read_records(str(tmp_path / "qa.parquet"), columns, limit=2) == expected[:2]
    with pytest.raises(DataError, match=r"qa.parquet: row 1: a record needs `instruction`.*data.columns"):
        read_records(str(tmp_path / "qa.parquet"))  # without the columns' names

    chats = Dataset.from_dict({"conversations": [CHAT["messages"]]})
    chats.to_parquet(str(tmp_path / "chat.parquet"))
    assert read_records(str(tmp_path / "chat.parquet"), {"conversations": "messages"})[0].response == "Rome."

    DatasetDict({"train": data}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"a DatasetDict folder; give the folder of one of its splits"):
        read_records(str(tmp_path / "splits"))
    assert read_records(str(tmp_path / "splits" / "train"), columns) == expected
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: not a dataset file this service reads"):
        read_records(str(tmp_path / "broken.parquet"))


def test_a_hub_dataset_is_refused_where_no_hub_is_reachable(monkeypatch):
    from worker.engine.data import check_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:databricks/dolly: the Hugging Face hub is not reachable"):
        check_source("hf:databricks/dolly")
