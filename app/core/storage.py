"""Optional S3-compatible storage of checkpoints (boto3; credentials from the usual AWS variables).

Checkpoints are always written to local disk first (the engine resumes from there). With
`DISTILL_S3_BUCKET` set, the worker also copies each checkpoint's files and archive to the bucket,
and the API answers downloads with a redirect to a presigned URL, so the bytes never pass through
the API server and S3 serves the Range requests.
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

    def _key(self, url: str, name: str) -> str:
        return url.removeprefix(f"s3://{self.bucket}/") + name

    def upload(self, url: str, name: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(url, name))

    def delete(self, url: str, names: list[str]) -> None:
        keys = [{"Key": self._key(url, n)} for n in names]
        if keys:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    def download_url(self, url: str, name: str, filename: str, expires: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(url, name),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"'},  # fmt: skip
            ExpiresIn=expires,
        )


@lru_cache
def s3_store() -> S3Store | None:
    settings = get_settings()
    return S3Store(settings) if settings.s3_bucket else None
