"""Publishing to and loading from the Hub, against a local Hub-compatible server (tests/hub_server.py).

Every test runs offline: ``huggingface_hub`` is pointed at a server on 127.0.0.1 (its import-time
constants are patched in this process; subprocesses get ``HF_ENDPOINT``/``HF_HOME`` in their
environment) with a fresh cache directory per test. Covers: push then ``SAE.from_pretrained``
round-trips bit-exactly for SAELens's ``topk`` and every architecture this package registers;
pushing twice updates; training checkpoints are converted; the model card parses and carries the
metadata; ``HF_HUB_OFFLINE=1`` loads from the cache in a fresh interpreter; unknown architectures
give a clear error; a failed upload leaves the local files untouched and says how to retry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sae_adaptive_plugin import __version__, cli
from sae_adaptive_plugin.hub import (
    PACKAGE_NAME,
    PROVIDER_METADATA_KEY,
    HubPushError,
    UnknownArchitectureError,
    load_from_hub,
    push_to_hub,
)
from sae_adaptive_plugin.registration.plugin import PACKAGE_ARCHITECTURES

D_IN, D_SAE = 16, 64
REPO = "tester/adaptive-saes"


# ------------------------------------------------------------------------------------------------
# helpers (the `hub` fixture is in conftest.py)
# ------------------------------------------------------------------------------------------------


def _plugin_architectures(half: str) -> list[str]:
    """Architectures this package registers (read from the plugin's module list) with that half."""
    archs = [
        importlib.import_module(f"sae_adaptive_plugin.saes.{module}").ARCHITECTURE
        for module in PACKAGE_ARCHITECTURES
    ]
    return [arch.name for arch in archs if getattr(arch, half) is not None]


#: Inference / training architectures this package registers (grows as architectures land).
PLUGIN_ARCHITECTURES = _plugin_architectures("sae_class")
PLUGIN_TRAINING_ARCHITECTURES = _plugin_architectures("training_sae_class")


def _is_k_field(name: str) -> bool:
    return name == "k" or name.startswith("k_") or name.endswith("_k")


def _config_kwargs(cfg_cls: type, **overrides: Any) -> dict[str, Any]:
    """d_in/d_sae small; required fields defaulted by type; k-like ints kept <= d_sae / 2."""
    kwargs: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE}
    for f in dataclasses.fields(cfg_cls):
        if f.name in kwargs or not f.init:
            continue
        has_default = f.default is not dataclasses.MISSING
        has_factory = f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
        default = f.default if has_default else None
        if _is_k_field(f.name) and isinstance(default, int) and not isinstance(default, bool):
            kwargs[f.name] = max(1, min(default, D_SAE // 2))
        elif f.name == "k" and has_default and default is None:  # a target k sets the k range
            kwargs[f.name] = D_SAE // 8
        elif not has_default and not has_factory:
            annotation = str(f.type)
            if "int" in annotation:
                kwargs[f.name] = 4
            elif "float" in annotation:
                kwargs[f.name] = 0.5
            elif "bool" in annotation:
                kwargs[f.name] = False
            else:
                kwargs[f.name] = None
    kwargs.update(overrides)
    return kwargs


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and tensor.numel() > 0:
                tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype) * 0.3)


def random_sae(architecture: str, seed: int = 0, **cfg_overrides: Any):
    """An inference SAE of ``architecture`` with random weights, built from its registered config."""
    from sae_lens import registry

    sae_cls, cfg_cls = registry.SAE_CLASS_REGISTRY[architecture]
    sae = sae_cls(cfg_cls(**_config_kwargs(cfg_cls, **cfg_overrides)))
    _randomize(sae, seed)
    return sae


def random_training_sae(architecture: str, seed: int = 0, **cfg_overrides: Any):
    from sae_lens import registry

    sae_cls, cfg_cls = registry.SAE_TRAINING_CLASS_REGISTRY[architecture]
    sae = sae_cls(cfg_cls(**_config_kwargs(cfg_cls, **cfg_overrides)))
    _randomize(sae, seed)
    return sae


def write_sparsity(folder: Path, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    log_sparsity = -4.0 * torch.rand(D_SAE, generator=gen)
    log_sparsity[:3] = -10.0  # never fired
    save_file({"sparsity": log_sparsity}, folder / "sparsity.safetensors")
    return log_sparsity


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.iterdir())
    }


def assert_same_sae(loaded, reference) -> None:
    assert type(loaded) is type(reference)
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    assert sorted(ref_state) == sorted(got_state)
    for name, tensor in ref_state.items():
        assert got_state[name].dtype == tensor.dtype, name
        assert torch.equal(got_state[name], tensor), f"{name} differs after the round trip"


