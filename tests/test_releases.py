"""Releases as plugin data, ``push --neuronpedia-id`` and ``sae-adaptive release`` end to end.

The directory tests run against a small stand-in for SAELens's cached directory function (so the
1.5 MB YAML is not parsed); the acceptance test builds a suite on the tiny local model, pushes it to
the local Hub stand-in (tests/hub_server.py) and loads every SAE by release name in a new
interpreter where a plugin installed on ``sys.path`` (a ``.dist-info`` with its entry point)
declares the release.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from tiny_lm import CONTEXT_SIZE, D_MODEL, SAE_BLOCKS

from sae_adaptive_plugin.cli import main
from sae_adaptive_plugin.hub.release import build_release
from sae_adaptive_plugin.hub.release_spec import ReleaseSpecError, check_spec
from sae_adaptive_plugin.registration import loader, releases
from sae_adaptive_plugin.registration.hookspecs import hookimpl
from sae_adaptive_plugin.registration.releases import (
    ReleaseError,
    check_release,
    lookup_from_entry,
)

REPO = "tester/tiny-adaptive-saes"
RELEASE = "tiny-adaptive-res"


def _entry(repo: str = "someone/saes", ids: tuple[str, ...] = ("a", "b")) -> dict:
    return {
        "repo_id": repo,
        "model": "tiny-random",
        "saes": [
            {"id": i, "path": f"layer/{i}", "l0": 3.5, "variance_explained": 0.9, "neuronpedia": i}
            for i in ids
        ],
    }


def _release_plugin(name: str, hook) -> types.ModuleType:
    module = types.ModuleType(name)
    module.sae_lens_releases = hookimpl(hook)
    return module


@pytest.fixture
def directory(monkeypatch, isolated):
    """SAELens's directory replaced by a cached stand-in holding one SAELens release; the merge
    state reset. Returns ``isolated`` (install fake entry points)."""
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup

    builtin = lookup_from_entry("gpt2-small-res-jb", check_release("x", _entry("jbloom/x"), "t"))
    assert isinstance(builtin, PretrainedSAELookup)
    monkeypatch.setattr(
        releases, "_original", functools.cache(lambda: {"gpt2-small-res-jb": builtin})
    )
    monkeypatch.setattr(releases, "_merged", False)
    return isolated


# ------------------------------------------------------------------------------------------------
# the directory
# ------------------------------------------------------------------------------------------------


def test_every_sae_lens_lookup_goes_through_the_merging_directory():
    """``SAE.from_pretrained`` (sae.py), the loaders and evals imported the function by name:
    each module's reference is the merging one once the plugins loaded."""
    import sae_lens.evals
    import sae_lens.loading.pretrained_sae_loaders
    import sae_lens.loading.pretrained_saes_directory
    import sae_lens.saes.sae

    loader.load_plugins()
    for module in (
        sae_lens.saes.sae,
        sae_lens.loading.pretrained_sae_loaders,
        sae_lens.loading.pretrained_saes_directory,
        sae_lens.evals,
    ):
        assert module.get_pretrained_saes_directory is releases.lookup_directory, module


def test_plugin_releases_join_on_first_lookup_never_overwrite_and_failures_are_isolated(
    directory, caplog
):
    calls = []

    def good():
        calls.append(1)
        return {"demo-release": _entry(), "gpt2-small-res-jb": _entry("intruder/repo")}

    def broken():
        raise RuntimeError("boom")

    directory(
        {
            "good": _release_plugin("good", good),
            "broken": _release_plugin("broken", broken),
            "bad_entry": _release_plugin("bad_entry", lambda: {"x": {"repo_id": "a/b"}}),
        }
    )
    reports = {r.name: r for r in loader.load_plugins()}
    assert all(r.ok for r in reports.values())  # a releases-only plugin loads
    assert calls == []  # nothing asked before a release is looked up

    found = releases.lookup_directory()
    assert calls == [1]
    assert found["gpt2-small-res-jb"].repo_id == "jbloom/x"  # kept, not overwritten
    demo = found["demo-release"]
    assert demo.repo_id == "someone/saes" and demo.saes_map == {"a": "layer/a", "b": "layer/b"}
    assert demo.expected_l0 == {"a": 3.5, "b": 3.5} and demo.neuronpedia_id["b"] == "b"
    assert reports["good"].releases == ["demo-release"]
    assert reports["good"].releases_skipped == ["gpt2-small-res-jb"]
    assert "boom" in reports["broken"].release_error
    assert "field 'model'" in reports["bad_entry"].release_error
    assert "already in the pretrained-SAE directory" in caplog.text

    assert releases.lookup_directory() is found and calls == [1]  # cached
    releases.lookup_directory.cache_clear()
    assert "demo-release" in releases.lookup_directory() and calls == [1, 1]


