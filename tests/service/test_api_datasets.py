"""Dataset uploads: checked, stored once, limited per user, used by a spec."""

import hashlib
import json

import pytest
from api_helpers import (
    DATASETS,
    dataset_files,
    dataset_lines,
    detail_for,
    locs,
    submit,
)
from helpers import make_user, tiny_spec

pytestmark = pytest.mark.usefixtures("served_test_queues")


# -- 8. datasets --------------------------------------------------------------------------------


def test_upload_a_dataset_and_use_it(client, auth, dataset):
    body = dataset_lines(dataset, 6)
    response = client.post(
        DATASETS, params={"name": "x.jsonl"}, content=body, headers={**auth, "Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 201, response.text
    uploaded = response.json()
    assert uploaded["id"].startswith("ds-") and uploaded["name"] == "x.jsonl"
    assert uploaded["num_records"] == 6
    assert uploaded["size_bytes"] == len(body)
    assert uploaded["sha256"] == hashlib.sha256(body).hexdigest()
    assert f"{uploaded['id']}.jsonl" in dataset_files()
    assert not [f for f in dataset_files() if ".partial" in f]

    listed = client.get(DATASETS, headers=auth).json()
    assert [d["id"] for d in listed] == [uploaded["id"]]
    assert listed[0] == uploaded

    ref = f"dataset:{uploaded['id']}"
    job = submit(client, auth, tiny_spec(dataset, data={"train": ref, "eval": ref}))
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["data"]["train"] == ref


def test_upload_accepts_the_prompt_response_layout_and_blank_lines(client, auth):
    body = b'{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n'
    response = client.post(DATASETS, params={"name": "pr.jsonl"}, content=body, headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["num_records"] == 2


def test_upload_a_pretraining_corpus_and_use_it(client, auth, dataset):
    body = b'{"text": "Some free text."}\n{"text": "More of it."}\n'
    response = client.post(DATASETS, params={"name": "corpus.jsonl"}, content=body, headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["num_records"] == 2
    ref = f"dataset:{response.json()['id']}"
    job = submit(client, auth, tiny_spec(dataset, data={"pretrain": ref}))
    assert job.status_code == 201, job.text
    assert job.json()["spec"]["data"]["pretrain"] == ref
    missing = submit(client, auth, tiny_spec(dataset, data={"pretrain": "dataset:ds-nope"}))
    assert detail_for(missing, ["body", "data", "pretrain"])["msg"] == "dataset:ds-nope: no such uploaded dataset"


BAD_UPLOADS = {
    "line 3 not json": (b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{oops\n', ":3:"),
    "line 2 not a record": (b'{"instruction": "a", "output": "b"}\n[1, 2]\n', ":2:"),
    "line 1 no instruction": (b'{"foo": "bar"}\n', ":1:"),
    "empty": (b"", "no records"),
    "not utf-8": (b'{"instruction": "\xff\xfe"}\n', ":1: not UTF-8 text"),
    "corpus line 2 not text": (b'{"text": "a"}\n{"text": 5}\n', ":2:"),
    "line 2 nested 100,000 deep": (
        b'{"instruction": "a", "output": "b"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        ":2: not valid JSON: nested too deeply",
    ),
    "line 1 a 5,000-digit integer": (b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}\n", ":1: not valid JSON"),
    "first line nested deep": (b"[" * 100_000 + b"]" * 100_000 + b"\n", ":1: not valid JSON: nested too deeply"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_422_and_store_nothing(client, auth, case):
    body, words = BAD_UPLOADS[case]
    files_before = dataset_files()
    response = client.post(DATASETS, params={"name": "bad.jsonl"}, content=body, headers=auth)
    assert response.status_code == 422, response.text
    message = response.json()["detail"][0]["msg"]
    assert words in message, message
    if words.startswith(":"):
        assert message.startswith(f"bad.jsonl{words}"), message  # named by upload name, not the server's path
    assert "/" not in message.split(":")[0]
    assert client.get(DATASETS, headers=auth).json() == []
    assert dataset_files() == files_before


def test_upload_needs_a_name(client, auth, dataset):
    response = client.post(DATASETS, content=dataset_lines(dataset, 2), headers=auth)
    assert response.status_code == 422
    assert ["query", "name"] in locs(response)
    assert client.get(DATASETS, headers=auth).json() == []


def test_oversize_upload_is_413(client, auth, dataset):
    from app.core.config import get_settings

    settings = get_settings()
    limit = settings.max_upload_bytes
    files_before = dataset_files()
    settings.max_upload_bytes = 100
    try:
        response = client.post(DATASETS, params={"name": "big.jsonl"}, content=dataset_lines(dataset, 5), headers=auth)
        assert response.status_code == 413, response.text
        small = b'{"prompt": "a", "response": "b"}\n'
        assert client.post(DATASETS, params={"name": "ok.jsonl"}, content=small, headers=auth).status_code == 201
    finally:
        settings.max_upload_bytes = limit
    assert [d["name"] for d in client.get(DATASETS, headers=auth).json()] == ["ok.jsonl"]
    assert [f for f in dataset_files() if f not in files_before and not f.endswith(".jsonl")] == []
    assert len([f for f in dataset_files() if f not in files_before]) == 1


def test_datasets_list_newest_first(client, auth):
    ids = []
    for i in range(3):
        body = json.dumps({"prompt": f"p{i}", "response": "r"}).encode() + b"\n"
        ids.append(client.post(DATASETS, params={"name": f"d{i}.jsonl"}, content=body, headers=auth).json()["id"])
    assert [d["id"] for d in client.get(DATASETS, headers=auth).json()] == ids[::-1]


LINE = b'{"prompt": "a", "response": "b"}\n'


def test_parallel_uploads_cannot_pass_the_quota_together(client, auth, monkeypatch):
    """The quota is read before the body arrives and checked again, under the user's row lock, when
    the upload is stored: 30 uploads sent at once, each within what was left when it began, keep
    exactly as many as fit."""
    from concurrent.futures import ThreadPoolExecutor

    from app.core.config import get_settings

    body = LINE * 10
    monkeypatch.setattr(get_settings(), "max_dataset_bytes_per_user", 5 * len(body))
    monkeypatch.setattr(get_settings(), "max_uploads_per_user", 30)
    with ThreadPoolExecutor(30) as pool:
        answers = list(
            pool.map(
                lambda i: client.post(DATASETS, params={"name": f"part-{i}.jsonl"}, content=body, headers=auth),
                range(30),
            )
        )
    assert sorted({a.status_code for a in answers}) == [201, 429], [a.text for a in answers]
    assert sum(a.status_code == 201 for a in answers) == 5
    assert all("are left" in a.json()["message"] for a in answers if a.status_code == 429)
    assert sum(d["size_bytes"] for d in client.get(DATASETS, headers=auth).json()) == 5 * len(body)


def test_a_stalled_upload_holds_no_database_connection_and_is_dropped(server, monkeypatch):
    """Clients that open an upload and stop sending: each holds neither a database connection nor a
    thread meanwhile (another user's requests and /healthz answer at once), and is answered 408 once it
    has sent nothing for upload_idle_seconds; nothing of it stays. One more than the user's concurrent
    uploads is a 429."""
    import socket
    import time

    import httpx

    from app.core.config import get_settings

    monkeypatch.setattr(get_settings(), "upload_idle_seconds", 3.0)
    monkeypatch.setattr(get_settings(), "max_uploads_per_user", 20)  # more than the pool's 15 connections
    staller, other = make_user(), make_user()
    host, port = server.removeprefix("http://").split(":")
    files_before = dataset_files()
    stalled = []
    for i in range(21):
        s = socket.create_connection((host, int(port)))
        s.sendall(
            f"POST {DATASETS}?name=s{i}.jsonl HTTP/1.1\r\nHost: x\r\nAuthorization: {staller['Authorization']}\r\n"
            f"Content-Type: application/x-ndjson\r\nContent-Length: 100000\r\n\r\n".encode()
            + LINE
        )
        stalled.append(s)
        time.sleep(0.05)  # in order: the last one is the one past the cap
    started = time.monotonic()
    assert httpx.get(f"{server}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{server}/api/v1/jobs", headers=other, timeout=5).status_code == 200
    assert time.monotonic() - started < 2
    answers = []
    for s in stalled:
        s.settimeout(10)
        answers.append(s.recv(4096).split(b"\r\n", 1)[0])
        s.close()
    assert answers == [b"HTTP/1.1 408 Request Timeout"] * 20 + [b"HTTP/1.1 429 Too Many Requests"], answers
    assert dataset_files() == files_before


def test_upload_a_chat_dataset_and_use_it(client, auth, dataset):
    turn = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    body = (json.dumps(turn) + "\n").encode() * 3
    response = client.post(DATASETS, params={"name": "chat.jsonl"}, content=body, headers=auth)
    assert response.status_code == 201, response.text
    assert response.json()["num_records"] == 3
    job = submit(client, auth, tiny_spec(dataset, data={"train": f"dataset:{response.json()['id']}"}))
    assert job.status_code == 201, job.text

    bad = json.dumps({"messages": [{"role": "assistant", "content": "Hello."}]}).encode()
    refused = client.post(DATASETS, params={"name": "bad.jsonl"}, content=body + bad, headers=auth)
    assert refused.status_code == 422 and "bad.jsonl:4: `messages` must end with a user's message" in refused.text


def test_upload_parquet_and_arrow_files_written_by_datasets_and_use_them(client, auth, dataset, tmp_path):
    """Hugging Face datasets' own files, uploaded as they are: stored under their suffix, counted row by
    row, and a job reads them with its column mapping; a file that is not one is refused, naming it."""
    from datasets import Dataset

    rows = {"question": ["What is 2+2?", "Name a colour.", "Say hi."], "answer": ["4", "Blue.", "Hi."]}
    Dataset.from_dict(rows).to_parquet(str(tmp_path / "qa.parquet"))
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))  # a folder: its Arrow file is uploaded
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    arrow.rename(tmp_path / "qa.arrow")
    for name in ("qa.parquet", "qa.arrow"):
        body = (tmp_path / name).read_bytes()
        response = client.post(DATASETS, params={"name": name}, content=body, headers=auth)
        assert response.status_code == 201, response.text
        uploaded = response.json()
        assert uploaded["num_records"] == 3 and uploaded["sha256"] == hashlib.sha256(body).hexdigest()
        assert f"{uploaded['id']}{name[2:]}" in dataset_files()
        columns = {"question": "instruction", "answer": "output"}
        ref = f"dataset:{uploaded['id']}"
        job = submit(client, auth, tiny_spec(dataset, data={"train": ref, "columns": columns}))
        assert job.status_code == 201, job.text
        unmapped = submit(client, auth, tiny_spec(dataset, data={"train": ref}))
        message = unmapped.json()["message"]
        assert unmapped.status_code == 422 and message.startswith(f"data.train: {ref}: row 1: a record needs"), message
        assert "/datasets/" not in message  # the server's path is not shown

    files_before = dataset_files()
    refused = client.post(DATASETS, params={"name": "broken.parquet"}, content=b"PAR1 not really", headers=auth)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["msg"].startswith("broken.parquet: not a dataset file"), refused.text
    assert dataset_files() == files_before
