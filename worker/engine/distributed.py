"""DeepSpeed set-up: process group, precision, engine config.

One process needs no launcher: we set the rank and rendezvous variables ourselves, because without
them `deepspeed.init_distributed` falls into MPI discovery. Several processes come from the DeepSpeed
launcher or torchrun, which set the same variables. CPU uses gloo, GPUs NCCL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from .op_builds import prepare_op_builds
from .spec import JobSpec

# The longest one collective may take (DISTILL_COLLECTIVE_TIMEOUT_SECONDS): above the slowest step,
# evaluation or checkpoint save that ranks wait on each other through.
COLLECTIVE_TIMEOUT_SECONDS = 1800


class ResourceError(RuntimeError):
    """The job asks for hardware this machine does not have."""


def use_gpu(spec: JobSpec) -> bool:
    if spec.resources.accelerator == "gpu" and not torch.cuda.is_available():
        raise ResourceError("resources.accelerator: gpu was asked for, but no GPU is visible")
    return spec.resources.accelerator != "cpu" and torch.cuda.is_available()


@contextmanager
def _mlflow_hidden() -> Iterator[None]:
    """DeepSpeed's autotuner imports MLflow where it is installed (the trackers' client is): 1.5 s of
    every training process's start, for autotuning, which the engine never does. Hidden from that
    import only: where the job's MLflow tracker (trackers.py) imported it first, DeepSpeed gets it too,
    and `import mlflow` works as ever afterwards."""
    if "mlflow" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None  # an import of it raises ImportError, which DeepSpeed takes as "not installed"
    try:
        yield
    finally:
        del sys.modules["mlflow"]


def init_process_group(spec: JobSpec) -> torch.device:
    """Join (or, alone, create) the process group; returns this rank's device."""
    prepare_op_builds()
    gpu = use_gpu(spec)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        # Port 0: the rendezvous store binds whatever port the OS gives it. A port picked free first
        # and bound later can be taken meanwhile by another job starting on this machine (EADDRINUSE).
        os.environ.setdefault("MASTER_PORT", "0")
    with _mlflow_hidden():
        import deepspeed

    if not dist.is_initialized():
        if not gpu and os.environ["WORLD_SIZE"] == "1":
            # DeepSpeed JIT-compiles its shared-memory all-reduce for the CPU on every new cache
            # (25 s of a first run on 2 cores), but one process has no peers to share memory with.
            from deepspeed.accelerator import get_accelerator

            deepspeed.ops.__compatible_ops__[get_accelerator().create_op_builder("ShareMemCommBuilder").NAME] = False
        # An explicit limit on any one collective: a rank whose peer died or hangs fails after it
        # instead of waiting out the backend's default, and its attempt is retried (`lost_peer`).
        timeout = timedelta(
            seconds=float(os.environ.get("DISTILL_COLLECTIVE_TIMEOUT_SECONDS") or COLLECTIVE_TIMEOUT_SECONDS)
        )
        deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", timeout=timeout)
    if gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process of the job died or stopped
    answering (or timed out): not this process's own failure, and worth another attempt."""
    if world_size() == 1:
        return False
    # NCCL and c10d raise DistError (DistBackendError, DistNetworkError, timeouts); gloo raises plain
    # RuntimeErrors from its transport ("Connection closed by peer", "Timed out waiting ... for recv").
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo/transport/" in str(err))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        reduced = tensor.to(device)
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)
    return tensor


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def rank0_says(flag: bool) -> bool:
    """Rank 0's `flag`, on every rank: for a choice all ranks must make alike (whether to run a
    collective), which a file appearing between two ranks' looks could otherwise split."""
    return bool(all_reduce_sum(torch.tensor([1 if flag and rank() == 0 else 0])).item())


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions `model`: each forward then gathers its weights from every rank, so
    every rank must run the same number of forwards."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(spec: JobSpec, device: torch.device) -> str:
    """`auto` picks bf16 where the hardware computes it natively (an all-bf16 step here is ~2x fp32)."""
    wanted = spec.deepspeed.precision
    if wanted == "fp16" and device.type != "cuda":
        raise ResourceError(
            "deepspeed.precision: fp16 needs a GPU (DeepSpeed does not support it on CPU); use bf16 or fp32"
        )
    if wanted != "auto":
        return wanted
    has_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else _cpu_has_bf16()
    return "bf16" if has_bf16 else "fp32"


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def engine_config(spec: JobSpec, precision: str) -> dict:
    t = spec.training
    zero: dict = {"stage": spec.deepspeed.zero_stage}
    if spec.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # Dynamic loss scaling: fp16 gradients underflow without it.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 11},
        # AdamW with lr 1 and a schedule that returns the absolute lr (see trainer.lr_at): one
        # optimizer and one schedule span the recovery stage and the main method. `torch_adam`
        # avoids JIT-compiling FusedAdam; with offload DeepSpeed swaps in its CPU Adam. `fused`:
        # torch's one-kernel AdamW, on the CPU as on CUDA (a third of the for-each version's time here).
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": 1.0,
                "betas": list(t.adam_betas),
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": True,
                "fused": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def teacher_config(spec: JobSpec, precision: str, hidden_size: int) -> dict:
    """The config of a sharded teacher (deepspeed.shard_teacher): ZeRO-3 inference, no optimizer, as
    TRL prepares its reference models.

    Its weights are split over all processes; a forward gathers each layer's weights just before the
    layer runs and frees them after. Tensors of up to 10 × hidden_size elements (norms, biases) stay
    whole on every rank once gathered, which spares a collective per small tensor, and a bucket of
    0.9 × hidden_size² elements is prefetched ahead (TRL's values).
    """
    return {
        "train_micro_batch_size_per_gpu": spec.training.batch_size,  # required by DeepSpeed; unused here
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
    }


def initialize_teacher(model: torch.nn.Module, config: dict):
    """The ZeRO-3 engine of a teacher built under `teacher_config` (`load_model(..., zero3=config)`).

    The engine installs the hooks that gather the weights on the module, and removes them when it is
    collected: keep it as long as the module runs.
    """
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def initialize(model: torch.nn.Module, spec: JobSpec, precision: str, lr_at: Callable[[int], float]):
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=engine_config(spec, precision), lr_scheduler=scheduler
    )
    return engine


def _fits_whole(module: torch.nn.Module) -> bool:
    """Whether the whole of a ZeRO-3 module takes at most half its device's free memory."""
    whole = sum(p.ds_numel * p.element_size() for p in module.parameters())
    device = next(module.parameters()).device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    return whole <= free / 2


@contextmanager
def whole_for_decoding(engine) -> Iterator[torch.nn.Module]:
    """The engine's module, for decoding many tokens in a row.

    Under ZeRO-3, when the whole model fits in half the device's free memory, its parameters are
    gathered once for the block and its forwards are plain ones (DeepSpeed's
    `unwrap_model_for_generation`, which TRL uses for the same reason): otherwise each layer's
    weights are gathered from every rank again for every token, and ranks wait on each other at
    every layer of every token.
    """
    module = engine.module
    if not is_sharded(module) or not _fits_whole(module):
        yield module
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield module
