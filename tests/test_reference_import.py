"""Importing SAEs saved by the papers' reference code (hiyukie/adaptiveK, St0pien/SoftSAE).

Checkpoints are written here in the references' own layout (``trainer_0/ae.pt`` state dict of
``nn.Linear`` weights ``[out, in]``, ``probe.pt``, ``config.json`` with its ``trainer`` block),
with random weights. Each reference forward is re-implemented below from its source; the imported
SAE must give the same per-row k and code, and the same reconstruction (SoftSAE: ``norm_factor``
times the reference's, which decodes in the units of ``x / norm_factor``), within 1e-6 in float32,
through ``SAE.from_pretrained(repo, folder, converter=…)`` on the local Hub stand-in and through
``sae-adaptive import`` + ``SAE.load_from_disk``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import (
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
    NAMED_PRETRAINED_SAE_LOADERS,
)

from sae_adaptive_plugin import cli
from sae_adaptive_plugin.hub.reference_import import (
    ReferenceImportError,
    adaptivek_ref_disk_loader,
    adaptivek_ref_huggingface_loader,
    import_reference,
    local_files,
    read_tensors,
    register_reference_loaders,
    softsae_ref_huggingface_loader,
)

D_IN, D_SAE, N_ROWS = 16, 64, 96
REPO, FOLDER = "tester/reference-saes", "resid_post_layer_3/trainer_0"
TOL = {"atol": 1e-6, "rtol": 1e-6}


# -- checkpoints in the references' layouts ---------------------------------------------------------


def _linear_sae_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    decoder = torch.randn(D_IN, D_SAE, generator=gen)
    decoder = decoder / decoder.norm(dim=0, keepdim=True)  # unit-norm dictionary columns
    return {
        "encoder.weight": decoder.T.contiguous() + 0.1 * torch.randn(D_SAE, D_IN, generator=gen),
        "encoder.bias": 0.1 * torch.randn(D_SAE, generator=gen),
        "decoder.weight": decoder,
        "b_dec": 0.2 * torch.randn(D_IN, generator=gen),
    }


def write_adaptivek_checkpoint(folder: Path, min_k: int = 2, max_k: int = 24) -> dict:
    """``DynamicTopKTrainer.save_model`` + ``trainSAE``'s config.json, random weights."""
    gen = torch.Generator().manual_seed(1)
    ae = _linear_sae_state(gen)
    probe = {"weights": 1.5 * torch.randn(D_IN, 1, generator=gen), "bias": torch.tensor([5.0])}
    folder.mkdir(parents=True)
    torch.save(ae, folder / "ae.pt")
    torch.save(probe, folder / "probe.pt")
    trainer = {
        "trainer_class": "DynamicTopKTrainer",
        "dict_class": "AutoEncoderDynamicTopK",
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "base_k": 8,
        "min_k": min_k,
        "max_k": max_k,
        "layer": 3,
        "lm_name": "EleutherAI/pythia-70m-deduped",
        "submodule_name": "resid_post_layer_3",
    }
    (folder / "config.json").write_text(
        json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}})
    )
    dynamic = {k: trainer[k] for k in ("activation_dim", "dict_size", "base_k", "min_k", "max_k")}
    (folder / "dynamic_config.json").write_text(json.dumps(dynamic))
    return {"ae": ae, "probe": probe, "min_k": min_k, "max_k": max_k}


