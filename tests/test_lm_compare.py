"""``compare --lm`` and the Hugging Face model path on a tiny random-weight Llama folder."""

from __future__ import annotations

import bz2
import json
import math
from pathlib import Path

import pytest
import torch
from tiny_lm import LLAMA_D_MODEL, tiny_llama_folder, tiny_llama_gguf, write_text_corpus

from sae_adaptive_plugin.data import corpus, local_lm
from sae_adaptive_plugin.experiments.lm_activations import (
    cache_key,
    cached_activations,
    documents_to_sequences,
    layer_activations,
    splice_scores,
)
from sae_adaptive_plugin.experiments.lm_benchmark import RESULT_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def llama(llama_dir):
    model, tokenizer = local_lm.hf_model_and_tokenizer(str(llama_dir))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def gguf_file(llama_dir, tmp_path_factory) -> Path:
    return tiny_llama_gguf(llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("text")
    return write_text_corpus(d / "train.txt", 120, seed=0), write_text_corpus(d / "held.cor", 40, 1)


def test_wikitext_keeps_prose_and_drops_markup(tmp_path):
    page = (
        "{{Infobox|name=x}}\n'''Anarchism''' is a [[political philosophy]] that advocates "
        "[[self-governance|self-governed]] societies.<ref>cite</ref> It is described in many "
        "books and has a long history across the world, in Europe, Asia and the Americas alike.\n"
        "* a list item that is long enough to count as a paragraph if lists were kept in it\n"
        "== History ==\n"
    )
    xml = f"<mediawiki><page><text xml:space='preserve'>{page}</text></page></mediawiki>"
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    docs = corpus.read_documents(path, min_chars=100)
    assert docs == [
        "Anarchism is a political philosophy that advocates self-governed societies. It is "
        "described in many books and has a long history across the world, in Europe, Asia and "
        "the Americas alike."
    ]


def test_unknown_corpus_format_names_the_file(tmp_path):
    path = tmp_path / "x.pdf"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"x\.pdf: unknown format"):
        corpus.read_documents(path)


def test_gguf_file_resolves_to_folder_and_gguf_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert local_lm.hf_pretrained_args(str(gguf)) == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert local_lm.hf_pretrained_args(str(tmp_path)) == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert local_lm.uses_hf_causal_lm(str(gguf), None)
    with pytest.raises(ValueError, match=r"gguf_file is 'other\.gguf'"):
        local_lm.hf_pretrained_args(str(gguf), {"gguf_file": "other.gguf"})


def test_truncated_forward_matches_full_and_surprisal_is_the_models(llama, corpora):
    model, tokenizer = llama
    tokens = documents_to_sequences(tokenizer, corpus.read_documents(corpora[1]), 90, 16)
    assert tokens.shape == (6, 16) and (tokens[:, 0] == tokenizer.bos_token_id).all()
    later_calls = []
    hook = model.model.layers[2].register_forward_hook(lambda *_: later_calls.append(1))
    truncated, none = layer_activations(model, tokens, 1, with_surprisal=False)
    assert later_calls == []  # the forward stopped after layer 1
    hook.remove()
    full, surprisal = layer_activations(model, tokens, 1, with_surprisal=True)
    assert none is None and truncated.shape == (6 * 15, LLAMA_D_MODEL)
    torch.testing.assert_close(truncated, full)
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    # hidden_states[0] is the embedding: layer 1's output is hidden_states[2]
    torch.testing.assert_close(full, out.hidden_states[2][:, 1:].reshape(-1, LLAMA_D_MODEL))
    logp = out.logits[:, :-1].log_softmax(-1)
    expected = -logp.gather(-1, tokens[:, 1:, None])[..., 0].reshape(-1)
    torch.testing.assert_close(surprisal, expected)


