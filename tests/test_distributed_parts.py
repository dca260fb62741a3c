"""The data-parallel pieces in one process: the launcher environment, the collectives (identities
without a process group), the global BatchTopK against SAELens's, data sharding, the resume
check."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from sae_adaptive_plugin import distributed
from sae_adaptive_plugin.training import ConfigError
from sae_adaptive_plugin.training.distributed_runner import (
    GlobalBatchTopK,
    check_resume_world_size,
    shard_activations_store,
)


@pytest.mark.parametrize(
    ("env", "named"),
    [({"WORLD_SIZE": "two"}, "WORLD_SIZE"), ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2")],
)
def test_bad_launcher_environment_names_the_variable(monkeypatch, env, named):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=named):
        distributed.LaunchEnv.from_environ()


def test_no_launcher_means_one_process(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init_from_env() == distributed.LaunchEnv(1, 0, 0)
    assert not distributed.is_distributed()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)


def test_collectives_are_identities_in_one_process():
    x = torch.randn(6, 3, requires_grad=True)
    assert torch.equal(distributed.gather_rows(x), x.detach())
    assert not distributed.gather_rows(x).requires_grad
    mean = distributed.global_mean(x)
    assert torch.equal(mean, x.mean())
    mean.backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / x.numel()))
    y = torch.arange(4.0)
    assert torch.equal(distributed.all_reduce_(y.clone(), "min"), y)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_gather_object(3) == [3]


def test_device_for_rank():
    assert distributed.device_for_rank("cuda", 3) == "cuda:3"
    assert distributed.device_for_rank("cuda:0", 1) == "cuda:1"
    assert distributed.device_for_rank("cpu", 1) == "cpu"
    assert distributed.device_for_rank(None, 1) is None


@pytest.mark.parametrize("k", [1.0, 2.5, 8.0])
def test_global_batchtopk_matches_saelens_in_one_process(k):
    from sae_lens.saes.batchtopk_sae import BatchTopK

    x = torch.randn(16, 32, requires_grad=True)
    ours = GlobalBatchTopK(k)(x)
    theirs = BatchTopK(k)(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    (g_ours,) = torch.autograd.grad((ours * torch.arange(32.0)).sum(), x)
    (g_theirs,) = torch.autograd.grad((theirs * torch.arange(32.0)).sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=0)


def _store(tokens: Dataset | None, cached: Dataset | None) -> SimpleNamespace:
    store = SimpleNamespace(dataset=tokens, cached_activation_dataset=cached)
    store._iterate_tokenized_sequences = lambda: iter(store.dataset)
    return store


@pytest.mark.parametrize("which", ["dataset", "cached_activation_dataset"])
def test_ranks_read_disjoint_contiguous_shards(which):
    rows = Dataset.from_dict({"i": list(range(10))})
    shards = []
    for rank in range(3):
        store = _store(rows, None) if which == "dataset" else _store(None, rows)
        shard_activations_store(store, rank=rank, world_size=3)
        shards.append(list(getattr(store, which)["i"]))
        if which == "dataset":  # the store's reader starts on the shard
            assert [row["i"] for row in store.iterable_sequences] == shards[-1]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"metadata": {"world_size": 2}}))
    check_resume_world_size(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"2 process.*now 1"):
        check_resume_world_size(tmp_path, 1)
    (tmp_path / "cfg.json").write_text(json.dumps({"metadata": {}}))  # a one-process checkpoint
    check_resume_world_size(tmp_path, 1)
    with pytest.raises(ConfigError, match=r"1 process.*now 4"):
        check_resume_world_size(tmp_path, 4)
