"""``sae-adaptive train`` / ``eval`` / ``fit-probe`` end to end on a tiny local model, offline.

A tiny random HookedTransformer is saved in the local model format, a token dataset with
``save_to_disk``; each architecture trains from a YAML file through the command, one run resumes
from a SAELens checkpoint, ``eval`` reports SAELens's metrics and the per-token k distribution,
``fit-probe`` fits a probe from a local labelled jsonl file and AdaptiveK trains with it. The
Hub-name path (SAELens's own ``load_model`` and ``datasets.load_dataset``) runs with a stand-in
model loader and a local data-files folder. Commands run in-process through ``cli.main``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import (
    BATCH,
    CONTEXT_SIZE,
    D_MODEL,
    HOOK_NAME,
    SAE_BLOCKS,
    STEPS,
    tiny_model,
    tiny_token_dataset,
    train_config,
    write_yaml,
)

from sae_adaptive_plugin.cli import main
from sae_adaptive_plugin.registration.plugin import PACKAGE_ARCHITECTURES


def _train(tmp_path: Path, local: Path, arch: str, *extra: str, **sae_extra) -> Path:
    cfg_path = write_yaml(
        tmp_path / f"{arch}.yaml", train_config(local, tmp_path / arch, arch, **sae_extra)
    )
    assert main(["train", str(cfg_path), *extra]) == 0
    return tmp_path / arch / "final"


@pytest.mark.parametrize("arch", PACKAGE_ARCHITECTURES)
def test_train_each_architecture_from_yaml(arch, tmp_path, local):
    from sae_lens import SAE

    out = _train(tmp_path, local, arch)
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.architecture() == arch
    assert sae.cfg.metadata.model_name == str(local / "model")
    assert sae.cfg.metadata.hook_name == HOOK_NAME
    runner_cfg = json.loads((out / "runner_cfg.json").read_text())
    assert runner_cfg["training_tokens"] == BATCH * STEPS
    assert runner_cfg["lr"] == pytest.approx(1e-3)
    x = torch.randn(8, D_MODEL)
    with torch.no_grad():
        feats = sae.encode(x)
        recon = sae.decode(feats)
    assert recon.shape == x.shape and torch.isfinite(recon).all()
    assert ((feats != 0).sum(-1) >= 1).all()
    # each of our SAEs reports the k it uses per row; the active latents never exceed it
    k = sae.k_per_sample(x)
    assert k.shape == (8,)
    assert ((feats != 0).sum(-1) <= k).all()
    if arch == "adaptivek":  # the warm-up (6 of 16 steps) fitted the probe inside SAELens's runner
        assert float(load_file(str(out / "sae_weights.safetensors"))["probe_fitted"]) == 1.0


def test_resume_from_checkpoint(tmp_path, local):
    """Resume restores weights + trainer state: a resume whose budget ends at the checkpoint
    reproduces the checkpoint's weights exactly; a longer one continues from there."""
    from sae_adaptive_plugin.training import train_from_yaml

    arch = "hierarchical_topk"
    # no decoder-norm folding at save, so saved weights compare directly with the checkpoint's
    _train(tmp_path, local, arch, "--set", "n_checkpoints=1", rescale_acts_by_decoder_norm=False)
    (ckpt,) = [p for p in (tmp_path / arch / "checkpoints").glob("*/*") if p.is_dir()]
    n = int(ckpt.name)
    assert 0 < n < BATCH * STEPS
    ckpt_w = load_file(str(ckpt / "sae_weights.safetensors"))

    # CLI, config read back from the checkpoint's runner_cfg.json, budget ending at the checkpoint
    same = tmp_path / "resumed_same"
    rc = main(
        [
            "train",
            "--resume",
            str(ckpt),
            "--set",
            f"training_tokens={n}",
            "--set",
            f"output_path={same}",
            "--set",
            "n_checkpoints=0",
        ]
    )
    assert rc == 0
    same_w = load_file(str(same / "sae_weights.safetensors"))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(same_w[name], ckpt_w[name], rtol=0, atol=0)

    # Python API with the YAML: continues to the full budget from the checkpoint
    more = tmp_path / "resumed_more"
    result = train_from_yaml(
        tmp_path / f"{arch}.yaml",
        overrides=[f"output_path={more}", "n_checkpoints=0"],
        resume=str(ckpt),
    )
    assert result.start_samples == n
    assert result.total_samples == BATCH * STEPS
    more_w = load_file(str(more / "sae_weights.safetensors"))
    assert not torch.equal(more_w["W_enc"], ckpt_w["W_enc"])


