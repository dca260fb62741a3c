"""A private torch RNG stream, so a seed gives the same samples whatever else ran before."""

from __future__ import annotations

from typing import Any

import torch


class IsolatedRNG:
    """A private RNG stream: inside ``with``, torch's global RNG (CPU, and the CUDA device when
    ``device`` is CUDA) continues this object's own state; outside, the global state is untouched.
    """

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        dev = torch.device(device)
        self._cuda: int | None = None
        if dev.type == "cuda":
            self._cuda = 0 if dev.index is None else dev.index
        with torch.random.fork_rng(devices=self._devices()):
            torch.manual_seed(seed)
            self._cpu_state = torch.get_rng_state()
            self._cuda_state = (
                torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None
            )
        self._fork: Any = None

    def _devices(self) -> list[int]:
        return [] if self._cuda is None else [self._cuda]

    def __enter__(self) -> IsolatedRNG:
        self._fork = torch.random.fork_rng(devices=self._devices())
        self._fork.__enter__()
        torch.set_rng_state(self._cpu_state)
        if self._cuda is not None:
            torch.cuda.set_rng_state(self._cuda_state, self._cuda)
        return self

    def __exit__(self, *exc: object) -> None:
        self._cpu_state = torch.get_rng_state()
        if self._cuda is not None:
            self._cuda_state = torch.cuda.get_rng_state(self._cuda)
        self._fork.__exit__(*exc)
        self._fork = None
