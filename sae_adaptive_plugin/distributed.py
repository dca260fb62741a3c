"""Data parallelism on ``torch.distributed``: the process group from torchrun's environment and the
few collectives the architectures call so that batch-level quantities cover the global batch.

Every function is the identity (or a no-op) in a single process, so the SAEs call them
unconditionally. The global batch is the concatenation of the ranks' batches in rank order; every
rank holds a batch of the same size.

- :func:`gather_rows` — the global batch of a tensor (no gradient): for statistics that are not
  sums (medians, standard deviations, bisections), computed on every rank alike.
- :func:`global_mean` — the mean over the global batch, differentiable: its backward sums the
  ranks' gradients, so with gradients averaged over ``N`` ranks a loss ``f(mean)`` gets the
  gradient of the one-process loss.
- :func:`all_reduce_` / :func:`broadcast_` — in place, no gradient.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes shared files."""
    return rank() == 0


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or any launcher following its convention) put in the environment."""

    world_size: int
    rank: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> LaunchEnv:
        def read(name: str, default: int) -> int:
            value = os.environ.get(name, "")
            try:
                return int(value) if value.strip() else default
            except ValueError:
                raise ValueError(
                    f"environment variable {name}={value!r} is not an integer"
                ) from None

        env = cls(read("WORLD_SIZE", 1), read("RANK", 0), read("LOCAL_RANK", 0))
        if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
            raise ValueError(
                f"inconsistent launcher environment: WORLD_SIZE={env.world_size} (must be >= 1), "
                f"RANK={env.rank} (must be in [0, WORLD_SIZE)), LOCAL_RANK={env.local_rank}"
            )
        return env


def init_from_env(cuda: bool | None = None) -> LaunchEnv:
    """Join the process group that torchrun's environment describes (``WORLD_SIZE > 1``): nccl
    when training on CUDA (``cuda``; default: when CUDA is available), gloo otherwise; each
    rank's CUDA device is ``cuda:LOCAL_RANK``. A second call reuses the group. With
    ``WORLD_SIZE`` unset or 1 nothing is started."""
    env = LaunchEnv.from_environ()
    if env.world_size == 1 or dist.is_initialized():
        return env
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={env.world_size} asks for {env.world_size} processes, but this torch "
            "build has no torch.distributed"
        )
    if torch.cuda.is_available() if cuda is None else cuda:
        torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", env.local_rank))
    else:
        dist.init_process_group("gloo")
    return env


def device_for_rank(device: str | None, local_rank: int) -> str | None:
    """``cuda``/``cuda:N`` → ``cuda:LOCAL_RANK`` (one GPU per process); other devices unchanged."""
    if device is None or not str(device).startswith("cuda"):
        return device
    return f"cuda:{local_rank}"


def _communicable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a CUDA copy of it when the backend (nccl) only moves CUDA tensors."""
    if tensor.device.type != "cuda" and dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over the ranks (``"sum"``, ``"min"``, ``"max"``, ``"mean"``)."""
    if not is_distributed():
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    moved = _communicable(tensor)
    dist.all_reduce(moved, op=ops["sum" if op == "mean" else op])
    if moved is not tensor:
        tensor.copy_(moved)
    if op == "mean":
        tensor.div_(world_size())
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank ``src``'s."""
    if is_distributed():
        moved = _communicable(tensor)
        dist.broadcast(moved, src=src)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s value of a picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The global batch: every rank's ``tensor`` concatenated along dim 0 in rank order."""
    if not is_distributed():
        return tensor.detach()
    moved = _communicable(tensor.detach().contiguous())
    parts = [torch.empty_like(moved) for _ in range(world_size())]
    dist.all_gather(parts, moved)
    return torch.cat(parts).to(tensor.device)


def local_rows(tensor: torch.Tensor, n_local: int) -> torch.Tensor:
    """This rank's ``n_local`` rows of a :func:`gather_rows` result (every rank gathers the
    same number of rows)."""
    start = rank() * n_local if is_distributed() else 0
    if tensor.shape[0] < start + n_local:
        raise ValueError(
            f"local_rows: {tensor.shape[0]} gathered rows hold no rows "
            f"[{start}, {start + n_local}) for rank {rank()}"
        )
    return tensor[start : start + n_local]


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor``'s elements over the global batch (every rank's tensor has the same
    number of elements); differentiable when ``tensor`` requires grad."""
    if not is_distributed():
        return tensor.mean()
    local_sum = tensor.sum()
    if local_sum.requires_grad:
        from torch.distributed.nn.functional import all_reduce

        total = all_reduce(local_sum)
    else:
        total = all_reduce_(local_sum.detach().clone())
    return total / (tensor.numel() * world_size())
