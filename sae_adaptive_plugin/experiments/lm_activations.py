"""Activations of one decoder layer of a Hugging Face causal LM, cached on disk for the benchmark.

Text is cut into sequences of ``context_size`` tokens with a BOS token first. The training cache
runs only the first ``layer + 1`` blocks (the forward stops at the hook); the held-out cache runs
the full model and keeps each token's surprisal ``−log p(x_t | x_<t)`` beside its activation.
A cache file is keyed by model, layer, corpus fingerprint, token count, context and split, and
written as safetensors + JSON. :func:`splice_scores` splices an SAE's reconstruction into the
full model at every non-BOS position: CE-loss score ``(CE_zero − CE_sae) / (CE_zero − CE_clean)``
and KL(clean ‖ spliced).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CACHE_VERSION = 1


def hook_name(layer: int) -> str:
    """SAELens's ``HookedProxyLM`` hook name of a decoder layer's output (Llama-style models)."""
    return f"model.layers.{layer}"


def decoder_layers(hf_model: Any) -> Any:
    """The decoder blocks of a causal LM (``model.layers`` of Llama/Mistral/Qwen-style models)."""
    layers = getattr(getattr(hf_model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(hf_model).__name__}: no model.layers (not a Llama-style model)")
    return layers


def documents_to_sequences(
    tokenizer: Any, documents: list[str], n_tokens: int, context_size: int
) -> torch.Tensor:
    """``[n_seq, context_size]`` token ids: BOS + ``context_size − 1`` tokens of the documents'
    stream (documents separated by EOS), enough sequences for ``n_tokens`` non-BOS tokens."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = context_size - 1
    n_seq = math.ceil(n_tokens / body)
    needed = n_seq * body
    stream: list[int] = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream.extend([*ids, sep])
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(
            f"the corpus has {len(stream)} tokens; {needed} are needed "
            f"({n_tokens} tokens in sequences of {context_size}): use a bigger text or fewer tokens"
        )
    body_ids = torch.tensor(stream[:needed], dtype=torch.long).view(n_seq, body)
    return torch.cat([torch.full((n_seq, 1), bos, dtype=torch.long), body_ids], dim=1)


class _StopForward(Exception):
    pass


@torch.no_grad()
def layer_activations(
    hf_model: Any,
    tokens: torch.Tensor,
    layer: int,
    with_surprisal: bool,
    batch_size: int = 16,
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer ``layer``'s output for every non-BOS token, ``[n_seq·(ctx−1), d]``, and (full model
    only) each token's surprisal. Without surprisal the forward stops after ``layer``."""
    from tqdm.auto import tqdm

    device = next(hf_model.parameters()).device
    captured: list[torch.Tensor] = []

    def capture(module: Any, inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[:, 1:].float().cpu())
        if not with_surprisal:
            raise _StopForward

    handle = decoder_layers(hf_model)[layer].register_forward_hook(capture)
    surprisal = []
    try:
        for start in tqdm(
            range(0, tokens.shape[0], batch_size), desc=progress, disable=not progress
        ):
            batch = tokens[start : start + batch_size].to(device)
            try:
                logits = hf_model(batch).logits
            except _StopForward:
                continue
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"
            )
            surprisal.append(nll.cpu())
    finally:
        handle.remove()
    acts = torch.cat(captured).reshape(-1, captured[0].shape[-1])
    return acts, (torch.cat(surprisal).reshape(-1) if with_surprisal else None)


def _file_fingerprint(path: str) -> str:
    p = Path(path)
    if p.is_file():
        digest = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return f"{p.resolve()}:{digest.hexdigest()[:16]}"
    return str(path)  # a Hub name or a folder: the name is the key


def cache_key(model: str, layer: int, text: str, n_tokens: int, context_size: int, split: str):
    """The cache file's identity: what went in, hashed (model/text files by content)."""
    return {
        "version": CACHE_VERSION,
        "model": _file_fingerprint(model),
        "layer": layer,
        "text": _file_fingerprint(text),
        "n_tokens": n_tokens,
        "context_size": context_size,
        "split": split,
    }


@dataclass
class ActivationCache:
    """Cached tokens and layer activations of one corpus (``surprisal`` for the held-out one)."""

    tokens: torch.Tensor  # [n_seq, ctx]
    acts: torch.Tensor  # [n_seq·(ctx−1), d]; row order = sequence-major, positions 1..ctx−1
    surprisal: torch.Tensor | None
    path: Path
    reused: bool

    @property
    def positions(self) -> torch.Tensor:
        ctx = self.tokens.shape[1]
        return torch.arange(1, ctx).repeat(self.tokens.shape[0])