def test_plugins_command_lists_releases(directory, capsys):
    directory({"good": _release_plugin("good", lambda: {"demo-release": _entry()})})
    assert loader.plugins_command(types.SimpleNamespace(all=False)) == 0
    assert "release demo-release" in capsys.readouterr().out


def test_lookup_is_built_from_the_dataclass_fields():
    """A SAELens version that adds a required field and drops one still gets a lookup."""

    @dataclasses.dataclass
    class FutureLookup:
        release: str
        repo_id: str
        saes_map: dict
        expected_l0: dict
        new_required: object
        with_default: int = 7

    entry = check_release("r", {**_entry(), "new_required": "given"}, "t")
    lookup = lookup_from_entry("r", entry, FutureLookup)
    saes_map, l0 = {"a": "layer/a", "b": "layer/b"}, {"a": 3.5, "b": 3.5}
    assert lookup == FutureLookup("r", "someone/saes", saes_map, l0, "given", with_default=7)
    assert (
        lookup_from_entry("r", check_release("r", _entry(), "t"), FutureLookup).new_required is None
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"repo_id": None}, "'repo_id'"),
        ({"saes": []}, "'saes'"),
        ({"saes": [{"id": "a"}]}, "'path'"),
        ({"saes": [{"id": "a", "path": "p", "l0": "many"}]}, "'l0'"),
        ({"saes": [{"id": "a", "path": "p"}, {"id": "a", "path": "q"}]}, "twice"),
        ({"config_overrides": [1]}, "'config_overrides'"),
    ],
)
def test_malformed_release_entries_name_the_field(change, field):
    with pytest.raises(ReleaseError, match=field):
        check_release("r", {**_entry(), **change}, "plugin p")


def test_packaged_releases_file_is_what_the_package_plugin_declares():
    from sae_adaptive_plugin.registration import plugin

    assert releases.PACKAGE_RELEASES_FILE.is_file()
    assert plugin.sae_lens_releases() == releases.read_releases_file(releases.PACKAGE_RELEASES_FILE)


@pytest.mark.slow
def test_wheel_ships_the_releases_file(tmp_path):
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            ".",
        ],
        cwd=root,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("sae_adaptive_plugin-*.whl")
    relative = releases.PACKAGE_RELEASES_FILE.relative_to(root).as_posix()
    assert relative in zipfile.ZipFile(wheel).namelist()


# ------------------------------------------------------------------------------------------------
# push --neuronpedia-id
# ------------------------------------------------------------------------------------------------


def test_push_writes_the_neuronpedia_id(hub, tmp_path, capsys):
    from sae_lens import SAE
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4)).save_model(tmp_path / "sae")
    argv = ["push", str(tmp_path / "sae"), "--repo-id", REPO, "--sae-id", "l0"]
    assert main([*argv, "--neuronpedia-id", "tiny/0-res-topk"]) == 0
    assert SAE.from_pretrained(REPO, "l0").cfg.metadata.neuronpedia_id == "tiny/0-res-topk"
    assert (
        json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"].get("neuronpedia_id")
        is None
    )  # the local folder is only read
    assert main([*argv, "--neuronpedia-id", " "]) == 2
    assert "--neuronpedia-id" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# sae-adaptive release
# ------------------------------------------------------------------------------------------------


def _spec(local: Path, **changes) -> dict:
    spec = {
        "release": RELEASE,
        "repo_id": REPO,
        "model": str(local / "model"),
        "model_id": "tiny-random",
        "hook": "blocks.0.hook_resid_{layer}",
        "layers": ["post"],
        "d_in": D_MODEL,
        "d_sae": 64,
        "training_tokens": 64 * 16,
        "runner": {
            "dataset_path": str(local / "tokens"),
            "is_dataset_tokenized": True,
            "streaming": False,
            "context_size": CONTEXT_SIZE,
            "prepend_bos": False,
            "train_batch_size_tokens": 64,
            "store_batch_size_prompts": 8,
            "n_batches_in_buffer": 4,
            "lr": 1e-3,
            "seed": 0,
            "verbose": False,
        },
        "saes": [
            {"architecture": "adaptivek", **SAE_BLOCKS["adaptivek"]},
            {"architecture": "softsae", **SAE_BLOCKS["softsae"]},
        ],
        "baselines": {"architecture": "topk"},
        "eval": {"n_batches": 2, "batch_size_prompts": 4},
    }
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"layers": []}, "'layers'"),
        ({"hook": "blocks.0.hook_resid_post"}, "'hook'"),
        ({"d_sae": 0}, "'d_sae'"),
        ({"release": "bad name"}, "'release'"),
        ({"repo_id": "no-namespace"}, "'repo_id'"),
        ({"saes": [{"architecture": "topk"}, {"architecture": "topk"}]}, r"'saes\[1\].name'"),
        ({"baselines": {"k": [0]}}, "'baselines.k'"),
        ({"neuronpedia": "{model_id}/{nope}"}, "'neuronpedia'"),
        ({"neuronpedia": "{model_id}"}, "same id"),
        ({"runner": {"hook_name": "x"}}, "'runner.hook_name'"),
        ({"eval": {"n_batches": 0}}, "'n_batches'"),
        ({"tokens": 5}, "'tokens' is not a release spec field"),
    ],
)
def test_spec_errors_name_the_field(local, changes, field):
    with pytest.raises(ReleaseSpecError, match=field):
        check_spec(_spec(local, **changes), "s.yaml")