def test_activation_cache_is_reused_and_keyed(tmp_path, corpora):
    calls = []

    def compute():
        calls.append(1)
        return torch.zeros(2, 4, dtype=torch.long), torch.randn(6, 3), torch.rand(6)

    key = cache_key("model-x", 1, str(corpora[0]), 6, 4, "heldout")
    first = cached_activations(key, tmp_path, compute, log=lambda _: None)
    again = cached_activations(key, tmp_path, compute, log=lambda _: None)
    assert len(calls) == 1 and again.reused and not first.reused
    torch.testing.assert_close(again.acts, first.acts)
    torch.testing.assert_close(again.surprisal, first.surprisal)
    cached_activations({**key, "layer": 2}, tmp_path, compute, log=lambda _: None)
    assert len(calls) == 2


def test_splice_identity_scores_one_and_zero_ablation_scores_zero(llama, corpora):
    model, tokenizer = llama
    tokens = documents_to_sequences(tokenizer, corpus.read_documents(corpora[1]), 60, 16)
    scores = splice_scores(
        model,
        tokens,
        1,
        {
            "identity": lambda x: x,
            "zero": torch.zeros_like,
            "noise": lambda x: x + torch.randn_like(x),
        },
        progress=None,
    )
    assert scores["identity"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-5)
    assert scores["identity"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert scores["zero"]["ce_loss_score"] == pytest.approx(0.0, abs=1e-5)
    assert scores["noise"]["kl_div"] > 1e-4


@pytest.mark.slow
def test_compare_lm_cli_writes_table_json_and_pngs(tmp_path, llama_dir, corpora, capsys):
    from sae_adaptive_plugin.cli import main

    out = tmp_path / "out"
    args = ["compare", "--lm", "--model", str(llama_dir), "--layer", "1"]
    args += ["--text", str(corpora[0]), "--heldout-text", str(corpora[1])]
    args += ["--train-tokens", "1500", "--heldout-tokens", "600", "--ce-tokens", "150"]
    args += ["--context-size", "16", "--d-sae", "48", "--k", "4", "--topk-sweep", "2,4"]
    args += ["--steps", "12", "--batch-size", "64", "--threads", "1"]
    args += ["--architectures", "adaptivek,topk,hierarchical_topk"]
    args += ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    payload = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in payload["results"]]
    matched = payload["info"]["matched_k"]["adaptivek"]
    assert names[0] == "adaptivek" and f"topk@k={matched}" in names
    assert f"hierarchical_topk@k={matched}" in names
    assert {"topk@k=2", "topk@k=4", "hierarchical_topk@k=2", "hierarchical_topk@k=4"} <= set(names)
    for row in payload["results"]:
        for key in RESULT_KEYS:
            value = row[key]
            assert key in ("name", "architecture", "k_eval") or math.isfinite(value), (row, key)
        assert 0 <= row["dead_latents_train"] <= 48
    for png in ("k_per_token.png", "k_vs_surprisal.png", "ce_vs_l0.png"):
        assert (out / png).stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "| adaptivek |" in printed and "dead (train)" in printed