def test_fit_probe_then_adaptivek_then_eval(tmp_path, local, capsys):
    """fit-probe from a local labelled file → AdaptiveK trained with that probe → eval of it and
    a TopK baseline: SAELens metrics + per-token k distribution, table and JSON."""
    from sae_lens import SAE

    from sae_adaptive_plugin.probe import ComplexityProbe

    probe_path = tmp_path / "probe.safetensors"
    rc = main(
        [
            "fit-probe",
            "--model",
            str(local / "model"),
            "--hook",
            HOOK_NAME,
            "--dataset",
            str(local / "labelled.jsonl"),
            "--out",
            str(probe_path),
            "--json",
            str(tmp_path / "probe.json"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "R²" in printed and "Pearson" in printed and "Spearman" in printed
    probe = ComplexityProbe.load(probe_path)
    scores = [
        json.loads(line)["score"] for line in (local / "labelled.jsonl").read_text().splitlines()
    ]
    assert probe.d_in == D_MODEL
    assert probe.report.n_samples == len(scores)  # one row (the last token) per text
    assert probe.label_min == pytest.approx(min(scores))
    assert probe.label_max == pytest.approx(max(scores))
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["n_samples"] == len(scores) and "r2" in report

    saes = [_train(tmp_path, local, "topk")]

    # k* labels under that TopK SAE: no labelled data needed; each label is in [1, k]
    kstar_path = tmp_path / "kstar.safetensors"
    kstar_args = ["--labels", "kstar", "--sae", str(saes[0]), "--out", str(kstar_path)]
    rc = main(
        [
            "fit-probe",
            "--model",
            str(local / "model"),
            "--hook",
            HOOK_NAME,
            *kstar_args[:4],
            "--dataset",
            str(local / "labelled.jsonl"),
            *kstar_args[4:],
        ]
    )
    assert rc == 0
    kstar_probe = ComplexityProbe.load(kstar_path)
    assert kstar_probe.report.n_samples == len(scores)
    assert 1 <= kstar_probe.label_min <= kstar_probe.label_max <= SAE_BLOCKS["topk"]["k"]
    assert float(kstar_probe.label_min).is_integer() and float(kstar_probe.label_max).is_integer()
    ak = _train(tmp_path, local, "adaptivek", probe_path=str(probe_path))
    saved = load_file(str(ak / "sae_weights.safetensors"))
    torch.testing.assert_close(saved["probe_weight"], probe.weight)
    saes.append(ak)

    from sae_adaptive_plugin.evaluation import per_token_k_on_text

    model = tiny_model()
    json_path = tmp_path / "eval.json"
    args = ["eval", *map(str, saes), "--n-batches", "2", "--batch-size-prompts", "4"]
    assert main([*args, "--json", str(json_path)]) == 0
    table = capsys.readouterr().out
    results = json.loads(json_path.read_text())
    assert set(results) == {str(p) for p in saes}
    for path in saes:
        m = results[str(path)]
        assert str(path) in table
        for group, key in (
            ("reconstruction_quality", "explained_variance"),
            ("model_performance_preservation", "ce_loss_score"),
            ("model_behavior_preservation", "kl_div_score"),
            ("sparsity", "l0"),
        ):
            assert key in m[group]
        kd = m["k_distribution"]
        assert kd["n_tokens"] == 2 * 4 * CONTEXT_SIZE
        # the same batches as run_evals' sparsity pass: the mean per-token L0 is its L0
        assert kd["mean"] == pytest.approx(m["sparsity"]["l0"], rel=1e-5)
        assert kd["min"] <= kd["p05"] <= kd["p50"] <= kd["p95"] <= kd["max"]
        sae = SAE.load_from_disk(str(path))
        k_cap = sae.cfg.k if m["sae"]["architecture"] == "topk" else sae.cfg.k_max
        assert kd["max"] <= k_cap
        # per-token k over one text (what the example script plots)
        labels, ks = per_token_k_on_text(sae, model, "a cat sat")
        assert labels == [str(b % 100) for b in b"a cat sat"] and len(ks) == len(labels)
        assert all(0 <= k <= k_cap for k in ks)


def test_fit_probe_surprisal_all_tokens(tmp_path, local):
    from sae_adaptive_plugin.data.local_lm import texts_to_token_lists
    from sae_adaptive_plugin.probe import ComplexityProbe

    out = tmp_path / "surprisal.safetensors"
    rc = main(
        [
            "fit-probe",
            "--model",
            str(local / "model"),
            "--hook",
            HOOK_NAME,
            "--dataset",
            str(local / "labelled.jsonl"),
            "--labels",
            "surprisal",
            "--positions",
            "all",
            "--no-prepend-bos",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    probe = ComplexityProbe.load(out)
    texts = [
        json.loads(line)["text"] for line in (local / "labelled.jsonl").read_text().splitlines()
    ]
    model = tiny_model()
    lengths = [min(len(t), CONTEXT_SIZE) for t in texts_to_token_lists(model, texts, False)]
    assert probe.report.n_samples == sum(n - 1 for n in lengths)  # every token but the first
    # surprisal of a random model over a 100-token vocabulary sits around log(100)
    assert 0 < probe.label_min < probe.label_max


def test_hub_names_go_through_sae_lens_loading(tmp_path, local, monkeypatch):
    """A non-local model name reaches SAELens's ``load_model`` (here a stand-in) and a data-files
    folder reaches ``datasets.load_dataset`` inside SAELens's ActivationsStore; eval follows the
    SAE's metadata through the same loader."""
    import sae_lens.llm_sae_training_runner as runner_mod
    import sae_lens.load_model as load_model_mod
    from sae_lens import SAE

    calls = []

    def stand_in(model_class_name, model_name, device=None, **kwargs):
        calls.append((model_class_name, model_name, kwargs.get("hook_names")))
        return tiny_model()

    monkeypatch.setattr(runner_mod, "load_model", stand_in)
    monkeypatch.setattr(load_model_mod, "load_model", stand_in)
    data_dir = tmp_path / "hub_like_dataset"
    data_dir.mkdir()
    tiny_token_dataset(n_rows=64).to_parquet(str(data_dir / "train.parquet"))

    cfg = train_config(local, tmp_path / "hub", "topk")
    cfg.update(model_name="EleutherAI/pythia-70m-deduped", dataset_path=str(data_dir))
    assert main(["train", str(write_yaml(tmp_path / "hub.yaml", cfg))]) == 0
    assert calls[0] == ("HookedTransformer", "EleutherAI/pythia-70m-deduped", [HOOK_NAME])
    out = tmp_path / "hub" / "final"
    assert SAE.load_from_disk(str(out)).cfg.metadata.dataset_path == str(data_dir)

    assert main(["eval", str(out), "--n-batches", "1", "--batch-size-prompts", "2"]) == 0
    assert calls[-1][1] == "EleutherAI/pythia-70m-deduped"

    # fit-probe: the same loader, and a data-files folder streamed by datasets.load_dataset
    texts_dir = tmp_path / "hub_like_texts"
    texts_dir.mkdir()
    (texts_dir / "train.jsonl").write_text((local / "labelled.jsonl").read_text())
    probe_path = tmp_path / "hub_probe.safetensors"
    args = ["--hook", HOOK_NAME, "--dataset", str(texts_dir), "--max-texts", "20"]
    rc = main(
        ["fit-probe", "--model", "EleutherAI/pythia-70m-deduped", *args, "--out", str(probe_path)]
    )
    assert rc == 0
    assert calls[-1][1] == "EleutherAI/pythia-70m-deduped"
    from sae_adaptive_plugin.probe import ComplexityProbe

    assert ComplexityProbe.load(probe_path).report.n_samples == 20


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("n_epochs=3", ["unknown config key 'n_epochs'", "allowed keys:", "training_tokens"]),
        ("k=4", ["unknown config key 'k'", "belongs in the sae: block"]),
        ("log_to_wandb=true", ["unknown config key 'log_to_wandb'", "in the logger: block"]),
        ("sae.kk=3", ["unknown config key 'sae.kk'", "did you mean 'sae.k'", "d_sae"]),
        ("logger.wandb=1", ["unknown config key 'logger.wandb'", "log_to_wandb"]),
        ("lr=fast", ["config key 'lr'", "expected float", "'fast'"]),
        ("training_tokens=1.5", ["config key 'training_tokens'", "expected int"]),
        ("sae.k=[4]", ["config key 'sae.k'", "expected int"]),
        ("streaming=yes please", ["config key 'streaming'", "expected bool"]),
        ("sae.normalize_activations=max", ["'sae.normalize_activations'", "'layer_norm'"]),
        ("sae.architecture=nope", ["unknown architecture 'nope'", "topk", "hierarchical_topk"]),
    ],
)
def test_config_errors_name_the_key(override, message, tmp_path, local, capsys):
    cfg_path = write_yaml(tmp_path / "c.yaml", train_config(local, tmp_path, "topk"))
    assert main(["train", str(cfg_path), "--set", override]) == 2
    err = capsys.readouterr().err
    for part in message:
        assert part in err
    assert not (tmp_path / "final").exists()


def test_missing_required_sae_keys(tmp_path, local, capsys):
    cfg = train_config(local, tmp_path, "topk")
    del cfg["sae"]["d_in"]
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    assert "'sae.d_in'" in capsys.readouterr().err


def test_example_configs_validate():
    """Every example YAML builds a runner config (field names stay in step with the code)."""
    from sae_adaptive_plugin.training import build_runner_config, load_config_mapping

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
    archs = set()
    for path in examples:
        cfg = build_runner_config(load_config_mapping(path))
        if path.name.startswith("smollm2"):  # the local GGUF model, SAELens's HF hook names
            assert cfg.sae.d_in == 576 and cfg.hook_name == "model.layers.6"
            assert cfg.model_name.endswith(".gguf")
        else:
            assert cfg.sae.d_in == 512 and cfg.hook_name == "blocks.3.hook_resid_post"
        archs.add(cfg.sae.architecture())
    assert {*PACKAGE_ARCHITECTURES, "topk"} <= archs


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "kstar"], "--labels kstar needs --sae"),
        (["--score-column", "difficulty"], "--score-column 'difficulty' is not in the dataset"),
        (["--text-column", "body"], "--text-column 'body' is not in the dataset"),
        (["--n-folds", "1"], "--n-folds must be ≥ 2"),
    ],
)
def test_fit_probe_errors(extra, message, tmp_path, local, capsys):
    base = ["fit-probe", "--model", str(local / "model"), "--hook", HOOK_NAME]
    data = ["--dataset", str(local / "labelled.jsonl"), "--out", str(tmp_path / "p.safetensors")]
    assert main([*base, *data, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()
