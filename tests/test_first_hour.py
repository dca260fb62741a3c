"""The first hour of a new user: each plausible mistake is refused before training with a message
naming the field, and the L0 that ``train`` prints and records is the saved SAE's own.

Runs ``sae-adaptive train`` in-process on the tiny local model of ``tests/tiny_lm.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_lm import BATCH, D_MODEL, HOOK_NAME, tiny_model, train_config, write_yaml

from sae_adaptive_plugin.cli import main

# ------------------------------------------------------------------------------------------------
# configs that defeat adaptivity, missing k, non-integer sizes
# ------------------------------------------------------------------------------------------------


def _training_config(arch: str, **fields):
    from sae_lens.registry import get_sae_training_class

    return get_sae_training_class(arch)[1](**{"d_in": 16, "d_sae": 64, **fields})


@pytest.mark.parametrize(
    ("arch", "fields", "message"),
    [
        ("adaptivek", {"k": 8, "k_max": 4}, "k=8 must lie in [k_min=1, k_max=4]"),
        ("adaptivek", {"k": 8, "k_min": 16}, "k=8 must lie in [k_min=16, k_max=32]"),
        ("softsae", {"k": 10, "k_max": 8}, "k=10 must lie in [1, k_max=8]"),
        ("adaptivek", {}, "adaptivek: k is not set"),
        ("softsae", {}, "softsae: k is not set"),
        ("adaptivek", {"k": 4, "d_sae": 256.5}, "d_sae must be an integer in [1, inf), got 256.5"),
        ("softsae", {"k": 4, "d_sae": 256.5}, "d_sae must be an integer in [1, inf), got 256.5"),
        ("hierarchical_topk", {"k": 4, "d_in": 7.5}, "d_in must be an integer in [1, inf)"),
        ("adaptivek", {"k": 4.5}, "k must be an integer in [1, d_sae=64], got 4.5"),
        ("softsae", {"k": 4, "k_max": 8.5}, "k_max must be an integer in [1, d_sae=64]"),
        ("adaptivek", {"k": 4, "k_min": 1.5}, "k_min must be an integer in [1, k_max=16]"),
        ("hierarchical_topk", {"k": 65}, "k=65 must lie in [1, d_sae=64]"),
    ],
)
def test_configs_refuse_what_defeats_them_naming_the_field(arch, fields, message):
    with pytest.raises(ValueError) as info:
        _training_config(arch, **fields)
    assert message in str(info.value)


def test_k_errors_say_what_to_do():
    with pytest.raises(ValueError, match="nothing adaptive is left; set k inside"):
        _training_config("adaptivek", k=8, k_max=4)
    with pytest.raises(ValueError, match=r"raise k_max .* or leave it unset"):
        _training_config("softsae", k=10, k_max=8)
    with pytest.raises(ValueError, match=r"target mean number of active latents .* k=32"):
        _training_config("softsae")


@pytest.mark.parametrize("arch", ["adaptivek", "softsae", "hierarchical_topk"])
def test_integral_float_sizes_are_taken_as_ints(arch):
    from sae_lens.registry import get_sae_training_class

    cfg = _training_config(arch, d_in=16.0, d_sae=256.0, k=4.0)
    assert (cfg.d_in, cfg.d_sae, cfg.k) == (16, 256, 4)
    assert all(type(v) is int for v in (cfg.d_in, cfg.d_sae, cfg.k))
    sae = get_sae_training_class(arch)[0](cfg)  # torch.empty(16, 256.0) would raise TypeError
    assert sae.W_enc.shape == (16, 256)


def test_hierarchical_topk_keeps_sae_lens_default_k():
    assert _training_config("hierarchical_topk", d_sae=256).k == 100


def test_one_step_softsae_run_says_it_is_too_short():
    cfg = _training_config("softsae", k=4)
    with pytest.raises(ValueError) as info:
        cfg.schedule(1)
    text = str(info.value)
    assert "too short" in text and "training_tokens" in text
    assert "[1, 0]" not in text


# ------------------------------------------------------------------------------------------------
# train: checks before the first step, --print-config
# ------------------------------------------------------------------------------------------------


def _yaml(tmp_path: Path, local: Path, arch: str, **sae_extra) -> Path:
    return write_yaml(tmp_path / "c.yaml", train_config(local, tmp_path, arch, **sae_extra))


@pytest.mark.parametrize(
    ("override", "parts"),
    [
        ("sae.d_in=48", ["config key 'sae.d_in'", "d_in=48", f"are {D_MODEL} wide"]),
        (
            "hook_name=blocks.9.hook_resid_post",
            ["config key 'hook_name'", "'blocks.9.hook_resid_post'", "nearest", HOOK_NAME],
        ),
    ],
)
def test_train_checks_hook_and_width_before_the_first_step(
    override, parts, tmp_path, local, capsys
):
    from sae_lens.training.sae_trainer import SAETrainer

    steps = []
    original = SAETrainer.step
    try:
        SAETrainer.step = lambda self, batch: steps.append(1) or original(self, batch)
        rc = main(["train", str(_yaml(tmp_path, local, "topk")), "--set", override])
    finally:
        SAETrainer.step = original
    err = capsys.readouterr().err
    assert rc == 2
    for part in parts:
        assert part in err
    assert "Traceback" not in err and not steps
    assert not (tmp_path / "final").exists()


def test_eval_checks_the_sae_width_against_the_model(tmp_path, local, capsys):
    """An SAE of width 48 evaluated on the tiny model (width 32): refused before any batch."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    sae = TopKSAE(TopKSAEConfig(d_in=48, d_sae=64, k=4))
    sae.cfg.metadata.hook_name = HOOK_NAME
    sae.cfg.metadata.model_name = str(local / "model")
    sae.cfg.metadata.dataset_path = str(local / "tokens")
    sae.cfg.metadata.context_size = 16
    sae.save_model(tmp_path / "wide")
    assert main(["eval", str(tmp_path / "wide"), "--n-batches", "1"]) == 2
    err = capsys.readouterr().err
    assert "the SAE's d_in: d_in=48" in err and f"are {D_MODEL} wide" in err and "--model" in err


