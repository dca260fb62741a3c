"""``auxk_rare_tokens``: latents firing less than once per N tokens join AuxK's dead mask."""

from __future__ import annotations

import math

import pytest
import sae_lens  # noqa: F401  (first: the plugin registers before our modules import)
import torch
from step_parity import train_step

from sae_adaptive_plugin.saes.adaptivek import AdaptiveKTrainingSAEConfig
from sae_adaptive_plugin.saes.hierarchical_topk import (
    HierarchicalTopKTrainingSAE,
    HierarchicalTopKTrainingSAEConfig,
)
from sae_adaptive_plugin.saes.rare_latents import RARE_HORIZON, RareLatents, firing_counts
from sae_adaptive_plugin.saes.softsae_config import SoftSAETrainingSAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_SAE = 16, 48
AUX = "auxiliary_reconstruction_loss"


def test_firing_rate_is_a_decayed_rate_and_silent_for_the_first_horizon():
    rate = RareLatents(every_tokens=10)  # rare: below 1 firing per 10 tokens
    horizon = RARE_HORIZON * 10
    steps = [(torch.tensor([5.0, 1.0, 0.0]), 20), (torch.tensor([0.0, 4.0, 0.0]), 20)]
    rate.record(*steps[0])
    assert rate.rare() is None  # 20 < 40 tokens seen
    rate.record(*steps[1])
    decay = math.exp(-20 / horizon)
    fires = torch.tensor([5.0 * decay, 1.0 * decay + 4.0, 0.0])
    tokens = 20 * decay + 20
    torch.testing.assert_close(rate.fires, fires)
    assert rate.tokens == pytest.approx(tokens)
    # rates: latent 0 3.03/32.1 = 0.094 < 0.1 (rare), latent 1 4.61/32.1 = 0.143; 2 never fired
    assert rate.rare().tolist() == [True, False, True]


def _hierarchical(**extra):
    torch.manual_seed(0)
    if extra.get("auxk_rare_tokens", 10**9) < 8 * D_SAE / 4:  # small N: a one-batch horizon
        with pytest.warns(UserWarning, match="auxk_rare_tokens"):
            cfg = HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **extra)
    else:
        cfg = HierarchicalTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **extra)
    return HierarchicalTopKTrainingSAE(cfg)


def test_rare_latents_get_the_auxk_loss_where_saelens_sees_none_dead():
    """SAELens's window marks nothing dead (a False mask every step): without the field the AuxK
    loss stays 0. With ``auxk_rare_tokens = 8`` (horizon 32 tokens, one batch), the next step's
    AuxK trains the latents that fired on fewer than 32 / 8 = 4 rows: the same loss as SAELens's
    AuxK given exactly those latents as dead."""
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1))
    none_dead = torch.zeros(D_SAE, dtype=torch.bool)
    plain, rare = _hierarchical(), _hierarchical(auxk_rare_tokens=8)
    first = train_step(rare, x, 0, none_dead)  # nothing is rare before a horizon of tokens
    assert first.losses[AUX] == 0 and train_step(plain, x, 0, none_dead).losses[AUX] == 0
    fired = firing_counts(first.feature_acts)
    expected_dead = fired < 4
    assert 0 < expected_dead.sum() < D_SAE
    second = train_step(rare, x, 1, none_dead)  # no optimiser step: the same code as step 0
    assert second.losses[AUX] > 0
    torch.testing.assert_close(
        second.losses[AUX], train_step(plain, x, 1, expected_dead).losses[AUX]
    )
    assert torch.equal(rare._rare_latents.rare(), expected_dead)
    # SAELens's own dead latents stay dead for AuxK too (the two masks are OR'ed)
    saelens_dead = ~expected_dead & (torch.arange(D_SAE) % 2 == 0)
    torch.testing.assert_close(
        train_step(rare, x, 2, saelens_dead).losses[AUX],
        train_step(plain, x, 2, expected_dead | saelens_dead).losses[AUX],
    )


def test_firings_from_the_selection_match_the_code():
    """The fused step counts firings from its compact selection; the count equals the dense
    code's (what SAELens's trainer counts), zero-valued selected slots included."""
    sae = _hierarchical()
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # some selected pre-activations are ReLU'd to 0
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(2))
    encoding = sae.encode_selection(x)
    counts, rows = sae.firings(encoding)
    assert rows == 64
    torch.testing.assert_close(counts, firing_counts(encoding.feature_acts).float())
    assert (encoding.selection.values[encoding.selection.mask] == 0).any()


