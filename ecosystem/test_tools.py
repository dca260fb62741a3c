"""The tools around SAELens on every architecture of this package, offline on a tiny local model.

- sae-dashboard: ``SaeVisRunner`` builds the feature-centric dashboard (HTML written) and the
  top activations it shows equal ``SAE.encode`` on the same tokens.
- SAEBench: the core eval (``sae_bench.evals.core.main.multiple_evals``: reconstruction, KL/CE,
  sparsity, feature density) writes its results JSON with the SAE's L0 equal to ``encode``'s.
- nnsight: a trace reads the hook's activation and splices the SAE's reconstruction in, with the
  logits of SAELens's ``run_with_saes``.

Each SAE is a seeded random one, saved and loaded with ``SAE.load_from_disk`` as a user would.
The model is ``tiny_lm``'s 1-layer HookedSAETransformer with a word-level tokenizer built here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.registry import SAE_CLASS_REGISTRY
from sae_lens.saes.topk_sae import TopK
from tiny_lm import CONTEXT_SIZE, D_MODEL, D_VOCAB, HOOK_NAME, tiny_model, tiny_token_dataset

from sae_adaptive_plugin.probe import ComplexityProbe

ARCHITECTURES = ("adaptivek", "softsae", "hierarchical_topk")
D_SAE = 128
K_FIELDS = {
    "adaptivek": {"k_min": 2, "k_max": 16},
    "softsae": {"k": 8, "k_max": 16},
    "hierarchical_topk": {"k": 8, "trained_k": 8},
}
FEATURES = list(range(8))
N_PROMPTS = 32
ROUNDING = 6e-5  # sae-dashboard rounds activations to 4 decimals


def _tokenizer():
    """A word-level tokenizer for the tiny model's vocabulary (``t0`` … ``t99``), nothing
    downloaded; token 0 is BOS/EOS/PAD."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(D_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="t0",
        eos_token="t0",
        pad_token="t0",
        unk_token="t0",
        add_bos_token=True,  # TransformerLens then keeps it instead of re-loading it by name
        name_or_path="tiny-word-level",
    )


@pytest.fixture(scope="module")
def model() -> HookedSAETransformer:
    tl_model = tiny_model()
    out = HookedSAETransformer(tl_model.cfg, tokenizer=_tokenizer())
    out.load_state_dict(tl_model.state_dict())
    return out.eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.tensor(tiny_token_dataset(n_rows=N_PROMPTS, seed=3)["input_ids"])


def _saved_and_loaded_sae(architecture: str, folder: Path) -> SAE:
    """A random SAE whose k follows the input, saved and reloaded from disk."""
    sae_cls, cfg_cls = SAE_CLASS_REGISTRY[architecture]
    # rescale_acts_by_decoder_norm=True as in a SAE saved from training (SaeVisRunner calls
    # fold_W_dec_norm, which SAELens's TopK refuses without it)
    cfg = cfg_cls(
        d_in=D_MODEL, d_sae=D_SAE, rescale_acts_by_decoder_norm=True, **K_FIELDS[architecture]
    )
    cfg.metadata.model_name = "tiny-random"
    cfg.metadata.hook_name = HOOK_NAME
    cfg.metadata.context_size = CONTEXT_SIZE
    cfg.metadata.prepend_bos = False
    sae = sae_cls(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))  # SAEBench expects unit rows
    if architecture == "adaptivek":
        sae.set_probe(ComplexityProbe(torch.randn(D_MODEL, generator=gen), 0.0, -2.0, 2.0))
    sae.save_model(folder)
    return SAE.load_from_disk(folder)


