"""Offline stand-ins for a real SAELens training run: a tiny random HookedTransformer, a local token
dataset, and helpers that train an SAE through SAELens's own ``LanguageModelSAETrainingRunner``,
reload it in a fresh interpreter, and run SAELens's ``run_evals`` on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
import yaml

D_MODEL = 32
HOOK_NAME = "blocks.0.hook_resid_post"
CONTEXT_SIZE = 16
D_VOCAB = 100


def tiny_model(seed: int = 0):
    """A 1-layer HookedTransformer with random weights and no tokenizer (nothing downloaded)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=D_MODEL,
        n_ctx=CONTEXT_SIZE,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=D_VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    return HookedTransformer(cfg)


def tiny_token_dataset(n_rows: int = 256, seed: int = 0):
    """A local ``datasets.Dataset`` of random, already-tokenized rows of ``CONTEXT_SIZE`` tokens."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, D_VOCAB, (n_rows, CONTEXT_SIZE), generator=g)
    return Dataset.from_dict({"input_ids": tokens.tolist()})


def runner_config(sae_cfg: Any, out_dir: Path, **overrides: Any):
    """A ``LanguageModelSAERunnerConfig`` for the tiny model, no wandb, saving into ``out_dir``."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    kwargs: dict[str, Any] = dict(
        sae=sae_cfg,
        model_name="tiny-random",
        hook_name=HOOK_NAME,
        dataset_path="local-random-tokens",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT_SIZE,
        prepend_bos=False,
        training_tokens=64 * 40,
        train_batch_size_tokens=64,
        store_batch_size_prompts=8,
        n_batches_in_buffer=4,
        n_eval_batches=2,
        eval_batch_size_prompts=4,
        n_batches_for_norm_estimate=2,
        lr=1e-3,
        device="cpu",
        seed=0,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(out_dir / "checkpoints"),
        output_path=str(out_dir / "final"),
        verbose=False,
    )
    kwargs.update(overrides)
    return LanguageModelSAERunnerConfig(**kwargs)


def train_tiny_runner(sae_cfg: Any, out_dir: Path, model=None, dataset=None, **overrides: Any):
    """Train ``sae_cfg`` with SAELens's ``LanguageModelSAETrainingRunner`` on the tiny model.

    Returns ``(trained TrainingSAE, path of the saved inference SAE)``.
    """
    from sae_lens import LanguageModelSAETrainingRunner

    torch.manual_seed(0)
    cfg = runner_config(sae_cfg, Path(out_dir), **overrides)
    runner = LanguageModelSAETrainingRunner(
        cfg,
        override_model=model if model is not None else tiny_model(),
        override_dataset=dataset if dataset is not None else tiny_token_dataset(),
    )
    sae = runner.run()
    return sae, Path(cfg.output_path)


