"""The client of the distillation service: the Python API (`Client`) and the `distill` command line,
light enough for any CI runner (Python 3.9 to 3.13; httpx, pydantic, PyYAML, tenacity, typer, tqdm)."""

from .api import ApiError, ChecksumMismatch, Client, SpecFileError, load_spec_file
from .status import TERMINAL, JobStatus

__all__ = ["ApiError", "ChecksumMismatch", "Client", "JobStatus", "SpecFileError", "TERMINAL", "load_spec_file"]
