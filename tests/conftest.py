"""pytest set-up shared by the whole suite: deterministic, one CPU thread, no network; fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """One torch thread for the whole run: the suite's small SAEs and float64 solves run fastest on
    one thread of a small shared machine. ``SAE_ADAPTIVE_TEST_THREADS=N`` changes it."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("SAE_ADAPTIVE_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module whatever the session's setting (small float64 BLAS calls
    and small SAEs run much faster on one thread). Use with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
