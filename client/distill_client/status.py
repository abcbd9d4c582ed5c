"""A job's statuses, defined once. The service stores and publishes them (the API's `JobStatus`
schema, with the terminal ones as `x-terminal`, which the web page reads); the engine reports the
outcomes and `running`; the client waits for a terminal one."""

from enum import Enum


class JobStatus(str, Enum):
    # str and format() give the value, as enum.StrEnum's do (Python 3.11+; this package runs on 3.9).
    __str__ = str.__str__
    __format__ = str.__format__

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"  # asked to stop; the worker stops it at the next step
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler) -> dict:
        schema = handler(core_schema)
        schema["x-terminal"] = [status.value for status in cls if status in TERMINAL]
        return schema


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