def tiny_activations(n: int = 64, seed: int = 1) -> torch.Tensor:
    """Real activations of the tiny model at ``HOOK_NAME``, shape ``[n, D_MODEL]``."""
    model = tiny_model()
    tokens = torch.tensor(tiny_token_dataset(n_rows=n // CONTEXT_SIZE + 1, seed=seed)["input_ids"])
    _, cache = model.run_with_cache(tokens, names_filter=HOOK_NAME)
    return cache[HOOK_NAME].reshape(-1, D_MODEL)[:n].detach()


_RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    import sae_lens  # the plugin must register itself: nothing else is imported
    from sae_lens import SAE
    path, x_path, out_path = sys.argv[1:4]
    sae = SAE.load_from_disk(path)
    x = load_file(x_path)["x"]
    with torch.no_grad():
        feats = sae.encode(x)
        out = sae(x)
    save_file({"feature_acts": feats.contiguous(), "sae_out": out.contiguous()}, out_path)
    print(json.dumps({"class": type(sae).__module__ + "." + type(sae).__qualname__}))
    """
)


def reload_outputs_in_subprocess(
    path: Path, x: torch.Tensor
) -> tuple[dict[str, torch.Tensor], str]:
    """Load the saved SAE at ``path`` with ``SAE.load_from_disk`` in a new interpreter (only
    ``sae_lens`` imported, so the plugin's autoload must register the architecture) and return its
    ``encode(x)`` / ``forward(x)`` plus the loaded class's qualified name.
    """
    from safetensors.torch import load_file, save_file

    path = Path(path)
    x_path = path.parent / f"{path.name}_reload_x.safetensors"
    out_path = path.parent / f"{path.name}_reload_out.safetensors"
    save_file({"x": x.contiguous()}, str(x_path))
    env = {k: v for k, v in os.environ.items() if k != "SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD"}
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(path), str(x_path), str(out_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(path.parent),
        timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(f"reload failed:\n{proc.stdout}\n{proc.stderr}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return load_file(str(out_path)), info["class"]


def run_evals_on(sae: Any, n_eval_batches: int = 2) -> dict[str, Any]:
    """SAELens ``run_evals`` on ``sae`` with the tiny model and dataset; returns its metrics dict."""
    from sae_lens import ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    model = tiny_model()
    store = ActivationsStore.from_sae(
        model,
        sae,
        context_size=CONTEXT_SIZE,
        dataset=tiny_token_dataset(),
        store_batch_size_prompts=4,
        n_batches_in_buffer=2,
        train_batch_size_tokens=64,
    )
    eval_cfg = EvalConfig(
        batch_size_prompts=4,
        n_eval_reconstruction_batches=n_eval_batches,
        n_eval_sparsity_variance_batches=n_eval_batches,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(
        sae=sae,
        activation_store=store,
        model=model,
        activation_scaler=ActivationScaler(),
        eval_config=eval_cfg,
        exclude_special_tokens=False,
    )
    return metrics


# ---- a tiny random-weight Llama as a Hugging Face folder (for the AutoModelForCausalLM path) ----

LLAMA_LAYERS = 3
LLAMA_D_MODEL = 32
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders read activations of a model "
    "and explain them with few latents; some tokens need many, others few. "
)


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences (no download), BOS/EOS defined."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TINY_TEXT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def tiny_llama_folder(path: Path, seed: int = 0) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` (3 layers, d_model 32) and its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLAMA_D_MODEL,
        intermediate_size=64,
        num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    path = Path(path)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_text_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    """A one-document-per-line text file of shuffled sentences."""
    import random

    rng = random.Random(seed)
    words = TINY_TEXT.split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n_docs)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary layout of q/k rows (transformers undoes it when it reads a GGUF)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def tiny_llama_gguf(hf_dir: Path, path: Path) -> Path:
    """Write the tiny Llama folder ``hf_dir`` as a float32 GGUF file with its BPE tokenizer."""
    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_dir))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    cfg = model.config
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = sorted(spec["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    specials = {tok.bos_token_id, tok.eos_token_id}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if i in specials else 1 for _, i in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = _permute_qk(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = _permute_qk(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", w.contiguous().numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# ---- the runs of `sae-adaptive train` in the tests

STEPS = 16
BATCH = 64


#: a small sae: block per architecture (fields of each architecture's training config).
SAE_BLOCKS = {
    "topk": {"k": 4},
    "hierarchical_topk": {"k": 8},
    # random-weight model: its activations carry no complexity a probe could learn
    "adaptivek": {"k": 4, "k_min": 2, "k_max": 8, "probe_warmup_steps": 6, "probe_min_r2": -1.0e9},
    "softsae": {
        "k": 4,
        "k_max": 8,
        "k_estimator_hidden": 16,
        "alpha_anneal_steps": 6,
        "k_anneal_steps": 2,
        "hard_topk_start_step": 12,
    },
}


def train_config(local: Path, out: Path, arch: str, **sae_extra) -> dict:
    """A ``sae-adaptive train`` YAML mapping: the ``local`` fixture's model and tokens, ``STEPS``
    steps of ``BATCH`` tokens, outputs under ``out``, the ``sae:`` block of ``arch``."""
    return {
        "model_name": str(local / "model"),
        "hook_name": HOOK_NAME,
        "dataset_path": str(local / "tokens"),
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT_SIZE,
        "prepend_bos": False,
        "training_tokens": BATCH * STEPS,
        "train_batch_size_tokens": BATCH,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 4,
        "lr": "1e-3",  # YAML 1.1 reads this as a string: the loader must accept it for a float
        "seed": 0,
        "verbose": False,
        "checkpoint_path": str(out / "checkpoints"),
        "output_path": str(out / "final"),
        "sae": {
            "architecture": arch,
            "d_in": D_MODEL,
            "d_sae": 64,
            **SAE_BLOCKS[arch],
            **sae_extra,
        },
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    """Write ``cfg`` as YAML to ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path