def test_spec_training_config_errors_name_the_sae_field(local, tmp_path, capsys):
    spec = _spec(local, saes=[{"architecture": "softsae", "k": 4, "k_maxx": 8}])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["release", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "saes entry 'softsae'" in err and "'sae.k_maxx'" in err
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_example_release_specs_validate():
    """The shipped SmolLM2 specs build every training config (field names stay in step)."""
    from sae_adaptive_plugin.hub.release_spec import load_spec

    examples = Path(__file__).resolve().parent.parent / "examples" / "release"
    specs = {p.name: load_spec(p) for p in sorted(examples.glob("*.yaml"))}
    assert set(specs) == {"smollm2_cpu.yaml", "smollm2_gpu.yaml"}
    for spec in specs.values():
        assert spec.d_in == 576 and spec.model.endswith(".gguf")
        assert {"adaptivek", "softsae"} <= {p.architecture for p in spec.first_stage()}
    assert len(specs["smollm2_cpu.yaml"].layers) == 2
    assert specs["smollm2_cpu.yaml"].runner["device"] == "cpu"
    assert specs["smollm2_gpu.yaml"].runner["device"] == "cuda"


def _state_hashes(sae) -> dict[str, str]:
    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in sae.state_dict().items()}


_LOAD_BY_NAME = textwrap.dedent(
    """
    import hashlib, json, re, sys
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    built_at_import = get_pretrained_saes_directory.cache_info().currsize
    release = sys.argv[1]
    # SAEBench's selection: regex over release names and SAE ids of the directory
    selected = [
        (r, i) for r, lookup in get_pretrained_saes_directory().items()
        if re.fullmatch(r"tiny-adaptive.*", r) for i in lookup.saes_map if re.fullmatch(r".*", i)
    ]
    lookup = get_pretrained_saes_directory()[release]
    out = {"built_at_import": built_at_import, "selected": selected, "saes": {}}
    for _, sae_id in selected:
        sae = SAE.from_pretrained(release, sae_id)
        out["saes"][sae_id] = {
            "state": {k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
                      for k, v in sae.state_dict().items()},
            "neuronpedia_id": sae.cfg.metadata.neuronpedia_id,
            "l0": lookup.expected_l0[sae_id],
            "class": type(sae).__name__,
        }
    print(json.dumps(out))
    """
)

_PLUGIN = textwrap.dedent(
    """
    from pathlib import Path
    from sae_adaptive_plugin.registration import hookimpl
    from sae_adaptive_plugin.registration.releases import read_releases_file

    @hookimpl
    def sae_lens_releases():
        return read_releases_file(Path(__file__).with_name("releases.yaml"))
    """
)


def _install_release_plugin(site: Path, releases_file: Path) -> None:
    """A distribution on ``site`` (found by importlib.metadata on sys.path) whose entry point
    declares the releases of ``releases_file``."""
    site.mkdir()
    (site / "tiny_release_plugin.py").write_text(_PLUGIN)
    (site / "releases.yaml").write_bytes(releases_file.read_bytes())
    dist = site / "tiny_release_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tiny-release-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(
        "[sae_lens.plugins]\ntiny_release = tiny_release_plugin\n"
    )