def cached_activations(
    key: dict[str, Any],
    cache_dir: Path,
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    log: Callable[[str], None] = print,
) -> ActivationCache:
    """Load the cache file for ``key`` or run ``compute() -> (tokens, acts, surprisal)`` and
    write it. The key is stored in the file's metadata and checked on load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    blob = json.dumps(key, sort_keys=True)
    path = (
        Path(cache_dir)
        / f"{key['split']}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"
    )
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get("key")
        if stored == blob:
            tensors = load_file(str(path))
            log(f"reusing activation cache {path}")
            return ActivationCache(
                tensors["tokens"], tensors["acts"], tensors.get("surprisal"), path, True
            )
        log(f"cache {path} has a different key; recomputing")
    tokens, acts, surprisal = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"tokens": tokens.contiguous(), "acts": acts.contiguous()}
    if surprisal is not None:
        tensors["surprisal"] = surprisal.contiguous()
    from sae_adaptive_plugin.outputs import replacing_file

    with replacing_file(path) as tmp:  # an interrupted write leaves no truncated cache
        save_file(tensors, str(tmp), metadata={"key": blob})
    log(f"wrote activation cache {path} ({acts.shape[0]} tokens × {acts.shape[1]})")
    return ActivationCache(tokens, acts, surprisal, path, False)


class CachedBatches(Iterator[torch.Tensor]):
    """Seeded shuffled batches over cached activations (a new permutation each epoch): two
    iterators with the same seed yield the same batches, so every SAE sees the same stream."""

    def __init__(self, acts: torch.Tensor, batch_size: int, seed: int, device: str) -> None:
        self.acts, self.batch_size, self.device = acts, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def __next__(self) -> torch.Tensor:
        if self._pos + self.batch_size > self._order.numel():
            self._order = torch.randperm(self.acts.shape[0], generator=self.generator)
            self._pos = 0
        index = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.acts[index].to(self.device)


def load_causal_lm(name: str, device: str) -> tuple[Any, Any]:
    """``(hf_model, tokenizer)`` for a ``.gguf`` file, a model folder or a Hub name."""
    from sae_adaptive_plugin.data.local_lm import hf_model_and_tokenizer

    model, tokenizer = hf_model_and_tokenizer(name, device=device)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def splice_scores(
    hf_model: Any,
    tokens: torch.Tensor,
    layer: int,
    saes: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    batch_size: int = 8,
    progress: str | None = "CE/KL splice",
) -> dict[str, dict[str, float]]:
    """CE loss, CE-loss score and KL(clean ‖ spliced) of each SAE's reconstruction spliced into
    layer ``layer``'s output at every non-BOS position (BOS keeps its own activation).

    ``saes`` maps a name to ``x -> x̂``. Per batch: one clean and one zero-ablated forward, then
    one spliced forward per SAE. Losses average next-token predictions from positions 1..ctx−2.
    """
    from tqdm.auto import tqdm

    device = next(hf_model.parameters()).device
    replace: list[Callable[[torch.Tensor], torch.Tensor] | None] = [None]

    def splice(module: Any, inputs: Any, output: Any) -> Any:
        if replace[0] is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        body = hidden[:, 1:]
        new[:, 1:] = replace[0](body.reshape(-1, body.shape[-1])).reshape(body.shape).to(new.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def run(batch: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None):
        replace[0] = fn
        logp = hf_model(batch).logits[:, 1:-1].float().log_softmax(-1)
        ce = -logp.gather(-1, batch[:, 2:, None])[..., 0]
        return logp, ce

    sums: dict[str, dict[str, float]] = {
        n: {"ce": 0.0, "kl": 0.0} for n in ["clean", "zero", *saes]
    }
    count = 0
    handle = decoder_layers(hf_model)[layer].register_forward_hook(splice)
    try:
        for start in tqdm(
            range(0, tokens.shape[0], batch_size), desc=progress, disable=not progress
        ):
            batch = tokens[start : start + batch_size].to(device)
            clean_logp, clean_ce = run(batch, None)
            sums["clean"]["ce"] += float(clean_ce.sum())
            count += clean_ce.numel()
            for name, fn in [("zero", torch.zeros_like), *saes.items()]:
                logp, ce = run(batch, fn)
                sums[name]["ce"] += float(ce.sum())
                kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
                sums[name]["kl"] += float(kl.sum())
    finally:
        handle.remove()
    ce_clean = sums["clean"]["ce"] / count
    ce_zero = sums["zero"]["ce"] / count
    out = {"clean": {"ce_loss": ce_clean}, "zero": {"ce_loss": ce_zero}}
    for name in saes:
        ce = sums[name]["ce"] / count
        out[name] = {
            "ce_loss": ce,
            "ce_loss_score": (ce_zero - ce) / (ce_zero - ce_clean),
            "kl_div": sums[name]["kl"] / count,
        }
    return out