def forward_equal(a, b) -> None:
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["topk", *PLUGIN_ARCHITECTURES])
def test_push_then_from_pretrained_round_trips_bit_exactly(hub, tmp_path, architecture):
    from sae_lens import SAE

    sae = random_sae(architecture, seed=3)
    folder = tmp_path / "sae"
    sae.save_model(folder)
    log_sparsity = write_sparsity(folder, seed=4)
    (folder / "runner_cfg.json").write_text(json.dumps({"model_name": "tiny"}))
    local = SAE.load_from_disk(folder)

    sae_id = f"blocks.0.hook_resid_post/{architecture}"
    result = push_to_hub(folder, REPO, sae_id, show_progress=False, log=None)
    assert result.commit_oid == hub.repos[REPO].branches["main"]

    for name in ("sae_weights.safetensors", "sparsity.safetensors", "runner_cfg.json"):
        assert hub.file_at(REPO, f"{sae_id}/{name}") == (folder / name).read_bytes(), name
    # the weights went through the git LFS upload protocol, as on the real Hub
    weights_key = hub.repos[REPO].branches["main"]
    weights_key = hub.repos[REPO].commits[weights_key].files[f"{sae_id}/sae_weights.safetensors"]
    assert (
        weights_key == hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    )
    assert any(path.endswith(".git/info/lfs/objects/batch") for _, path in hub.requests)
    loaded, cfg_dict, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(REPO, sae_id)
    assert cfg_dict["architecture"] == architecture
    assert_same_sae(loaded, local)
    assert torch.equal(sparsity, log_sparsity)
    forward_equal(loaded, sae)
    # the helper loads the same thing
    assert_same_sae(load_from_hub(REPO, sae_id), local)


def test_pushing_twice_updates_and_keeps_other_saes(hub, tmp_path):
    from sae_lens import SAE

    first, second = tmp_path / "first", tmp_path / "second"
    random_sae("topk", seed=1).save_model(first)
    write_sparsity(first, seed=1)
    random_sae("topk", seed=2).save_model(second)  # no sparsity file this time
    other = tmp_path / "other"
    random_sae("topk", seed=5).save_model(other)

    one = push_to_hub(first, REPO, "layer0", show_progress=False, log=None)
    push_to_hub(other, REPO, "layer1", show_progress=False, log=None)
    assert SAE.from_pretrained_with_cfg_and_sparsity(REPO, "layer0")[2] is not None
    two = push_to_hub(second, REPO, "layer0", show_progress=False, log=None)

    repo = hub.repos[REPO]
    assert two.commit_oid != one.commit_oid
    assert repo.commits[two.commit_oid].parent is not None
    assert two.deleted == ["layer0/sparsity.safetensors"]
    assert "layer0/sparsity.safetensors" not in repo.commits[two.commit_oid].files
    # the cached first version is not served: the new commit is seen without force_download
    loaded, _, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(REPO, "layer0")
    assert_same_sae(loaded, SAE.load_from_disk(second))
    assert sparsity is None
    assert_same_sae(SAE.from_pretrained(REPO, "layer1"), SAE.load_from_disk(other))
    card = hub.file_at(REPO, "README.md").decode()
    assert card.count("sae-adaptive-plugin:begin layer0 ") == 1
    assert card.count("sae-adaptive-plugin:begin layer1 ") == 1


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", *PLUGIN_TRAINING_ARCHITECTURES])
def test_training_checkpoint_is_converted_before_upload(hub, tmp_path, architecture):
    from sae_lens import SAE
    from sae_lens.saes.sae import TrainingSAE

    training = random_training_sae(architecture, seed=7)
    ckpt = tmp_path / "checkpoints" / "final_1000"
    training.save_model(ckpt)
    write_sparsity(ckpt, seed=7)
    (ckpt / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.0}))
    before = snapshot(ckpt)

    result = push_to_hub(ckpt, REPO, "ckpt", show_progress=False, log=None)
    assert result.converted_from_training
    assert snapshot(ckpt) == before

    reference_dir = tmp_path / "reference"
    reference = TrainingSAE.load_from_disk(ckpt)
    reference.fold_activation_norm_scaling_factor(2.0)
    reference.save_inference_model(reference_dir)
    loaded = SAE.from_pretrained(REPO, "ckpt")
    assert not isinstance(loaded, TrainingSAE)
    assert loaded.cfg.normalize_activations == "none"
    assert_same_sae(loaded, SAE.load_from_disk(reference_dir))