def test_compare_lm_names_the_nearest_hook_for_a_missing_layer(tmp_path, capsys):
    from tiny_lm import LLAMA_LAYERS, tiny_llama_folder, write_text_corpus

    model = tiny_llama_folder(tmp_path / "llama")
    text = write_text_corpus(tmp_path / "t.txt", 4, seed=0)
    args = ["compare", "--lm", "--model", str(model), "--layer", str(LLAMA_LAYERS + 3)]
    args += ["--text", str(text), "--heldout-text", str(text), "--out", str(tmp_path / "o")]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert f"'model.layers.{LLAMA_LAYERS + 3}' is not a hook point" in err
    assert f"nearest: 'model.layers.{LLAMA_LAYERS - 1}'" in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("arch", "overrides", "message"),
    [
        ("softsae", ["training_tokens=64"], "the run is too short (1 training step(s))"),
        ("softsae", ["sae.hard_topk_start_step=40"], "hard_topk_start_step=40 is at or after"),
        ("adaptivek", ["sae.probe_warmup_steps=16"], "probe_warmup_steps=16 is at or after"),
        ("adaptivek", ["sae.k=9"], "k=9 must lie in [k_min=2, k_max=8]"),
    ],
)
def test_print_config_runs_the_machine_independent_checks(
    arch, overrides, message, tmp_path, local, capsys
):
    sets = [x for o in overrides for x in ("--set", o)]
    assert main(["train", str(_yaml(tmp_path, local, arch)), *sets, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err and "[1, 0]" not in err


def test_print_config_warns_about_an_unavailable_device(tmp_path, local, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _yaml(tmp_path, local, "softsae")
    assert main(["train", str(cfg), "--set", "device=cuda", "--print-config"]) == 0
    out = capsys.readouterr()
    assert "warning: config key 'device'" in out.err and "not available" in out.err
    assert json.loads(out.out)["device"] == "cuda"
    assert main(["train", str(cfg), "--set", "device=cuda"]) == 2  # train itself refuses it


# ------------------------------------------------------------------------------------------------
# the L0 train prints, records and push publishes
# ------------------------------------------------------------------------------------------------


def _saved_sae_l0(path: Path) -> float:
    """An independent measurement: the reloaded SAE on the tiny model's activations over the
    local token dataset (the stream the SAE was trained on)."""
    from datasets import load_from_disk
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(path))
    tokens = torch.tensor(load_from_disk(str(path.parent.parent / "tokens"))["input_ids"])
    _, cache = tiny_model().run_with_cache(tokens, names_filter=HOOK_NAME)
    with torch.no_grad():
        return float(
            (sae.encode(cache[HOOK_NAME].reshape(-1, D_MODEL)) != 0).sum(-1).float().mean()
        )


def test_train_records_and_prints_the_saved_sae_l0(tmp_path, local, capsys, caplog):
    import shutil

    shutil.copytree(local / "tokens", tmp_path / "tokens")
    cfg = train_config(local, tmp_path / "run", "adaptivek", k=2, k_min=1, k_max=16)
    cfg["dataset_path"] = str(tmp_path / "tokens")
    with caplog.at_level(logging.WARNING, logger="sae_lens"):
        assert main(["train", str(write_yaml(tmp_path / "ak.yaml", cfg))]) == 0
    printed = capsys.readouterr().out
    # the config names the local model folder: SAELens's "not reproducible" warning is untrue
    assert "will override the one specified in your configuration" not in caplog.text
    meta = json.loads((tmp_path / "run" / "final" / "cfg.json").read_text())["metadata"]
    independent = _saved_sae_l0(tmp_path / "run" / "final")
    window = meta["l0_training_window"]  # includes the warm-up at k_max = 16
    assert meta["l0_heldout_tokens"] == 4 * BATCH
    assert meta["l0"] == pytest.approx(independent, abs=0.15 * abs(window - independent))
    assert abs(window - meta["l0"]) > 1.0
    assert f"L0 of the saved SAE: {meta['l0']:.3f}" in printed
    assert f"training-window mean L0: {window:.3f}" in printed


def test_model_card_never_publishes_a_window_l0_as_the_sae_l0():
    from sae_adaptive_plugin.hub.model_card import training_summary

    window_only = {"d_in": 4, "d_sae": 8, "metadata": {"l0": 13.64}}  # SAELens's own record
    summary = training_summary(window_only)
    assert summary["l0"] is None
    assert summary["l0_training_window"] == pytest.approx(13.64)
    measured = {
        "d_in": 4,
        "d_sae": 8,
        "metadata": {"l0": 7.63, "l0_heldout_tokens": 256, "l0_training_window": 13.64},
    }
    summary = training_summary(measured)
    assert summary["l0"] == pytest.approx(7.63) and "256 held-out tokens" in summary["l0_source"]
    assert summary["l0_training_window"] == pytest.approx(13.64)


# ------------------------------------------------------------------------------------------------
# the trainer hook fails loudly when SAELens's SAETrainer changes
# ------------------------------------------------------------------------------------------------


def test_trainer_hook_names_the_sae_lens_version_when_sae_trainer_changes(monkeypatch):
    from importlib import metadata

    from sae_lens.training import sae_trainer

    from sae_adaptive_plugin.saes import run_length

    class ChangedTrainer:  # a future SAETrainer that keeps its SAE under another name
        def __init__(self, model, config):
            self.model, self.config = model, config

    monkeypatch.setattr(sae_trainer, "SAETrainer", ChangedTrainer)
    run_length.install_trainer_hook()
    sae = _training_config_sae("softsae")
    with pytest.raises(RuntimeError) as info:
        ChangedTrainer(model=sae, config=None)
    text = str(info.value)
    assert f"SAELens {metadata.version('sae-lens')}" in text and "SAETrainer" in text
    assert "bind_run_length" in text


def _training_config_sae(arch: str):
    from sae_lens.registry import get_sae_training_class

    return get_sae_training_class(arch)[0](_training_config(arch, k=4))


# ------------------------------------------------------------------------------------------------
# bench: the output is the bench's
# ------------------------------------------------------------------------------------------------


def test_bench_prints_no_training_warnings_and_no_profiler_lines(tmp_path, capfd):
    import warnings

    args = ["bench", "--d-in", "16", "--d-sae", "64", "--k", "4", "--batch", "32"]
    args += ["--steps", "2", "--warmup", "1", "--threads", "1", "--no-progress"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--rows", "topk", "softsae_hard"]) == 0
    out, err = capfd.readouterr()
    assert "USDT" not in out + err
    assert not [w for w in caught if "k̂" in str(w.message) or "softsae" in str(w.message)]
    assert "| softsae" in out


# ------------------------------------------------------------------------------------------------
# help texts
# ------------------------------------------------------------------------------------------------


def _subparsers():
    import argparse

    from sae_adaptive_plugin.cli.main import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_flag_says_what_it_does_and_shows_its_default():
    for name, parser in _subparsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = f"{name} {action.option_strings[0]}"
            assert action.help and len(action.help) > 8, flag
            shown = formatter._get_help_string(action)
            switch_or_unset = action.nargs == 0 or action.default in (None, [])
            assert switch_or_unset or "default" in shown, flag


def test_help_texts_match_the_code():
    parsers = _subparsers()
    compare_k = next(a for a in parsers["compare"]._actions if "--k" in a.option_strings).help
    assert "adaptivek" in compare_k and "softsae" in compare_k and "(default 32)" in compare_k
    resume = next(a for a in parsers["train"]._actions if "--resume" in a.option_strings).help
    assert "<n_tokens>" in resume and "<n_samples>" not in resume
    fit_probe_help = " ".join(parsers["fit-probe"].format_help().split())
    assert "seed of the folds (default 0)" in fit_probe_help
    assert "--labels {column,surprisal,kstar} what the probe learns" in fit_probe_help
