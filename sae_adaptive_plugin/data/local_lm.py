"""Where a language model and a dataset come from: local folders/files, or the Hub through SAELens.

A name that is not a local path goes through SAELens's own loading unchanged. Local models are a
folder written by :func:`save_local_model` (``hooked_transformer.json`` + ``model.safetensors`` +
an optional ``tokenizer/``), a ``.gguf`` file or a Hugging Face model folder (SAELens's
``HookedProxyLM``, hook names such as ``model.layers.6``); local datasets a ``save_to_disk``
folder, a ``.parquet``/``.jsonl``/``.json``/``.csv`` file or a text corpus as a ``text`` column.
The formats are described in ``docs/training.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_CONFIG_FILENAME = "hooked_transformer.json"
MODEL_WEIGHTS_FILENAME = "model.safetensors"
TOKENIZER_DIRNAME = "tokenizer"
MODEL_FORMAT = "sae-adaptive-hooked-transformer"
MODEL_FORMAT_VERSION = 1

_FILE_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
}


def save_local_model(model: Any, path: str | Path) -> Path:
    """Write ``model`` (a ``HookedTransformer``) in the local model format; returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(model.cfg.to_dict())  # to_dict() returns the live __dict__: copy before editing
    cfg["dtype"] = str(cfg["dtype"]).removeprefix("torch.")
    cfg["device"] = None
    payload = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "config": cfg}
    (path / MODEL_CONFIG_FILENAME).write_text(json.dumps(payload, indent=2, default=str))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / MODEL_WEIGHTS_FILENAME))
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path / TOKENIZER_DIRNAME))
    return path


def is_local_model(name: str | Path) -> bool:
    """Whether ``name`` is a folder in the local model format."""
    return (Path(name) / MODEL_CONFIG_FILENAME).is_file()


def load_local_model(path: str | Path, device: str = "cpu") -> Any:
    """Load a ``HookedTransformer`` saved by :func:`save_local_model`."""
    import dataclasses

    import torch
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    path = Path(path)
    payload = json.loads((path / MODEL_CONFIG_FILENAME).read_text())
    if payload.get("format") != MODEL_FORMAT:
        raise ValueError(
            f"{path / MODEL_CONFIG_FILENAME}: 'format' is {payload.get('format')!r}, "
            f"expected {MODEL_FORMAT!r}"
        )
    init_fields = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    cfg = {k: v for k, v in payload["config"].items() if k in init_fields}
    dtype_name = cfg.get("dtype", "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path / MODEL_CONFIG_FILENAME}: unknown dtype {dtype_name!r}")
    cfg["dtype"] = dtype
    cfg["device"] = device
    tokenizer = None
    if (path / TOKENIZER_DIRNAME).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIRNAME))
    model = HookedTransformer(HookedTransformerConfig(**cfg), tokenizer=tokenizer)
    model.load_state_dict(load_file(str(path / MODEL_WEIGHTS_FILENAME), device=str(device)))
    model.to(device)
    model.eval()
    return model


def is_gguf_file(name: str | Path) -> bool:
    """Whether ``name`` is a GGUF model file."""
    return str(name).lower().endswith(".gguf") and Path(name).is_file()


def is_hf_folder(name: str | Path) -> bool:
    """Whether ``name`` is a Hugging Face model folder (``config.json`` or a ``.gguf`` inside)."""
    p = Path(name)
    return p.is_dir() and ((p / "config.json").is_file() or any(p.glob("*.gguf")))


def uses_hf_causal_lm(name: str, model_from_pretrained_kwargs: dict[str, Any] | None) -> bool:
    """Whether ``name`` can only be SAELens's ``AutoModelForCausalLM`` path (a GGUF file, an HF
    folder, or ``gguf_file`` in the kwargs); Hub names need ``model_class_name`` said explicitly."""
    return (
        is_gguf_file(name)
        or (is_hf_folder(name) and not is_local_model(name))
        or "gguf_file" in (model_from_pretrained_kwargs or {})
    )