@pytest.mark.slow
def test_release_build_push_and_load_by_name_in_a_new_interpreter(hub, local, tmp_path, capsys):
    from sae_lens import SAE

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(local)))
    out = tmp_path / "release"
    assert main(["release", str(spec_path), "--out", str(out)]) == 0

    manifest = json.loads((out / "release.json").read_text())
    ids = [s["id"] for s in manifest["saes"]]
    l0 = {s["name"]: s["l0_mean"] for s in manifest["saes"]}
    baselines = sorted({f"topk_k{max(1, round(l0[n]))}" for n in ("adaptivek", "softsae")})
    assert sorted(ids) == sorted(
        f"blocks.0.hook_resid_post/{n}" for n in ["adaptivek", "softsae", *baselines]
    )
    entry = yaml.safe_load((out / "releases.yaml").read_text())[RELEASE]
    assert entry["repo_id"] == REPO and [s["id"] for s in entry["saes"]] == ids
    for sae, item in zip(manifest["saes"], entry["saes"]):
        metrics = json.loads((out / sae["id"] / "eval.json").read_text())
        assert item["l0"] == pytest.approx(metrics["sparsity"]["l0"], abs=1e-4)
        ev = metrics["reconstruction_quality"]["explained_variance"]
        assert item["variance_explained"] == pytest.approx(ev, abs=1e-4)
        assert item["neuronpedia"] == f"tiny-random/post-{sae['name']}"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: saelens" in card
    for sae in manifest["saes"]:
        assert f"| `{sae['id']}` | `{sae['architecture']}` |" in card
        assert f"{sae['explained_variance']:.4f} | {sae['ce_loss_score']:.4f} |" in card

    # a rerun skips every finished SAE and leaves the weights as they are
    weights = {i: (out / i / "sae_weights.safetensors").read_bytes() for i in ids}
    assert build_release(spec_path, out, log=None).trained == []
    assert {i: (out / i / "sae_weights.safetensors").read_bytes() for i in ids} == weights

    # push's checks cover every SAE: one NaN weight and nothing is uploaded
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights_file = broken / ids[-1] / "sae_weights.safetensors"
    state = load_file(str(weights_file))
    state["W_dec"][0, 0] = float("nan")
    save_file(state, str(weights_file))
    assert main(["release", "push", str(broken), "--repo-id", "tester/broken"]) == 2
    assert "NaN" in capsys.readouterr().err and "tester/broken" not in hub.repos

    hub.fail["commit"] = 500  # a failed upload commits nothing and says how to retry
    assert main(["release", "push", str(out), "--repo-id", REPO]) == 1
    assert (
        f"Retry with: sae-adaptive release push {out} --repo-id {REPO}" in capsys.readouterr().err
    )
    del hub.fail["commit"]
    assert main(["release", "push", str(out), "--repo-id", REPO]) == 0
    repo = hub.repos[REPO]
    assert len(repo.commits) == 2  # the repo's initial commit and one upload
    uploaded = repo.resolve("main").files
    for i in ids:
        assert {f"{i}/cfg.json", f"{i}/sae_weights.safetensors", f"{i}/eval.json"} <= set(uploaded)
    assert {"README.md", "releases.yaml"} <= set(uploaded)

    _install_release_plugin(tmp_path / "site", out / "releases.yaml")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    env.pop("SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD", None)
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_BY_NAME, RELEASE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["built_at_import"] == 0  # importing sae_lens built no directory
    assert sorted(i for _, i in loaded["selected"]) == sorted(ids)
    for sae in manifest["saes"]:
        got = loaded["saes"][sae["id"]]
        assert got["state"] == _state_hashes(SAE.load_from_disk(out / sae["id"]))
        assert got["neuronpedia_id"] == sae["neuronpedia"]
        assert got["l0"] == pytest.approx(sae["l0_mean"], abs=1e-4)


@pytest.mark.slow
def test_an_interrupted_sae_resumes_from_its_latest_checkpoint(local, tmp_path):
    """A SAE whose training stopped after a checkpoint continues from it and ends with the
    uninterrupted run's weights; the release is then complete again."""
    spec = _spec(local, saes=[{"architecture": "topk", "k": 4}], baselines={"matched_l0": False})
    spec["runner"]["n_checkpoints"] = 1
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "release"
    build_release(spec_path, out, log=None)
    sae_id = "blocks.0.hook_resid_post/topk"
    weights = (out / sae_id / "sae_weights.safetensors").read_bytes()
    (checkpoint,) = (out / ".work" / sae_id / "checkpoints").glob("*/*")
    assert 0 < int(checkpoint.name) < spec["training_tokens"]

    shutil.rmtree(out / sae_id)  # as if stopped after the checkpoint
    shutil.rmtree(out / ".work" / sae_id / "final")
    said: list[str] = []
    result = build_release(spec_path, out, log=said.append)
    assert result.trained == [sae_id]
    assert f"{sae_id}: resuming from {checkpoint}" in said
    assert (out / sae_id / "sae_weights.safetensors").read_bytes() == weights
    assert (out / sae_id / "eval.json").is_file()
