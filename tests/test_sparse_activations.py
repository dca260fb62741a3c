"""Codes as COO tensors in training. HierarchicalTopK with SAELens's ``use_sparse_activations=True``
(a field of SAELens's TopK config, which HierarchicalTopK's extends): each step and ``encode``
return the code as a COO tensor instead of a dense ``[B, d_sae]`` one. ``sparse_training_code``
(ours, default True, all three architectures): the training steps alone do. SAELens's
``SAETrainer`` keeps its firing statistics from either form: trained side by side with the dense
code, the run must be the same run (same weights, same dead latents, same firing frequencies)."""

from __future__ import annotations

import pytest
import sae_lens  # noqa: F401  (first: the plugin registers before our modules import)
import torch
from step_parity import train_step

from sae_adaptive_plugin.experiments.lm_activations import CachedBatches
from sae_adaptive_plugin.experiments.registry_saes import build_training_sae

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_SAE, BATCH, STEPS = 16, 64, 32, 24
#: SoftSAE's hard phase (where its step selects top-k) over the second half of the run
EXTRA = {
    "softsae": {"hard_topk_start_step": STEPS // 2},
    "adaptivek": {"probe_min_r2": 0.0},  # Gaussian rows: no complexity for the probe to find
}


def _train(
    architecture: str,
    sparse: bool,
    acts: torch.Tensor,
    field: str = "use_sparse_activations",
    k: int = 4,
):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = build_training_sae(
        architecture,
        {"k": k},
        {architecture: {field: sparse, **EXTRA.get(architecture, {})}},
        d_in=D_IN,
        d_sae=D_SAE,
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=STEPS * BATCH,
        train_batch_size_samples=BATCH,
        lr=3e-3,
        lr_end=3e-3,
        lr_warm_up_steps=0,
        device="cpu",
        dead_feature_window=4,  # short: some latents count as dead, so AuxK runs
        feature_sampling_window=STEPS,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=2,
    )
    trainer = SAETrainer(
        cfg=trainer_cfg, sae=sae, data_provider=CachedBatches(acts, BATCH, 0, "cpu")
    )
    trainer.fit()
    return sae, trainer


def _dense_and_sparse_runs(architecture: str, field: str):
    """The same run with ``field`` false and true: ``(acts, dense_sae, sparse_sae)``, after
    checking they trained the same SAE (weights, steps since each latent fired, with AuxK steps
    in the run, and firing frequencies)."""
    acts = torch.randn(512, D_IN, generator=torch.Generator().manual_seed(1)) + 0.5
    dense_sae, dense = _train(architecture, False, acts, field)
    sparse_sae, sparse = _train(architecture, True, acts, field)
    for name, value in dense_sae.state_dict().items():
        torch.testing.assert_close(sparse_sae.state_dict()[name], value, msg=name)
    assert torch.equal(sparse.n_forward_passes_since_fired, dense.n_forward_passes_since_fired)
    assert int(dense.dead_neurons.sum()) > 0  # the comparison covered AuxK steps
    torch.testing.assert_close(sparse.act_freq_scores, dense.act_freq_scores)
    return acts, dense_sae, sparse_sae


@pytest.mark.parametrize("architecture", ["hierarchical_topk"])
def test_sparse_activations_train_the_same_sae_as_the_dense_code(architecture):
    acts, dense_sae, sparse_sae = _dense_and_sparse_runs(architecture, "use_sparse_activations")
    # the trained SAE's codes: COO from the sparse one, equal to the dense one's
    x = acts[:64]
    code = sparse_sae.encode(x)
    assert code.is_sparse
    torch.testing.assert_close(code.to_dense(), dense_sae.encode(x))


@pytest.mark.parametrize("architecture", ["adaptivek", "hierarchical_topk", "softsae"])
def test_sparse_training_code_trains_the_same_sae_as_the_dense_code(architecture):
    acts, dense_sae, sparse_sae = _dense_and_sparse_runs(architecture, "sparse_training_code")
    x = acts[:64]
    assert not sparse_sae.encode(x).is_sparse  # encode is unaffected
    step = STEPS - 1  # SoftSAE: in its hard phase
    for sae in (sparse_sae, dense_sae):
        sae.bind_run_length(STEPS)
    assert train_step(sparse_sae, x, step).feature_acts.is_sparse
    assert not train_step(dense_sae, x, step).feature_acts.is_sparse


def test_sparse_training_code_is_the_cpu_default_and_hooks_get_the_dense_code(monkeypatch):
    from sae_adaptive_plugin.saes import topk_family

    torch.manual_seed(0)
    sae = build_training_sae("adaptivek", {"k": 4}, {}, d_in=D_IN, d_sae=D_SAE)
    assert sae.cfg.sparse_training_code is None  # COO on the CPU, dense on other devices
    with monkeypatch.context() as m:  # a device whose host reads are not free (a GPU's)
        m.setattr(topk_family, "host_check_is_free", lambda t: False)
        assert not sae.sparse_code_in_step()
        sae.cfg.sparse_training_code = True  # asked for: COO there too
        assert sae.sparse_code_in_step()
        sae.cfg.sparse_training_code = None
    sae.bind_run_length(STEPS)
    x = torch.randn(8, D_IN)
    out = train_step(sae, x)
    assert out.feature_acts.is_sparse
    seen = []
    sae.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts.is_sparse))
    hooked = train_step(sae, x)
    sae.hook_sae_acts_post.remove_hooks()
    assert seen == [False] and not hooked.feature_acts.is_sparse
    torch.testing.assert_close(hooked.feature_acts, out.feature_acts.to_dense())
    assert train_step(sae, x).feature_acts.is_sparse  # hooks gone: COO again