@pytest.mark.parametrize(
    "config_class",
    [HierarchicalTopKTrainingSAEConfig, AdaptiveKTrainingSAEConfig, SoftSAETrainingSAEConfig],
)
def test_auxk_rare_tokens_is_checked(config_class):
    cfg = config_class(d_in=D_IN, d_sae=D_SAE, k=4, auxk_rare_tokens=1000.0)
    assert cfg.auxk_rare_tokens == 1000 and isinstance(cfg.auxk_rare_tokens, int)
    assert "auxk_rare_tokens" not in cfg.get_inference_sae_cfg_dict()  # training-only
    assert config_class(d_in=D_IN, d_sae=D_SAE, k=4).auxk_rare_tokens is None
    for bad in (0, -5, 2.5, True, "1000"):
        with pytest.raises(ValueError, match="auxk_rare_tokens"):
            config_class(d_in=D_IN, d_sae=D_SAE, k=4, auxk_rare_tokens=bad)


def test_saelens_topk_gets_the_same_criterion_in_a_comparison():
    """A comparison's ``auxk_rare_tokens`` reaches SAELens's TopK (no such field) through a
    patch: its AuxK then trains the rare latents as ours does."""
    from sae_adaptive_plugin.experiments.registry_saes import build_training_sae

    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1))
    none_dead = torch.zeros(D_SAE, dtype=torch.bool)
    settings = {"k": 4, "auxk_rare_tokens": 8}
    torch.manual_seed(0)
    patched = build_training_sae("topk", settings, {}, d_in=D_IN, d_sae=D_SAE)
    torch.manual_seed(0)
    plain = build_training_sae("topk", {"k": 4}, {}, d_in=D_IN, d_sae=D_SAE)
    first = train_step(patched, x, 0, none_dead)
    assert first.losses[AUX] == 0
    expected_dead = firing_counts(first.feature_acts) < 4
    torch.testing.assert_close(
        train_step(patched, x, 1, none_dead).losses[AUX],
        train_step(plain, x, 1, expected_dead).losses[AUX],
    )
    assert train_step(patched, x, 1, none_dead).losses[AUX] > 0


@pytest.mark.parametrize(
    "config_class",
    [HierarchicalTopKTrainingSAEConfig, AdaptiveKTrainingSAEConfig, SoftSAETrainingSAEConfig],
)
def test_an_auxk_rare_tokens_near_the_mean_rate_is_warned_about(config_class):
    """d_sae / k = 12 tokens per firing on average: N below 8 · 12 = 96 would hand AuxK latents
    that fire at an ordinary rate."""
    import warnings

    with pytest.warns(UserWarning, match=r"auxk_rare_tokens=50 .* at least 8·d_sae/k = 96"):
        config_class(d_in=D_IN, d_sae=D_SAE, k=4, auxk_rare_tokens=50)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*auxk_rare_tokens.*")
        config_class(d_in=D_IN, d_sae=D_SAE, k=4, auxk_rare_tokens=96)


@pytest.mark.parametrize(("dtype", "autocast"), [("bfloat16", False), ("float32", True)])
def test_rare_latents_in_bf16_and_under_autocast(dtype, autocast):
    """A bf16 SAE, or CPU bf16 autocast: the counts are float32 and exact (the selection's
    firings), the rare latents reach AuxK (SAELens's mask all False) and the step is finite."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="auxk_rare_tokens"):  # a one-batch horizon
        cfg = HierarchicalTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=4, auxk_rare_tokens=8, dtype=dtype
        )
    sae = HierarchicalTopKTrainingSAE(cfg)
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(1)).to(sae.dtype)
    none_dead = torch.zeros(D_SAE, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        first = train_step(sae, x, 0, none_dead)
        out = train_step(sae, x, 1, none_dead)
    assert sae._rare_latents.fires.dtype == torch.float32
    expected = firing_counts(first.feature_acts) < 4  # fewer than 32 / 8 rows
    assert torch.equal(sae._rare_latents.rare(), expected) and 0 < expected.sum() < D_SAE
    out.loss.backward()
    assert out.losses[AUX].item() > 0
    assert torch.isfinite(out.loss) and all(
        torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None
    )