# ------------------------------------------------------------------------------------------------
# model card
# ------------------------------------------------------------------------------------------------


def test_model_card_parses_and_carries_metadata(hub, tmp_path):
    from huggingface_hub import ModelCard, hf_hub_download

    architecture = (PLUGIN_ARCHITECTURES or ["topk"])[-1]
    sae = random_sae(architecture, seed=11)
    sae.cfg.metadata.model_name = "tiny-stories-1L"
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    sae.cfg.metadata.l0 = 12.375
    sae.cfg.metadata.num_dead_features = 5
    with_meta = tmp_path / "with_meta"
    sae.save_model(with_meta)
    bare = tmp_path / "bare"
    random_sae("topk", seed=12).save_model(bare)
    log_sparsity = write_sparsity(bare, seed=12)

    push_to_hub(with_meta, REPO, "with_meta", show_progress=False, log=None)
    push_to_hub(bare, REPO, "bare", show_progress=False, log=None)

    path = hf_hub_download(REPO, "README.md")
    text = Path(path).read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "saelens"
    assert {PACKAGE_NAME, architecture, "topk"} <= set(front["tags"])
    card = ModelCard.load(path)  # huggingface_hub's own parser
    assert card.data.library_name == "saelens"
    assert PACKAGE_NAME in card.data.tags

    section = text.split("sae-adaptive-plugin:begin with_meta")[1].split("sae-adaptive-plugin:end")[
        0
    ]
    for fact in ("tiny-stories-1L", "blocks.0.hook_resid_post", f"{D_IN} / {D_SAE}", "12.38"):
        assert fact in section, fact
    assert f"5, {100 * 5 / D_SAE:.2f}%" in section
    k_fields = [k for k in sae.cfg.to_dict() if _is_k_field(k)]
    for k in k_fields:
        assert f"`{k}={getattr(sae.cfg, k)}`" in section
    assert f'SAE.from_pretrained("{REPO}", "with_meta")' in section
    # the install line comes first, in the card and in the section; the section names the version
    body = text.split("---\n", 2)[2]
    assert body.index(f"pip install {PACKAGE_NAME}") < body.index("Sparse autoencoders (SAEs)")
    assert section.index(f"pip install {PACKAGE_NAME}") < section.index("| architecture |")
    assert f"| provided by | `{PACKAGE_NAME}` {__version__} |" in section

    bare_section = text.split("sae-adaptive-plugin:begin bare")[1]
    expected_l0 = float((10.0 ** log_sparsity.double()).sum())
    assert f"| training-window L0 | {expected_l0:.4g} (sum of the feature firing" in bare_section
    assert "| L0 |" not in bare_section  # a training-window value is never the SAE's L0
    assert f"{int((log_sparsity <= -9.999).sum())}, " in bare_section

    # a README a person wrote is kept, front matter keys included
    card.data.license = "mit"
    own = "---\n" + card.data.to_yaml() + "\n---\n# My SAEs\n\nHand-written intro.\n"
    from huggingface_hub import HfApi

    HfApi().upload_file(path_or_fileobj=own.encode(), path_in_repo="README.md", repo_id=REPO)
    push_to_hub(bare, REPO, "bare2", show_progress=False, log=None)
    merged = hub.file_at(REPO, "README.md").decode()
    merged_front = yaml.safe_load(merged.split("---\n")[1])
    assert merged_front["license"] == "mit"
    assert merged.split("---\n", 2)[2].lstrip().startswith("# My SAEs\n")
    assert merged.index("Hand-written intro.") < merged.index("sae-adaptive-plugin:begin bare2 ")
    assert "sae-adaptive-plugin:begin bare2 " in merged


