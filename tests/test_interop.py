"""What the tools around SAELens rely on, for every architecture of this package.

- ``sae.activation_fn`` is SAELens's ``TopK`` (sae-dashboard then encodes all latents with
  ``encode``); for AdaptiveK and SoftSAE it computes their own per-row selection.
- ``k_per_sample`` has one k per row the SAE reads: ``[batch, pos]`` for ``hook_z`` inputs too.
- A saved ``cfg.json`` names the package (and version) that provides the architecture.

The tools themselves run in the ecosystem job (``make test-ecosystem``, ``tests/ecosystem``).
"""

from __future__ import annotations

import json

import pytest
import sae_lens  # noqa: F401  (first: the plugin registers before our modules import)
import torch
from sae_lens import SAE
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.topk_sae import TopK

from sae_adaptive_plugin import __version__
from sae_adaptive_plugin.probe import ComplexityProbe
from sae_adaptive_plugin.provenance import (
    PACKAGE_NAME,
    PROVIDER_METADATA_KEY,
    PROVIDER_VERSION_METADATA_KEY,
)
from sae_adaptive_plugin.saes.per_row_topk import PerRowTopK

ARCHITECTURES = ("adaptivek", "softsae", "hierarchical_topk")
ADAPTIVE = ("adaptivek", "softsae")
N_HEADS, D_HEAD = 4, 4
D_IN, D_SAE = N_HEADS * D_HEAD, 64
K_FIELDS = {
    "adaptivek": {"k_min": 2, "k_max": 16},
    "softsae": {"k": 8, "k_max": 16},
    "hierarchical_topk": {"k": 8},
}


def _sae(architecture: str, training: bool = False, **overrides):
    """A random SAE whose k differs between rows (AdaptiveK: a random probe; SoftSAE: a random
    k-estimator), in double precision so that no two pre-activations tie."""
    registry = SAE_TRAINING_CLASS_REGISTRY if training else SAE_CLASS_REGISTRY
    sae_cls, cfg_cls = registry[architecture]
    kwargs = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float64", **K_FIELDS[architecture]}
    if architecture == "hierarchical_topk" and not training:
        kwargs["trained_k"] = 8
    if architecture == "adaptivek" and training:  # the target mean L0 (training config only)
        kwargs["k"] = 8
    sae = sae_cls(cfg_cls(**{**kwargs, **overrides}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    if architecture == "adaptivek":
        sae.set_probe(ComplexityProbe(torch.randn(D_IN, generator=gen), 0.0, -3.0, 3.0))
    return sae


def _x(*lead: int) -> torch.Tensor:
    return torch.randn(*lead, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_activation_fn_is_sae_lens_topk(architecture, training):
    sae = _sae(architecture, training)
    assert isinstance(sae.activation_fn, TopK)  # sae-dashboard's test for "encode all latents"
    expected_k = sae.cfg.k_max if architecture in ADAPTIVE else sae.cfg.k
    assert sae.activation_fn.k == expected_k


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescaled"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("architecture", ADAPTIVE)
def test_activation_fn_computes_the_per_row_selection_of_encode(architecture, training, rescale):
    sae = _sae(architecture, training, rescale_acts_by_decoder_norm=rescale)
    assert isinstance(sae.activation_fn, PerRowTopK)
    x = _x(64)
    k = sae.k_per_sample(x)
    assert k.unique().numel() > 3, "the rows must differ in k for this test to mean anything"
    with torch.no_grad():
        feats = sae.encode(x)
        # the pre-activations encode selects from (after the decoder-norm rescale)
        hidden_pre = sae.process_sae_in(x) @ sae.W_enc + sae.b_enc
        if rescale:
            hidden_pre = hidden_pre * sae.W_dec.norm(dim=-1)
        via_activation_fn = sae.activation_fn(hidden_pre, k)
    assert torch.equal(via_activation_fn != 0, feats != 0)  # the same latents in every row
    torch.testing.assert_close(via_activation_fn, feats)  # encode's fused matmul: last-bit diffs
    assert torch.equal((feats > 0).sum(-1), k)  # random SAE: every selected value is positive
    with pytest.raises(TypeError, match="needs each row's k"):
        sae.activation_fn(hidden_pre)
    with pytest.raises(ValueError, match="k_max"):
        sae.activation_fn(hidden_pre, torch.full_like(k, sae.cfg.k_max + 1))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_dashboard_style_encode_of_all_latents_after_save_and_reload(architecture, tmp_path):
    """sae-dashboard's branch, on the SAE as a user loads it: ``isinstance(activation_fn, TopK)``
    → ``encode`` on ``[batch, pos, d_in]``, then its features of interest."""
    sae = _sae(architecture)
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path, dtype="float64")
    assert isinstance(loaded.activation_fn, TopK)
    x = _x(2, 8)
    with torch.no_grad():
        acts = loaded.encode(x)
        torch.testing.assert_close(acts, sae.encode(x), rtol=0, atol=0)
    assert torch.equal((acts > 0).sum(-1), loaded.k_per_sample(x))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_k_per_sample_has_one_k_per_row_for_hook_z_inputs(architecture):
    """Inference SAEs merge the heads of ``hook_z`` activations into one row (training SAEs get
    rows flattened by SAELens's activation store: next test)."""
    sae = _sae(architecture, reshape_activations="hook_z")
    z = _x(2, 5).reshape(2, 5, N_HEADS, D_HEAD)  # hook_z: [batch, pos, n_heads, d_head]
    k = sae.k_per_sample(z)
    assert k.shape == (2, 5)
    assert k.dtype == torch.long
    with torch.no_grad():
        acts = sae.encode(z)  # [batch, pos, d_sae]: the heads are one row
    assert torch.equal((acts > 0).sum(-1), k)
    flat = _sae(architecture)  # the same weights reading the flattened rows
    assert torch.equal(flat.k_per_sample(z.reshape(2, 5, D_IN)), k)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_k_per_sample_has_one_k_per_row_of_encode(architecture, training):
    sae = _sae(architecture, training)
    x = _x(2, 5)
    k = sae.k_per_sample(x)
    assert k.shape == (2, 5)
    with torch.no_grad():
        assert torch.equal((sae.encode(x) > 0).sum(-1), k)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saved_cfg_names_the_providing_package_and_version(architecture, training, tmp_path):
    sae = _sae(architecture, training)
    if training:
        sae.save_inference_model(tmp_path)
    else:
        sae.save_model(tmp_path)
    metadata = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert metadata[PROVIDER_METADATA_KEY] == PACKAGE_NAME
    assert metadata[PROVIDER_VERSION_METADATA_KEY] == __version__


def test_plain_topk_export_does_not_claim_the_package(tmp_path):
    exported = _sae("hierarchical_topk").to_topk_sae(4)
    exported.save_model(tmp_path)
    metadata = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert PROVIDER_METADATA_KEY not in metadata
    assert metadata["exported_from_architecture"] == "hierarchical_topk"