def test_grouped_topk_widths_train_the_same_adaptivek(monkeypatch):
    """rows_topk's narrower top-k widths for rows with a small k (k_max = 64: widths 64, 32,
    16) against one top-k at k_max for every row: the same run through SAETrainer."""
    from sae_adaptive_plugin.ops import variable_topk

    acts = torch.randn(512, D_IN, generator=torch.Generator().manual_seed(1)) + 0.5
    acts = acts * torch.rand(512, 1, generator=torch.Generator().manual_seed(2)) * 3  # k varies
    runs = []
    for min_width in (16, 10**9):  # grouped; one width
        monkeypatch.setattr(variable_topk, "GROUP_MIN_WIDTH", min_width)
        runs.append(_train("adaptivek", True, acts, "sparse_training_code", k=16))
    (grouped, g_trainer), (single, s_trainer) = runs
    ks = grouped.k_per_sample(acts[:128])
    assert int(ks.min()) <= 16 < int(ks.max())  # rows in at least two width groups
    for name, value in single.state_dict().items():
        torch.testing.assert_close(grouped.state_dict()[name], value, msg=name)
    torch.testing.assert_close(g_trainer.act_freq_scores, s_trainer.act_freq_scores)


@pytest.mark.parametrize("architecture", ["adaptivek", "hierarchical_topk", "softsae"])
def test_sparse_training_code_refuses_other_values(architecture):
    with pytest.raises(ValueError, match="sparse_training_code must be true, false or null"):
        build_training_sae(
            architecture,
            {"k": 4},
            {architecture: {"sparse_training_code": "yes"}},
            d_in=8,
            d_sae=32,
        )


def test_sparse_code_keeps_each_rows_k_on_the_cpu_and_every_slot_elsewhere(monkeypatch):
    from sae_adaptive_plugin.ops.variable_topk import scatter_topk, variable_topk
    from sae_adaptive_plugin.saes import topk_family

    h = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([[0, 3, 7], [40, 1, 5]])
    selection = variable_topk(h, k, 40)
    dense = scatter_topk(selection, 40)
    cpu = topk_family.sparse_code(selection, 40)
    assert cpu._nnz() == int(k.sum())  # the slots inside each row's k only
    torch.testing.assert_close(cpu.to_dense(), dense)
    with monkeypatch.context() as m:  # a device whose host reads are not free: no mask read
        m.setattr(topk_family, "host_check_is_free", lambda t: False)
        every = topk_family.sparse_code(selection, 40)
    assert every._nnz() == 6 * 40
    torch.testing.assert_close(every.to_dense(), dense)
