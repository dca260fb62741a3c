"""pytest set-up shared by the whole suite: deterministic, one CPU thread, no network; fixtures."""

from __future__ import annotations

import json
import os
import random
import sys
import types
from pathlib import Path

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


@pytest.fixture
def trainer_config():
    """Factory of SAELens ``SAETrainerConfig``s for short CPU runs on ready-made batches:
    ``trainer_config(steps, batch_size, **fields)`` with a constant ``lr`` (default 1e-3), no
    warm-up, no wandb; any other field is a keyword."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    def make(steps: int, batch_size: int, lr: float = 1e-3, **fields):
        settings = {
            "total_training_samples": steps * batch_size,
            "train_batch_size_samples": batch_size,
            "lr": lr,
            "lr_end": lr,
            "lr_scheduler_name": "constant",
            "lr_warm_up_steps": 0,
            "device": "cpu",
            "dead_feature_window": 1000,
            "feature_sampling_window": 1000,
            "logger": LoggingConfig(log_to_wandb=False),
            "n_batches_for_norm_estimate": 2,
        }
        return SAETrainerConfig(**{**settings, **fields})

    return make


@pytest.fixture(scope="session")
def local(tmp_path_factory):
    """A tiny model in the local format, a save_to_disk token dataset, a labelled jsonl file."""
    from tiny_lm import tiny_model, tiny_token_dataset

    from sae_adaptive_plugin.data.local_lm import save_local_model

    root = tmp_path_factory.mktemp("train_cli")
    save_local_model(tiny_model(), root / "model")
    tiny_token_dataset(n_rows=128).save_to_disk(str(root / "tokens"))
    rng = random.Random(0)
    words = [
        "a",
        "cat",
        "sat",
        "on",
        "the",
        "mat",
        "notwithstanding",
        "heterogeneous",
        "epistemology",
    ]
    rows = []
    for _ in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        rows.append({"text": text, "score": sum(map(len, text.split())) / len(text.split())})
    (root / "labelled.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running local Hub; huggingface_hub in this process and in subprocesses points at it."""
    from hub_server import HubServer
    from huggingface_hub import constants as hf_constants

    server = HubServer(tmp_path / "hub-server").start()
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    env = {
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",  # weights go through the git LFS API the test server speaks
        "HF_TOKEN": "",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    patches = {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for key, value in patches.items():
        monkeypatch.setattr(hf_constants, key, value)
    yield server
    server.stop()


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch):
    """Fresh loader state and copies of SAELens's registries; returns a function installing
    fake entry points ``{name: module}`` (a module of None means: import fails)."""
    from importlib import metadata

    from sae_lens import registry

    from sae_adaptive_plugin.registration import loader

    monkeypatch.setattr(loader, "_reports", {})
    monkeypatch.setattr(loader, "_manager", None)
    monkeypatch.setattr(registry, "SAE_CLASS_REGISTRY", dict(registry.SAE_CLASS_REGISTRY))
    monkeypatch.setattr(
        registry, "SAE_TRAINING_CLASS_REGISTRY", dict(registry.SAE_TRAINING_CLASS_REGISTRY)
    )
    for table in (registry.SAE_CLASS_REGISTRY, registry.SAE_TRAINING_CLASS_REGISTRY):
        table.pop("demo_arch", None)

    def install(plugins: dict[str, types.ModuleType | None]) -> None:
        eps = []
        for name, module in plugins.items():
            module_name = f"_fake_sae_plugin_{name}"
            if module is not None:
                monkeypatch.setitem(sys.modules, module_name, module)
            eps.append(metadata.EntryPoint(name, module_name, loader.ENTRY_POINT_GROUP))

        def entry_points(group: str):
            assert group == loader.ENTRY_POINT_GROUP
            return eps

        monkeypatch.setattr(loader.metadata, "entry_points", entry_points)

    return install