def _encode_all(sae: SAE, model: HookedSAETransformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK_NAME)
        return sae.encode(cache[HOOK_NAME])  # [prompt, pos, d_sae]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_sae_dashboard_html_and_top_activations_equal_encode(architecture, model, tokens, tmp_path):
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    sae = _saved_and_loaded_sae(architecture, tmp_path / "sae")
    assert isinstance(sae.activation_fn, TopK)  # else sae-dashboard: "Invalid architecture"
    expected = _encode_all(sae, model, tokens)
    k = sae.k_per_sample(model.run_with_cache(tokens, names_filter=HOOK_NAME)[1][HOOK_NAME])
    if architecture != "hierarchical_topk":
        assert k.unique().numel() > 1, "rows must differ in k for this test to mean anything"

    cfg = SaeVisConfig(
        hook_point=HOOK_NAME,
        features=FEATURES,
        minibatch_size_features=len(FEATURES),
        minibatch_size_tokens=8,
        device="cpu",
        dtype="float32",
    )
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    html = tmp_path / "dashboard.html"
    save_feature_centric_vis(sae_vis_data=data, filename=html)
    assert html.stat().st_size > 10_000
    page = html.read_text(encoding="utf-8")
    assert "grid-container" in page
    assert "<script" in page

    # bold tokens are drawn from positions [buffer[0] + 1, seq_len - buffer[1]) of each prompt
    before, after = cfg.feature_centric_layout.seq_cfg.buffer
    eligible = expected[:, before + 1 : expected.shape[1] - after]
    checked = 0
    for feature in FEATURES:
        top = data.feature_data_dict[feature].sequence_data.seq_group_data[0]  # TOP ACTIVATIONS
        bold = []  # each example: a window of tokens around a bold one, at index `before`
        for seq in top.seq_data:
            value = seq.feat_acts[before]
            at = expected[seq.original_index, seq.qualifying_token_index, feature]
            assert abs(value - float(at)) <= ROUNDING, (feature, seq.original_index)
            if value > 0:  # zero: filler when a feature fires rarely
                bold.append(value)
        bold.sort(reverse=True)
        best = eligible[..., feature].flatten().sort(descending=True).values[: len(bold)]
        # the top examples are encode's largest activations of this feature, in order (the
        # dashboard stores them rounded to 4 decimals)
        torch.testing.assert_close(torch.tensor(bold), best, rtol=0, atol=ROUNDING)
        checked += len(bold) > 0
    assert checked >= len(FEATURES) // 2


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saebench_core_eval_runs_and_reports_encodes_l0(
    architecture, model, tokens, tmp_path, monkeypatch
):
    import sae_bench.evals.core.main as core

    sae = _saved_and_loaded_sae(architecture, tmp_path / "sae")
    # SAEBench loads the model by name from the Hub; here it gets the tiny local one
    monkeypatch.setattr(
        core.HookedTransformer, "from_pretrained_no_processing", lambda *a, **kw: model
    )
    # a local dataset folder (load_dataset reads the jsonl), named relative to the working
    # directory: for a pretokenized dataset given by name SAELens looks up the tokenizer it was
    # made with on the Hub, and an absolute path is not a valid repo id (HFValidationError)
    monkeypatch.chdir(tmp_path)
    data_dir = Path("tokens")
    data_dir.mkdir()
    with open(data_dir / "train.jsonl", "w") as f:
        for row in tiny_token_dataset(n_rows=64, seed=5)["input_ids"]:
            f.write(json.dumps({"input_ids": row}) + "\n")

    results = core.multiple_evals(
        selected_saes=[(f"tiny-{architecture}", sae)],
        n_eval_reconstruction_batches=2,
        n_eval_sparsity_variance_batches=2,
        eval_batch_size_prompts=8,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        dataset="tokens",
        context_size=CONTEXT_SIZE,
        output_folder="eval_results",
        device="cpu",
        force_rerun=True,
    )
    assert len(results) == 1, "SAEBench logged an error for this SAE (see the captured log)"
    files = list(Path("eval_results").glob("*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    metrics = saved["eval_result_metrics"]
    assert metrics["reconstruction_quality"]["explained_variance"] is not None
    assert metrics["model_behavior_preservation"]["kl_div_score"] is not None
    l0 = metrics["sparsity"]["l0"]
    # SAEBench's L0 is encode's: the mean per-token k (sampled prompts; hierarchical: exactly k)
    acts = _encode_all(sae, model, tokens)
    mean_k = float((acts > 0).sum(-1).float().mean())
    if architecture == "hierarchical_topk":
        assert l0 == pytest.approx(K_FIELDS[architecture]["k"])
    else:
        assert 1 <= l0 <= K_FIELDS[architecture]["k_max"]
        assert l0 == pytest.approx(mean_k, rel=0.25)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_nnsight_trace_reads_and_splices_the_sae(architecture, model, tokens, tmp_path):
    """nnsight on the TransformerLens model: read the hook's activation, encode it, and splice
    the SAE's reconstruction into the forward pass — as SAELens's ``run_with_saes`` does."""
    from nnsight import NNsight

    sae = _saved_and_loaded_sae(architecture, tmp_path / "sae")
    traced = NNsight(model)
    with torch.no_grad(), traced.trace(tokens):
        acts = traced.blocks[0].hook_resid_post.output.save()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(acts), _encode_all(sae, model, tokens))
        with traced.trace(tokens):
            hook = traced.blocks[0].hook_resid_post
            hook.output = sae(hook.output)
            logits = traced.output.save()
        expected = model.run_with_saes(tokens, saes=[sae])
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, model(tokens))  # the SAE did change the forward pass