def test_gguf_file_loads_model_and_tokenizer_like_the_folder(gguf_file, llama):
    model, tokenizer = llama
    g_model, g_tokenizer = local_lm.hf_model_and_tokenizer(str(gguf_file))
    text = "the quick brown fox explains latents"
    ids = tokenizer(text)["input_ids"]
    assert g_tokenizer(text)["input_ids"] == ids
    assert g_tokenizer.bos_token_id == tokenizer.bos_token_id
    x = torch.tensor([[tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        torch.testing.assert_close(g_model(x).logits, model(x).logits)


@pytest.mark.slow
def test_train_and_eval_from_yaml_with_a_gguf_model(tmp_path, gguf_file, corpora, llama):
    import yaml

    from sae_adaptive_plugin.evaluation import evaluate_paths
    from sae_adaptive_plugin.training import train_from_yaml

    config = {
        "model_name": str(gguf_file),
        "hook_name": "model.layers.1",
        "dataset_path": str(corpora[0]),
        "is_dataset_tokenized": False,
        "streaming": False,
        "context_size": 16,
        "prepend_bos": False,
        "training_tokens": 640,
        "train_batch_size_tokens": 64,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 4,
        "n_batches_for_norm_estimate": 2,
        "output_path": str(tmp_path / "final"),
        "sae": {"architecture": "softsae", "d_in": LLAMA_D_MODEL, "d_sae": 32},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    result = train_from_yaml(path, overrides=["sae.k=4"])
    meta = json.loads((tmp_path / "final" / "cfg.json").read_text())["metadata"]
    assert meta["model_class_name"] == "AutoModelForCausalLM"
    assert meta["model_from_pretrained_kwargs"] == {}
    assert meta["hook_name"] == "model.layers.1"
    assert result.sae.cfg.architecture() == "softsae"
    # every other architecture trains from the same YAML (the GGUF model, loaded once here)
    proxy = local_lm.load_model(str(gguf_file), hook_names=["model.layers.1"])
    per_arch = {
        "adaptivek": ["sae.k=4", "sae.k_min=1", "sae.k_max=8", "sae.probe_warmup_steps=4"],
        "matryoshka_batchtopk": ["sae.k=4", "sae.matryoshka_widths=[8, 16, 32]"],
    }
    for arch in ("topk", "batchtopk", "matryoshka_batchtopk", "hierarchical_topk", "adaptivek"):
        sets = [
            f"sae.architecture={arch}",
            f"output_path={tmp_path / arch}",
            *per_arch.get(arch, ["sae.k=4"]),
        ]
        trained = train_from_yaml(path, overrides=sets, model=proxy)
        assert trained.sae.cfg.architecture() == arch
        assert (tmp_path / arch / "cfg.json").is_file()
    # eval reloads the GGUF model from the SAE's metadata and runs SAELens's run_evals
    metrics = evaluate_paths([str(tmp_path / "final")], n_batches=1, batch_size_prompts=4)
    row = metrics[str(tmp_path / "final")]
    assert 0 < row["sparsity"]["l0"] <= 32
    assert math.isfinite(row["model_performance_preservation"]["ce_loss_score"])
    # fit-probe / eval tokenisation of a HookedProxyLM: BOS + the tokenizer's ids
    _, tokenizer = llama
    ids = local_lm.texts_to_token_lists(proxy, ["the quick fox"], prepend_bos=True)[0]
    assert ids == [tokenizer.bos_token_id, *tokenizer("the quick fox")["input_ids"]]


@pytest.mark.slow
def test_compare_lm_with_seeds_reports_mean_and_std(tmp_path, llama_dir, corpora, capsys):
    from sae_adaptive_plugin.cli import main

    out = tmp_path / "out"
    args = ["compare", "--lm", "--model", str(llama_dir), "--layer", "1"]
    args += ["--text", str(corpora[0]), "--heldout-text", str(corpora[1])]
    args += ["--train-tokens", "1500", "--heldout-tokens", "600", "--ce-tokens", "150"]
    args += ["--context-size", "16", "--d-sae", "48", "--k", "4", "--topk-sweep", "4"]
    args += ["--steps", "12", "--batch-size", "64", "--threads", "1", "--seeds", "2"]
    args += ["--architectures", "softsae,topk", "--out", str(out)]
    args += ["--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["seeds"] == [0, 1] and len(payload["per_seed"]) == 2
    per_seed = {run["seed"]: {r["name"]: r for r in run["results"]} for run in payload["per_seed"]}
    merged = {r["name"]: r for r in payload["results"]}
    row = merged["topk@k=4"]
    evs = [per_seed[s]["topk@k=4"]["explained_variance"] for s in (0, 1)]
    assert evs[0] != evs[1]  # the seeds really differ
    assert row["n_seeds"] == 2
    assert math.isclose(row["explained_variance"], sum(evs) / 2, rel_tol=1e-9)
    assert math.isclose(row["explained_variance_std"], abs(evs[0] - evs[1]) / 2, rel_tol=1e-9)
    assert (out / "seed0" / "saes").is_dir() and (out / "seed1" / "saes").is_dir()
    # softsae against the TopK trained at its own rounded mean L0 in the same seed
    (paired,) = [r for r in payload["paired_differences"] if r["name"].startswith("softsae")]
    diffs = []
    for run in payload["per_seed"]:
        rows = {r["name"]: r for r in run["results"]}
        k = run["info"]["matched_k"]["softsae"]
        diffs.append(
            rows["softsae"]["explained_variance"] - rows[f"topk@k={k}"]["explained_variance"]
        )
    assert paired["n_seeds"] == 2
    assert math.isclose(paired["explained_variance"], sum(diffs) / 2, rel_tol=1e-9)
    assert "dead_latents_train" in paired
    printed = capsys.readouterr().out
    assert " ± " in printed and "softsae − topk at its L0" in printed


def test_dead_latents_counts_latents_that_fire_on_no_row():
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_adaptive_plugin.experiments.registry_saes import dead_latents

    sae = TopKSAE(TopKSAEConfig(d_in=16, d_sae=16, k=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(16))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    rows = torch.eye(16)[torch.arange(30) % 10]  # only latents 0..9 are ever the largest
    assert dead_latents(sae, rows, batch_size=7) == 6
    assert dead_latents(sae, torch.eye(16)) == 0


def test_dead_latent_sample_is_fixed_distinct_rows_of_the_training_cache():
    from sae_adaptive_plugin.experiments.lm_benchmark import DEAD_SAMPLE_TOKENS, dead_latent_sample

    small = torch.arange(300.0).unsqueeze(1)
    sample = dead_latent_sample(small)
    assert sorted(sample.squeeze(1).tolist()) == list(range(300))  # all rows, each once
    big = torch.arange(DEAD_SAMPLE_TOKENS + 500.0).unsqueeze(1)
    first, again = dead_latent_sample(big), dead_latent_sample(big)
    assert first.shape == (DEAD_SAMPLE_TOKENS, 1) and first.unique().numel() == DEAD_SAMPLE_TOKENS
    assert torch.equal(first, again)


def _single_seed_run(folder: Path, seed: int, ev_soft: float, ev_topk: float, k: int) -> None:
    rows = [
        {
            "name": "softsae",
            "architecture": "softsae",
            "k_eval": None,
            "explained_variance": ev_soft,
        },
        {"name": f"topk@k={k}", "architecture": "topk", "k_eval": k, "explained_variance": ev_topk},
    ]
    payload = {"config": {"seed": seed, "d_sae": 48}, "info": {"matched_k": {"softsae": k}}}
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(payload | {"results": rows}))


def test_merge_of_single_seed_runs_pairs_each_sae_with_its_seeds_topk(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "examples" / "merge_lm_seeds.py"
    _single_seed_run(tmp_path / "s0", 0, 0.80, 0.70, k=33)
    _single_seed_run(tmp_path / "s1", 1, 0.60, 0.70, k=35)  # another matched k in this seed
    out = tmp_path / "merged.json"
    cmd = [sys.executable, str(script), str(out), str(tmp_path / "s0"), str(tmp_path / "s1")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    merged = json.loads(out.read_text())
    assert merged["seeds"] == [0, 1] and merged["config"] == {"d_sae": 48}
    (paired,) = merged["paired_differences"]
    assert paired["name"] == "softsae − topk at its L0" and paired["n_seeds"] == 2
    assert math.isclose(paired["explained_variance"], 0.0, abs_tol=1e-12)  # +0.1 and −0.1
    assert math.isclose(paired["explained_variance_std"], 0.1, rel_tol=1e-9)
    soft = next(r for r in merged["results"] if r["name"] == "softsae")
    assert math.isclose(soft["explained_variance"], 0.70, rel_tol=1e-9)
    again = subprocess.run(cmd, capture_output=True, text=True)  # nothing is overwritten
    assert again.returncode == 2 and "exists" in again.stderr