# ------------------------------------------------------------------------------------------------
# offline, errors, CLI
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_offline_mode_loads_from_cache_in_a_fresh_interpreter(hub, tmp_path):
    from sae_lens import SAE

    architecture = (PLUGIN_ARCHITECTURES or ["topk"])[-1]
    folder = tmp_path / "sae"
    random_sae(architecture, seed=21).save_model(folder)
    write_sparsity(folder, seed=21)
    push_to_hub(folder, REPO, "cached", show_progress=False, log=None)
    online = SAE.from_pretrained(REPO, "cached")  # fills the cache
    expected = {
        k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in online.state_dict().items()
    }

    n_requests = len(hub.requests)
    script = textwrap.dedent(
        f"""
        import hashlib, json
        from sae_lens import SAE
        sae = SAE.from_pretrained({REPO!r}, "cached")
        print(json.dumps({{"class": type(sae).__name__, "state": {{
            k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in sae.state_dict().items()
        }}}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["class"] == type(online).__name__
    assert out["state"] == expected
    assert len(hub.requests) == n_requests, hub.requests[n_requests:]


def test_unknown_architecture_gives_a_clear_error(hub, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from sae_lens import registry

    folder = tmp_path / "sae"
    random_sae("topk", seed=31).save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)

    def upload(sae_id: str, architecture: str, **metadata: Any) -> None:
        data = {**cfg, "architecture": architecture, "metadata": {**cfg["metadata"], **metadata}}
        api.upload_file(
            path_or_fileobj=json.dumps(data).encode(),
            path_in_repo=f"{sae_id}/cfg.json",
            repo_id=REPO,
        )
        api.upload_file(
            path_or_fileobj=str(folder / "sae_weights.safetensors"),
            path_in_repo=f"{sae_id}/sae_weights.safetensors",
            repo_id=REPO,
        )

    # one of ours, as seen from an interpreter where this package is not installed
    monkeypatch.delitem(registry.SAE_CLASS_REGISTRY, "softsae", raising=False)
    upload("ours", "softsae")
    with pytest.raises(UnknownArchitectureError) as ours:
        load_from_hub(REPO, "ours")
    assert "'softsae'" in str(ours.value)
    assert f"pip install {PACKAGE_NAME}" in str(ours.value)

    upload("theirs", "fancy_sae")
    with pytest.raises(UnknownArchitectureError) as theirs:
        load_from_hub(REPO, "theirs")
    message = str(theirs.value)
    assert "'fancy_sae'" in message and "plugin" in message and "topk" in message
    assert f"pip install {PACKAGE_NAME}" not in message

    upload("named", "fancy_sae", **{PROVIDER_METADATA_KEY: "fancy-sae-pkg"})
    with pytest.raises(UnknownArchitectureError, match="pip install fancy-sae-pkg"):
        load_from_hub(REPO, "named")

    # pushing an SAE whose architecture is unknown fails before any request
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg.json").write_text(json.dumps({**cfg, "architecture": "fancy_sae"}))
    (bad / "sae_weights.safetensors").write_bytes((folder / "sae_weights.safetensors").read_bytes())
    n_requests = len(hub.requests)
    with pytest.raises(UnknownArchitectureError, match="fancy_sae"):
        push_to_hub(bad, REPO, "bad", show_progress=False, log=None)
    assert len(hub.requests) == n_requests


def test_plugin_architecture_cfg_names_its_package(hub, tmp_path):
    architectures = PLUGIN_ARCHITECTURES
    architecture = architectures[-1] if architectures else "topk"
    folder = tmp_path / "sae"
    random_sae(architecture, seed=41).save_model(folder)
    push_to_hub(folder, REPO, "named", show_progress=False, log=None)
    published = json.loads(hub.file_at(REPO, "named/cfg.json"))
    local = json.loads((folder / "cfg.json").read_text())
    expected = PACKAGE_NAME if architectures else None
    assert published["metadata"].get(PROVIDER_METADATA_KEY) == expected
    # the SAE wrote its package and version itself: the published cfg.json is the local one
    assert local["metadata"].get(PROVIDER_METADATA_KEY) == expected
    assert published == local
    # an older cfg.json without them gets the package name on upload
    local["metadata"].pop(PROVIDER_METADATA_KEY, None)
    (folder / "cfg.json").write_text(json.dumps(local))
    push_to_hub(folder, REPO, "named", show_progress=False, log=None)
    published = json.loads(hub.file_at(REPO, "named/cfg.json"))
    assert published["metadata"].get(PROVIDER_METADATA_KEY) == expected
    published["metadata"].pop(PROVIDER_METADATA_KEY, None)
    assert published == local


def test_failed_upload_leaves_local_files_untouched_and_says_what_to_retry(hub, tmp_path, capsys):
    folder = tmp_path / "sae"
    random_sae("topk", seed=51).save_model(folder)
    write_sparsity(folder, seed=51)
    before = snapshot(folder)

    hub.fail["commit"] = 500
    with pytest.raises(HubPushError) as failure:
        push_to_hub(folder, REPO, "layer3", show_progress=False, log=None)
    message = str(failure.value)
    assert f"sae-adaptive push {folder} --repo-id {REPO} --sae-id layer3" in message
    assert "untouched" in message
    assert snapshot(folder) == before
    head = hub.repos[REPO].branches["main"]
    assert not any(p.startswith("layer3/") for p in hub.repos[REPO].commits[head].files)

    args = ["push", str(folder), "--repo-id", REPO, "--sae-id", "layer3"]
    assert cli.main(args) == 1
    assert "Retry with: sae-adaptive push" in capsys.readouterr().err
    assert snapshot(folder) == before

    hub.fail.clear()  # the retry the message suggests now succeeds
    assert cli.main(args) == 0
    assert f'SAE.from_pretrained("{REPO}", "layer3")' in capsys.readouterr().out
    assert (
        hub.file_at(REPO, "layer3/sae_weights.safetensors")
        == (folder / "sae_weights.safetensors").read_bytes()
    )


def test_cli_push_private_repo_on_a_branch(hub, tmp_path, capsys):
    folder = tmp_path / "sae"
    random_sae("topk", seed=61).save_model(folder)
    args = ["push", str(folder), "--repo-id", "tester/private-saes", "--sae-id", "x"]
    assert cli.main([*args, "--private", "--revision", "dev"]) == 0
    repo = hub.repos["tester/private-saes"]
    assert repo.private
    assert "x/cfg.json" in repo.commits[repo.branches["dev"]].files
    assert "x/cfg.json" not in repo.commits[repo.branches["main"]].files
    # SAE.from_pretrained reads main; a branch loads through snapshot_download (as the README says)
    from huggingface_hub import snapshot_download
    from sae_lens import SAE

    local = snapshot_download("tester/private-saes", revision="dev", allow_patterns=["x/*"])
    assert_same_sae(SAE.load_from_disk(Path(local) / "x"), SAE.load_from_disk(folder))

    assert cli.main(["push", str(folder), "--repo-id", "no-slash", "--sae-id", "x"]) == 2
    assert "--repo-id must look like USER/REPO" in capsys.readouterr().err
    assert cli.main(["push", str(folder), "--repo-id", REPO, "--sae-id", "../x"]) == 2
    assert "--sae-id" in capsys.readouterr().err
    assert cli.main(["push", str(tmp_path / "missing"), "--repo-id", REPO, "--sae-id", "x"]) == 2


def test_unreachable_hub_is_reported_with_the_retry_command(hub, tmp_path):
    folder = tmp_path / "sae"
    random_sae("topk", seed=71).save_model(folder)
    before = snapshot(folder)
    hub.stop()  # nothing listens on the endpoint any more
    with pytest.raises(HubPushError, match=r"Retry with: sae-adaptive push .* --sae-id far"):
        push_to_hub(folder, REPO, "far", show_progress=False, log=None)
    assert snapshot(folder) == before


def test_real_training_run_checkpoint_and_final_output_publish(hub, tmp_path):
    """A SAELens training run on a tiny random LM: its mid-run checkpoint (trainer_state.pt,
    activation scaler) converts to the inference SAE, and its final folder's metadata fills the card."""
    from sae_lens import SAE
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from tiny_lm import D_MODEL, tiny_activations, train_tiny_runner

    cfg = TopKTrainingSAEConfig(
        d_in=D_MODEL, d_sae=64, k=4, normalize_activations="expected_average_only_in"
    )
    _, final = train_tiny_runner(cfg, tmp_path / "run", n_checkpoints=1, training_tokens=64 * 12)
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*/*")
    assert (ckpt / "trainer_state.pt").exists()
    scale = json.loads((ckpt / "activation_scaler.json").read_text())["scaling_factor"]
    assert scale is not None and scale != 1.0
    before = snapshot(ckpt)

    assert push_to_hub(ckpt, REPO, "ckpt", show_progress=False, log=None).converted_from_training
    assert snapshot(ckpt) == before
    loaded = SAE.from_pretrained(REPO, "ckpt")
    training = TrainingSAE.load_from_disk(ckpt)
    x = tiny_activations(16)
    with torch.no_grad():
        expected = training.decode(training.encode(x * scale)) / scale
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)

    result = push_to_hub(final, REPO, "final", show_progress=False, log=None)
    assert not result.converted_from_training
    assert "final/runner_cfg.json" in result.files
    meta = json.loads((final / "cfg.json").read_text())["metadata"]
    card = hub.file_at(REPO, "README.md").decode()
    assert "converted to the inference SAE" in card.split("begin ckpt")[1].split("end ckpt")[0]
    section = card.split("begin final")[1]
    assert "converted" not in section
    # SAELens's runner records its training-window L0: published as that, never as the SAE's
    assert f"| training-window L0 | {meta['l0']:.4g} (mean over the last" in section
    assert "| L0 |" not in section
    assert f"| dead features | {meta['num_dead_features']}, " in section
    assert f"`{meta['model_name']}`" in section and f"`{meta['hook_name']}`" in section
    assert_same_sae(SAE.from_pretrained(REPO, "final"), SAE.load_from_disk(final))
