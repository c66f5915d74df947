"""Small torch.distributed helpers shared by the trainers, the converter, the tools and the tests.

* :func:`free_port` - a TCP port free on 127.0.0.1 now;
* :func:`default_backend` / :func:`comm_device` - gloo on CPU, NCCL on CUDA, and the device a
  collective's tensors must live on;
* :func:`mean_over` - the average of a tensor over a group, in place;
* :func:`init_from_env` - a process group from the launcher's environment (a plain ``python``
  start is one rank on 127.0.0.1);
* :func:`one_rank_group` - a one-rank group for the duration of a ``with`` block, created only
  where none exists and destroyed at its end;
* :data:`PROCESS_GROUP_ENV` / :func:`without_process_group_env` - the launchers' process-group
  variables, which a child process that starts its own group must not inherit.

torch is imported on first use, so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional

if TYPE_CHECKING:
    import torch


#: what torchrun / the deepspeed launcher set for a rank (a caller's one-rank group included, whose
#: store may still listen on MASTER_PORT)
PROCESS_GROUP_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "NODE_RANK",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
)


def without_process_group_env(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """``env`` (default this process's environment) without :data:`PROCESS_GROUP_ENV`."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in PROCESS_GROUP_ENV}


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 (free now; a caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def default_backend() -> str:
    """``"nccl"`` where CUDA is available, else ``"gloo"``."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def comm_device(group: Any = None) -> "torch.device":
    """The device the tensors of a collective on ``group`` live on: the current CUDA device for
    an NCCL group, the CPU otherwise (gloo, or no process group at all)."""
    import torch
    import torch.distributed as dist

    if (
        torch.cuda.is_available()
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_backend(group) == "nccl"
    ):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size(group: Any = None) -> int:
    """The ranks in ``group`` (1 without a process group)."""
    import torch.distributed as dist

    n: int = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    return n


def mean_over(tensor: "torch.Tensor", group: Any = None) -> "torch.Tensor":
    """``tensor`` averaged over the ranks of ``group`` in place (unchanged on one rank); returns it."""
    import torch.distributed as dist

    n = world_size(group)
    if n > 1:
        dist.all_reduce(tensor, group=group)
        tensor /= n
    return tensor


def init_from_env(backend: Optional[str] = None, default_port: int = 29500) -> None:
    """``torch.distributed.init_process_group(backend)`` from the launcher's environment
    (torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); what is missing becomes one rank on
    127.0.0.1:``default_port``. A CUDA process first selects its LOCAL_RANK device."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(default_port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


@contextlib.contextmanager
def one_rank_group(backend: Optional[str] = None) -> Iterator[bool]:
    """A one-rank process group on a fresh local port for the ``with`` block, created only when
    none exists (then destroyed at the end; yields True) - a group the caller already has is left
    alone (yields False)."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group(
            backend or default_backend(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
        created = True
    try:
        yield created
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
