"""Bad input gets a clear error or a NaN, never a silent result; a user's saved files are never lost.

Inference on NaN rows and wrong widths, ``push`` of broken folders (nothing is uploaded),
``fit-probe --out`` / ``compare --out`` onto existing outputs, errors that name the file, plugin
isolation (``sys.exit`` at import, a name clash), and checkpoints read with ``weights_only``.
The ``train`` cases are in ``test_bad_input_train.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from sae_lens import registry
from safetensors.torch import save_file
from test_hub import D_IN, random_sae
from test_loader import _DemoConfig, _DemoSAE, _module_plugin

from sae_adaptive_plugin.cli import main
from sae_adaptive_plugin.registration import loader
from sae_adaptive_plugin.registration.hookspecs import Architecture
from sae_adaptive_plugin.saes.input_checks import K_NOT_FINITE

OURS = ("adaptivek", "softsae", "hierarchical_topk")
K_RANGE = {
    "adaptivek": ("k_min", "k_max"),
    "softsae": (1, "k_max"),
    "hierarchical_topk": ("k", "k"),
}


def _both_halves(arch: str):
    """The inference SAE and the training SAE of ``arch``, random weights, d_in = D_IN."""
    from test_hub import random_training_sae

    return random_sae(arch), random_training_sae(arch)


# ------------------------------------------------------------------------------------------------
# inference: NaN rows and input width
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", OURS)
def test_a_nan_row_gives_a_nan_output_and_k_is_marked(arch):
    for sae in _both_halves(arch):
        x = torch.randn(6, D_IN)
        x[1, 2] = float("nan")
        x[4, 0] = float("inf")
        with torch.no_grad():
            out = sae(x)
            clean = sae(x[[0, 2, 3, 5]])
        assert out.isnan().any(-1).tolist() == [False, True, False, False, True, False]
        torch.testing.assert_close(out[[0, 2, 3, 5]], clean)
        k = sae.k_per_sample(x)
        assert k.dtype == torch.long
        assert k[1] == K_NOT_FINITE and k[4] == K_NOT_FINITE
        lo, hi = (v if isinstance(v, int) else getattr(sae.cfg, v) for v in K_RANGE[arch])
        good = k[[0, 2, 3, 5]]
        assert ((good >= lo) & (good <= hi)).all(), good


@pytest.mark.parametrize("arch", OURS)
@pytest.mark.parametrize("width", [1, D_IN - 1, D_IN + 1])
def test_a_wrong_input_width_names_both_widths(arch, width):
    for sae in _both_halves(arch):
        x = torch.randn(3, width)
        message = f"{arch} SAE: input width {width} (input shape (3, {width})) does not match "
        message += f"the SAE's d_in={D_IN}"
        for call in (sae, sae.encode, sae.k_per_sample):
            with pytest.raises(ValueError, match=re.escape(message)):
                call(x)


def test_width_is_checked_after_hook_z_reshaping():
    sae = random_sae("hierarchical_topk")
    sae.cfg.metadata.hook_name = "blocks.0.attn.hook_z"
    sae.d_head = 4
    sae.turn_on_forward_pass_hook_z_reshaping()
    good = torch.randn(2, 3, D_IN // 4, 4)
    assert sae(good).shape == good.shape
    with pytest.raises(ValueError, match=r"after hook_z reshaping .* d_in=" + str(D_IN)):
        sae(torch.randn(2, 3, D_IN // 4 + 1, 4))


# ------------------------------------------------------------------------------------------------
# push: the folder is loaded first, nothing is uploaded otherwise
# ------------------------------------------------------------------------------------------------


def _saved(tmp_path: Path, arch: str = "adaptivek") -> Path:
    folder = tmp_path / arch
    random_sae(arch).save_model(str(folder))
    return folder


def _break_truncated(folder: Path) -> str:
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    return "not a readable safetensors file (truncated or in another format)"


def _break_pickled(folder: Path) -> str:
    import pickle

    (folder / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": [1.0]}))
    return "not a readable safetensors file (truncated or in another format)"


def _break_nan(folder: Path) -> str:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights["W_dec"][3, 1] = float("nan")
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return "tensor 'W_dec' holds 1 NaN/Inf values"


def _break_missing_tensor(folder: Path) -> str:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    del weights["b_enc"]
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return "do not make an SAE"


def _break_cfg_json(folder: Path) -> str:
    (folder / "cfg.json").write_text('{"architecture": "adaptivek", "d_in": ')
    return "cfg.json is not valid JSON"


def _break_architecture(folder: Path) -> str:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = "no_such_arch"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return "names architecture 'no_such_arch', which SAELens does not know (known: "


@pytest.mark.parametrize(
    "damage",
    [
        _break_truncated,
        _break_pickled,
        _break_nan,
        _break_missing_tensor,
        _break_cfg_json,
        _break_architecture,
    ],
)
def test_push_refuses_a_broken_folder_and_uploads_nothing(
    damage,
    hub: HubServer,
    tmp_path,
    capsys,
):
    folder = _saved(tmp_path)
    message = damage(folder)
    rc = main(["push", str(folder), "--repo-id", "me/saes", "--sae-id", "layer0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert str(folder) in err
    assert hub.repos == {}


def test_loading_a_broken_folder_names_the_file(tmp_path):
    from sae_adaptive_plugin.hub import load_sae_folder

    folder = _saved(tmp_path)
    _break_truncated(folder)
    with pytest.raises(ValueError, match=re.escape(str(folder / "sae_weights.safetensors"))):
        load_sae_folder(folder)
    folder = _saved(tmp_path / "b")
    _break_cfg_json(folder)
    with pytest.raises(ValueError, match=re.escape(str(folder / "cfg.json"))):
        load_sae_folder(folder)


# ------------------------------------------------------------------------------------------------
# unknown architectures name the registered ones and the package
# ------------------------------------------------------------------------------------------------


def test_unknown_architecture_of_ours_names_the_package_and_the_opt_out(monkeypatch):
    from sae_adaptive_plugin.hub import UnknownArchitectureError, check_architecture

    monkeypatch.setattr(registry, "SAE_CLASS_REGISTRY", dict(registry.SAE_CLASS_REGISTRY))
    registry.SAE_CLASS_REGISTRY.pop("softsae")
    monkeypatch.setattr(loader, "load_plugins", lambda **_: [])
    monkeypatch.setenv("SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD", "1")
    with pytest.raises(UnknownArchitectureError) as info:
        check_architecture({"architecture": "softsae"}, source="x/cfg.json")
    message = str(info.value)
    assert "x/cfg.json names architecture 'softsae'" in message
    assert "known: " in message and "topk" in message
    assert "`pip install sae-adaptive-plugin`" in message
    assert "autoload disabled by SAE_ADAPTIVE_PLUGIN_NO_AUTOLOAD=1" in message


def test_train_config_with_an_unknown_architecture_lists_the_registered_ones():
    from sae_adaptive_plugin.training import ConfigError, build_runner_config

    with pytest.raises(ConfigError) as info:
        build_runner_config({"sae": {"architecture": "softsea", "d_in": 4, "d_sae": 8}})
    message = str(info.value)
    assert "unknown architecture 'softsea'" in message
    assert all(name in message for name in (*OURS, "topk", "batchtopk"))


def test_resume_from_a_checkpoint_with_a_corrupt_runner_cfg_names_the_file(tmp_path, capsys):
    (tmp_path / "runner_cfg.json").write_text('{"sae": {"architecture": ')
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert f"{tmp_path / 'runner_cfg.json'} is not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# never overwrite silently: fit-probe --out, compare --out
# ------------------------------------------------------------------------------------------------


def test_fit_probe_refuses_an_existing_out_file_before_any_work(tmp_path, capsys):
    out = tmp_path / "sae_weights.safetensors"
    out.write_bytes(b"precious")
    args = ["fit-probe", "--model", str(tmp_path / "no-model"), "--hook", "h"]
    args += ["--dataset", str(tmp_path / "no-data.jsonl"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"--out {out}: the file already exists; refusing to overwrite it. Pass --overwrite" in err
    )
    assert out.read_bytes() == b"precious"


def test_eval_refuses_an_existing_json_before_any_work(tmp_path, capsys):
    out = tmp_path / "eval.json"
    out.write_text("precious")
    assert main(["eval", str(tmp_path / "no-sae"), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--json {out}: the file already exists; refusing to overwrite it." in err
    assert out.read_text() == "precious"


def test_replacing_file_keeps_the_old_file_when_the_write_fails(tmp_path):
    from sae_adaptive_plugin.outputs import replacing_file

    target = tmp_path / "probe.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), replacing_file(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.safetensors"]
    with replacing_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.safetensors"]


def test_compare_refuses_an_existing_results_folder_and_owns_it_with_overwrite(tmp_path, capsys):
    out = tmp_path / "compare"
    (out / "saes" / "batchtopk").mkdir(parents=True)
    (out / "saes" / "batchtopk" / "cfg.json").write_text("{}")
    (out / "results.json").write_text('{"old": true}')
    base = ["compare", "--quick", "--out", str(out), "--threads", "1", "--architectures", "topk"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: the folder already exists; refusing to overwrite it" in err
    assert (out / "results.json").read_text() == '{"old": true}'

    assert main([*base, "--overwrite", "--steps", "5"]) == 0
    assert "old" not in json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in (out / "saes").iterdir()) == ["topk"]
    assert [p.name for p in tmp_path.iterdir()] == ["compare"]


# ------------------------------------------------------------------------------------------------
# plugin isolation
# ------------------------------------------------------------------------------------------------


def test_a_plugin_calling_sys_exit_at_import_is_reported_and_skipped(
    isolated,
    tmp_path,
    monkeypatch,
):
    (tmp_path / "_fake_sae_plugin_exits.py").write_text("import sys\n\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = _module_plugin("good", [Architecture("demo_arch", _DemoSAE, _DemoConfig)])
    isolated({"exits": None, "good": good})
    reports = {r.name: r for r in loader.load_plugins()}
    assert reports["exits"].error == "SystemExit: the plugin called sys.exit(3) while loading"
    assert reports["good"].ok and "demo_arch" in registry.SAE_CLASS_REGISTRY


def test_a_name_clash_skips_only_the_clashing_architecture(isolated):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    class _TopKThief(TopKSAE):
        pass

    class _TopKThiefConfig(TopKSAEConfig):  # architecture() is "topk", taken by SAELens
        pass

    taken = registry.SAE_CLASS_REGISTRY["topk"]
    thief = _module_plugin(
        "thief",
        [
            Architecture("topk", _TopKThief, _TopKThiefConfig),
            Architecture("demo_arch", _DemoSAE, _DemoConfig),
        ],
    )
    isolated({"thief": thief})
    (report,) = loader.load_plugins()
    assert report.architectures == ["demo_arch"]
    assert "ArchitectureClashError: SAELens inference architecture 'topk'" in (report.error or "")
    assert "Registered the plugin's other architectures: demo_arch." in (report.error or "")
    assert registry.SAE_CLASS_REGISTRY["topk"] == taken
    assert registry.SAE_CLASS_REGISTRY["demo_arch"] == (_DemoSAE, _DemoConfig)


# ------------------------------------------------------------------------------------------------
# only safetensors and JSON (and weights-only torch pickles) are read from disk
# ------------------------------------------------------------------------------------------------


def test_every_torch_load_is_weights_only():
    root = Path(__file__).resolve().parents[1] / "sae_adaptive_plugin"
    calls = [
        (path.name, line.strip())
        for path in root.rglob("*.py")
        for line in path.read_text().splitlines()
        if "torch.load(" in line
    ]
    assert calls, "expected the checkpoint reader in training.py"
    assert [c for c in calls if "weights_only=True" not in c[1]] == []