def hf_pretrained_args(
    name: str, model_from_pretrained_kwargs: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """``(name_or_folder, kwargs)`` for ``from_pretrained``: a ``.gguf`` file becomes its folder
    plus ``gguf_file``; a folder holding exactly one ``.gguf`` and no ``config.json`` gets it."""
    kwargs = dict(model_from_pretrained_kwargs or {})
    p = Path(name)
    if is_gguf_file(p):
        if kwargs.get("gguf_file", p.name) != p.name:
            raise ValueError(
                f"model_name {name} is a GGUF file but model_from_pretrained_kwargs.gguf_file "
                f"is {kwargs['gguf_file']!r}"
            )
        kwargs["gguf_file"] = p.name
        return str(p.parent), kwargs
    if p.is_dir() and not (p / "config.json").is_file() and "gguf_file" not in kwargs:
        ggufs = sorted(q.name for q in p.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ValueError(
                f"model folder {p}: no config.json and {len(ggufs)} .gguf files {ggufs}; name "
                "the file (model_name: path/to/file.gguf)"
            )
        kwargs["gguf_file"] = ggufs[0]
    return str(name), kwargs


def hf_model_and_tokenizer(
    name: str, device: str = "cpu", model_from_pretrained_kwargs: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` and its tokenizer, both with ``gguf_file`` when there is one
    (SAELens's own loader reads the tokenizer without it, which fails for a GGUF-only folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = hf_pretrained_args(name, model_from_pretrained_kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if kwargs.get("device_map") is None:
        model = model.to(device)
    tokenizer_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    return model, tokenizer


def load_model(
    name: str,
    device: str = "cpu",
    model_class_name: str = "HookedTransformer",
    model_from_pretrained_kwargs: dict[str, Any] | None = None,
    hook_names: list[str] | None = None,
) -> Any:
    """A local-format folder; a GGUF file or HF folder as SAELens's ``HookedProxyLM`` (hook names
    are module names, e.g. ``model.layers.6``); else SAELens's own ``load_model`` (Hub names,
    with ``model_class_name="AutoModelForCausalLM"`` for non-TransformerLens models)."""
    if is_local_model(name):
        return load_local_model(name, device=device)
    if model_class_name == "AutoModelForCausalLM" or uses_hf_causal_lm(
        name, model_from_pretrained_kwargs
    ):
        from sae_lens.load_model import HookedProxyLM

        model, tokenizer = hf_model_and_tokenizer(name, device, model_from_pretrained_kwargs)
        return HookedProxyLM(model, tokenizer, hook_names=hook_names)
    from sae_lens.load_model import load_model as sae_lens_load_model

    kwargs = model_from_pretrained_kwargs
    if kwargs is None and model_class_name == "HookedTransformer":
        kwargs = {"center_writing_weights": False}  # SAELens's runner default
    return sae_lens_load_model(
        model_class_name,
        name,
        device=device,
        model_from_pretrained_kwargs=kwargs,
        hook_names=hook_names,
    )


_CORPUS_SUFFIXES = (".txt", ".cor", ".bz2")


def is_local_dataset(name: str | Path) -> bool:
    """Whether ``name`` is a ``save_to_disk`` folder, a parquet/jsonl/json/csv file, or a text
    corpus (``.txt``/``.cor``/``.bz2``, read by :func:`sae_adaptive_plugin.data.corpus.read_documents`
    into a ``text`` column)."""
    p = Path(name)
    if p.is_file() and p.suffix.lower() in _CORPUS_SUFFIXES:
        return True
    if p.is_dir():
        return any(
            (p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
        )
    return p.is_file() and p.suffix.lower() in _FILE_BUILDERS


def load_local_dataset(path: str | Path, split: str = "train") -> Any:
    """Load a local dataset (see the module docstring) as a ``datasets.Dataset``."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    p = Path(path)
    if p.is_dir():
        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {p}: no split {split!r}; available splits: {sorted(ds)}")
            ds = ds[split]
        return _non_empty(ds, p)
    if p.is_file() and p.suffix.lower() in _CORPUS_SUFFIXES:
        from datasets import Dataset

        from sae_adaptive_plugin.data.corpus import read_documents

        return _non_empty(Dataset.from_dict({"text": read_documents(p)}), p)
    builder = _FILE_BUILDERS.get(p.suffix.lower())
    if builder is None or not p.is_file():
        raise ValueError(
            f"dataset {p}: not a save_to_disk folder or a file ending in "
            f"{', '.join(sorted(_FILE_BUILDERS))}"
        )
    if p.stat().st_size == 0:
        raise ValueError(f"dataset {p}: the file is empty (it has no rows)")
    try:
        ds = load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:  # datasets wraps a reader's error without naming the file
        cause = e.__cause__ or e
        raise ValueError(
            f"dataset {p}: could not be read as {builder} ({type(cause).__name__}: {cause})"
        ) from e
    return _non_empty(ds, p)


def _non_empty(ds: Any, path: Path) -> Any:
    if len(ds) == 0:
        raise ValueError(f"dataset {path}: it has no rows")
    return ds


def load_dataset_any(name: str, split: str = "train", streaming: bool = False) -> Any:
    """A local dataset, or ``datasets.load_dataset(name, split=split)`` for a Hub name."""
    if is_local_dataset(name):
        return load_local_dataset(name, split=split)
    from datasets import load_dataset

    return load_dataset(name, split=split, streaming=streaming)


def model_limits(model: Any) -> tuple[int, int, bool]:
    """``(d_vocab, n_ctx, default prepend_bos)`` of a ``HookedTransformer`` or ``HookedProxyLM``."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return int(cfg.d_vocab), int(cfg.n_ctx), bool(getattr(cfg, "default_prepend_bos", True))
    hf_cfg = model.model.config  # HookedProxyLM wraps a transformers model
    n_ctx = int(getattr(hf_cfg, "max_position_embeddings", 2048))
    has_bos = getattr(model.tokenizer, "bos_token_id", None) is not None
    return int(hf_cfg.vocab_size), n_ctx, has_bos


def texts_to_token_lists(model: Any, texts: list[Any], prepend_bos: bool) -> list[list[int]]:
    """Token ids for each text.

    A text that is already a list of ints is used as is. A string goes through
    ``model.to_tokens`` (the model's own tokenizer: the path for every real model). Only when the
    model has **no tokenizer** (the tokenizer-less local test models) is a string encoded with the
    byte-level fallback: its UTF-8 bytes, each taken modulo ``d_vocab`` (plus ``bos`` = 0 first when
    ``prepend_bos``). That fallback is for offline tests, not for real analysis.
    """
    out: list[list[int]] = []
    tokenizer = getattr(model, "tokenizer", None)
    d_vocab = model_limits(model)[0]
    proxy = getattr(model, "cfg", None) is None  # HookedProxyLM: its to_tokens takes no options
    for text in texts:
        if isinstance(text, (list, tuple)) or hasattr(text, "tolist"):
            ids = [int(t) for t in (text.tolist() if hasattr(text, "tolist") else text)]
        elif not isinstance(text, str):
            raise ValueError(f"text column: expected a string or a list of token ids, got {text!r}")
        elif proxy:
            bos = (
                [tokenizer.bos_token_id]
                if prepend_bos and tokenizer.bos_token_id is not None
                else []
            )
            ids = bos + list(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif tokenizer is not None:
            ids = model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)[0].tolist()
        else:
            ids = ([0] if prepend_bos else []) + [b % d_vocab for b in text.encode("utf-8")]
        if not ids:
            raise ValueError(f"text {text!r} has no tokens")
        bad = [t for t in ids if not 0 <= t < d_vocab]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the model's vocabulary [0, {d_vocab})"
            )
        out.append(ids)
    return out
