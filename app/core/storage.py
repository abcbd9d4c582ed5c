"""Optional S3-compatible storage of checkpoints (boto3; credentials from the usual AWS variables).

Checkpoints are always written to local disk first (the engine resumes from there). With
`DISTILL_S3_BUCKET` set, the worker also copies each checkpoint's files and archive, and the state to
resume from it, to the bucket; the API answers downloads with a redirect to a presigned URL, so the
bytes never pass through the API server and S3 serves the Range requests; and a job taken up again on
another machine starts from the bucket's copies (`worker/job_state.py`). Uploaded datasets go to the
bucket too, for workers that do not share the API's artifacts folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import boto3

from .config import Settings, get_settings


class S3Store:
    def __init__(self, settings: Settings):
        self.bucket, self.prefix = settings.s3_bucket, settings.s3_prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)

    def job_url(self, job_id: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}/jobs/{job_id}/"

    def datasets_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/datasets/"

    def _key(self, url: str, name: str) -> str:
        return url.removeprefix(f"s3://{self.bucket}/") + name

    def upload(self, url: str, name: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(url, name))

    def upload_tree(self, url: str, name: str, directory: Path, last: str) -> None:
        """Every file under `directory` to `name` + its relative path; the file named `last` after all
        the others, so that a copy holding it is complete."""
        for path in sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: (p.name == last, p)):
            self.upload(url, name + path.relative_to(directory).as_posix(), path)

    def names(self, url: str, name: str) -> list[str]:
        """The names under `url` that start with `name`."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(url, name))
        return [o["Key"].removeprefix(self._key(url, "")) for page in pages for o in page.get("Contents", [])]

    def download(self, url: str, name: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(url, name), str(path))

    def delete(self, url: str, names: list[str]) -> None:
        keys = [{"Key": self._key(url, n)} for n in names]
        for start in range(0, len(keys), 1000):  # the most one request may name
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]})

    def download_url(self, url: str, name: str, filename: str, expires: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self._key(url, name),
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
            ExpiresIn=expires,
        )


@lru_cache
def s3_store() -> S3Store | None:
    settings = get_settings()
    return S3Store(settings) if settings.s3_bucket else None