def write_softsae_checkpoint(folder: Path, norm_factor: float = 1.0, k_max: int = 16) -> dict:
    """``trainSAE``'s final ``ae.pt`` of a ``SoftSAE`` (buffers k, alpha, k_max, norm_factor)."""
    gen = torch.Generator().manual_seed(2)
    sd = {
        "k": torch.tensor(8, dtype=torch.int),
        "alpha": torch.tensor(0.02, dtype=torch.float32),
        "k_max": torch.tensor(k_max, dtype=torch.int),
        "norm_factor": torch.tensor(norm_factor, dtype=torch.float32),
        **_linear_sae_state(gen),
        "k_estimator.0.weight": torch.randn(D_SAE, D_IN, generator=gen) / D_IN**0.5,
        "k_estimator.0.bias": 0.1 * torch.randn(D_SAE, generator=gen),
        "k_estimator.2.weight": torch.randn(1, D_SAE, generator=gen),
        "k_estimator.2.bias": torch.tensor([0.0]),
    }
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    trainer = {
        "trainer_class": "SoftTopKTrainer",
        "dict_class": "SoftSAE",
        "activation_dim": D_IN,
        "dict_size": D_SAE,
        "k": 8,
        "layer": 3,
        "lm_name": "google/gemma-2-2b",
        "submodule_name": "resid_post_layer_3",
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    return {"sd": sd}


# -- the references' forwards, re-implemented from their source -------------------------------------


def _top_k_per_row(pre: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    code = torch.zeros_like(pre)
    for row, k_row in enumerate(k.tolist()):
        values, indices = pre[row].topk(min(k_row, pre.shape[-1]))
        code[row, indices] = values
    return code


def adaptivek_reference(ckpt: dict, x: torch.Tensor):
    """``(k, code, reconstruction)``: ``LinearProbe`` (clamped to [0, 10]) →
    ``map_complexity_to_k`` → ``AutoEncoderDynamicTopK.encode``/``decode``."""
    ae, probe = ckpt["ae"], ckpt["probe"]
    score = (x @ probe["weights"] + probe["bias"]).clamp(0.0, 10.0).squeeze(-1)
    normalized = (score - 0.0) / (10.0 - 0.0)
    factor = 1.0 / (1.0 + torch.exp(-6.0 * (normalized - 0.5)))
    k_min, k_max = ckpt["min_k"], ckpt["max_k"]
    k = (k_min + factor * (k_max - k_min)).clamp(k_min, k_max).round().int()
    pre = torch.relu((x - ae["b_dec"]) @ ae["encoder.weight"].T + ae["encoder.bias"])
    code = _top_k_per_row(pre, k)
    return k.long(), code, code @ ae["decoder.weight"].T + ae["b_dec"]


def softsae_reference(ckpt: dict, x: torch.Tensor):
    """``(k, code, reconstruction)`` of ``SoftSAE.forward`` (hard top-k): the input divided by
    ``norm_factor``, ``k = long(clamp(σ(estimator) · k_max, 1, dict_size))``, decode without
    undoing the division."""
    sd = ckpt["sd"]
    x = x / sd["norm_factor"]
    centred = x - sd["b_dec"]
    pre = torch.relu(centred @ sd["encoder.weight"].T + sd["encoder.bias"])
    hidden = torch.relu(centred @ sd["k_estimator.0.weight"].T + sd["k_estimator.0.bias"])
    prob = torch.sigmoid(hidden @ sd["k_estimator.2.weight"].T + sd["k_estimator.2.bias"])
    k = torch.clamp(prob.squeeze(-1) * sd["k_max"], min=1, max=D_SAE).long()
    code = _top_k_per_row(pre, k)
    return k, code, code @ sd["decoder.weight"].T + sd["b_dec"]


FORMATS = {
    "adaptivek-ref": (write_adaptivek_checkpoint, adaptivek_reference),
    "softsae-ref": (write_softsae_checkpoint, softsae_reference),
}


def _inputs() -> torch.Tensor:
    return 1.5 * torch.randn(N_ROWS, D_IN, generator=torch.Generator().manual_seed(3))


def assert_matches_reference(sae, ckpt: dict, fmt: str, norm_factor: float = 1.0) -> None:
    x = _inputs()
    k_ref, code_ref, recon_ref = FORMATS[fmt][1](ckpt, x)
    assert k_ref.unique().numel() >= 4, "test checkpoint should give rows different k"
    with torch.no_grad():
        k = sae.k_per_sample(x)
        code = sae.encode(x)
        recon = sae.decode(code)
    assert torch.equal(k, k_ref)
    assert torch.equal(code != 0, code_ref != 0)
    torch.testing.assert_close(code, code_ref, **TOL)
    torch.testing.assert_close(recon, norm_factor * recon_ref, **TOL)


def _upload(folder: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    api.upload_folder(folder_path=str(folder), path_in_repo=FOLDER, repo_id=REPO)


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_sae_adaptive_import_gives_the_reference_forward(tmp_path, fmt, capsys):
    ckpt = FORMATS[fmt][0](tmp_path / "run" / "trainer_0")
    out = tmp_path / "imported"
    assert (
        cli.main(
            ["import", str(tmp_path / "run" / "trainer_0"), "--format", fmt, "--out", str(out)]
        )
        == 0
    )
    assert "load it with SAE.load_from_disk" in capsys.readouterr().out
    sae = SAE.load_from_disk(out)
    assert sae.cfg.architecture() == fmt.removesuffix("-ref")
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.imported_from["format"] == fmt
    assert_matches_reference(sae, ckpt, fmt)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_from_pretrained_with_converter_gives_the_reference_forward(hub, tmp_path, fmt):
    ckpt = FORMATS[fmt][0](tmp_path / "trainer_0")
    _upload(tmp_path / "trainer_0")
    converter = {
        "adaptivek-ref": adaptivek_ref_huggingface_loader,
        "softsae-ref": softsae_ref_huggingface_loader,
    }[fmt]
    sae = SAE.from_pretrained(REPO, FOLDER, converter=converter)
    trainer = json.loads((tmp_path / "trainer_0" / "config.json").read_text())["trainer"]
    assert sae.cfg.metadata.model_name == trainer["lm_name"]
    assert_matches_reference(sae, ckpt, fmt)
    # a release's overrides: config fields at the top, the rest (neuronpedia id) in metadata
    overrides = {"dtype": "float64", "neuronpedia_id": "m/3"}
    cfg, _, _ = converter(REPO, FOLDER, cfg_overrides=overrides)
    assert (cfg["dtype"], cfg["metadata"]["neuronpedia_id"]) == ("float64", "m/3")
    # and `sae-adaptive import REPO --folder …` writes the same SAE
    out = tmp_path / "imported"
    args = ["import", REPO, "--folder", FOLDER, "--format", fmt, "--out", str(out)]
    assert cli.main(args) == 0
    imported = SAE.load_from_disk(out)
    for name, value in sae.state_dict().items():
        assert torch.equal(imported.state_dict()[name], value), name


def test_softsae_norm_factor_is_folded_in(tmp_path):
    """The reference reads ``x / norm_factor`` and decodes in those units: same k and code,
    decode in the input's units (``norm_factor`` × the reference's)."""
    norm = 2.5
    ckpt = write_softsae_checkpoint(tmp_path / "trainer_0", norm_factor=norm)
    out = tmp_path / "imported"
    args = ["import", str(tmp_path / "trainer_0" / "ae.pt"), "--format", "softsae-ref"]
    assert cli.main([*args, "--out", str(out), "--hook-name", "blocks.3.hook_resid_pre"]) == 0
    sae = SAE.load_from_disk(out)
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_pre"
    assert sae.cfg.metadata.imported_from["norm_factor"] == norm
    assert sae.cfg.normalize_activations == "none"
    assert_matches_reference(sae, ckpt, "softsae-ref", norm_factor=norm)


def test_disk_converter_and_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "trainer_0"
    ckpt = write_adaptivek_checkpoint(folder)
    save_file(ckpt["ae"], folder / "ae.safetensors")
    (folder / "ae.pt").unlink()
    assert local_files(folder, "adaptivek-ref").weights.name == "ae.safetensors"
    sae = SAE.load_from_disk(folder, converter=adaptivek_ref_disk_loader)
    assert_matches_reference(sae, ckpt, "adaptivek-ref")


class _Opaque:
    """Something only full unpickling can rebuild."""

    def __init__(self) -> None:
        self.weight = torch.zeros(2)


def test_pickle_only_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    folder = tmp_path / "trainer_0"
    write_softsae_checkpoint(folder)
    torch.save({"encoder.weight": torch.zeros(D_SAE, D_IN), "extra": _Opaque()}, folder / "ae.pt")
    with pytest.raises(ReferenceImportError, match="weights_only") as exc:
        read_tensors(folder / "ae.pt")
    assert str(folder / "ae.pt") in str(exc.value)
    out = tmp_path / "out"
    assert cli.main(["import", str(folder), "--format", "softsae-ref", "--out", str(out)]) == 2
    assert str(folder / "ae.pt") in capsys.readouterr().out
    assert not out.exists()


def test_bad_checkpoints_are_refused_naming_the_field(tmp_path, capsys):
    write_adaptivek_checkpoint(tmp_path / "a", max_k=D_SAE + 1)
    with pytest.raises(ReferenceImportError, match=r"dict_size=64.*max_k=65"):
        SAE.load_from_disk(tmp_path / "a", converter=adaptivek_ref_disk_loader)
    write_adaptivek_checkpoint(tmp_path / "b")
    (tmp_path / "b" / "probe.pt").unlink()
    with pytest.raises(ReferenceImportError, match=r"probe\.pt"):
        SAE.load_from_disk(tmp_path / "b", converter=adaptivek_ref_disk_loader)
    write_softsae_checkpoint(tmp_path / "c", k_max=D_SAE + 8)
    with pytest.raises(ReferenceImportError, match=r"k_max=72"):
        import_reference(local_files(tmp_path / "c", "softsae-ref"), "softsae-ref", "test")
    args = ["import", str(tmp_path / "no" / "such"), "--format", "softsae-ref"]
    assert cli.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "no such local path" in capsys.readouterr().out
    backup = {"step": 3, "ae": {"b_dec": torch.zeros(D_IN)}, "norm_factor": 1.0}
    torch.save(backup, tmp_path / "backup.pt")
    with pytest.raises(ReferenceImportError, match="training backup"):
        read_tensors(tmp_path / "backup.pt")


def test_import_refuses_a_non_empty_out(tmp_path, capsys):
    write_softsae_checkpoint(tmp_path / "trainer_0")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert (
        cli.main(
            ["import", str(tmp_path / "trainer_0"), "--format", "softsae-ref", "--out", str(out)]
        )
        == 2
    )
    assert "not empty" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_loaders_are_registered_with_saelens_by_name():
    from sae_adaptive_plugin.registration.loader import load_plugins

    load_plugins()
    assert NAMED_PRETRAINED_SAE_LOADERS["adaptivek_ref"] is adaptivek_ref_huggingface_loader
    assert NAMED_PRETRAINED_SAE_LOADERS["softsae_ref"] is softsae_ref_huggingface_loader
    assert "adaptivek_ref" in NAMED_PRETRAINED_SAE_CONFIG_GETTERS
    assert register_reference_loaders() == ["adaptivek_ref", "softsae_ref"]  # idempotent
