"""``sae-adaptive train`` on bad input: exact resume, NaN/Inf batches, existing outputs, configs.

Runs the command in-process on the tiny local model of the ``local`` fixture (conftest).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import BATCH, STEPS, train_config, write_yaml

from sae_adaptive_plugin.cli import main

ARCHITECTURES = ("topk", "adaptivek", "softsae", "hierarchical_topk")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resume_from_any_checkpoint_ends_with_the_uninterrupted_weights(arch, tmp_path, local):
    """Two mid-run checkpoints (SAELens stores n_training_steps one behind in them, and keeps
    no mixing buffer): resuming from each ends where the uninterrupted run ends."""
    cfg = train_config(local, tmp_path / "full", arch)
    cfg["n_checkpoints"] = 2
    cfg_path = write_yaml(tmp_path / "full.yaml", cfg)
    assert main(["train", str(cfg_path)]) == 0
    full = _weights(tmp_path / "full" / "final")
    ckpts = sorted(
        (p for p in (tmp_path / "full" / "checkpoints").glob("*/*") if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    assert [int(p.name) for p in ckpts] == [6 * BATCH, 11 * BATCH]
    for ckpt in ckpts:
        resumed_out = tmp_path / f"resumed_{ckpt.name}"
        rc = main(
            [
                "train",
                str(cfg_path),
                "--resume",
                str(ckpt),
                "--set",
                f"output_path={resumed_out}",
                "--set",
                f"checkpoint_path={tmp_path / 'resumed_ckpts'}",
            ]
        )
        assert rc == 0
        resumed = _weights(resumed_out)
        assert set(resumed) == set(full)
        for name, value in full.items():
            torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def _nan_model_and_data(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny model with a NaN in its embedding of token 7, and a token dataset holding token 7
    only from row 48 on: activations are finite for the first 11 steps (both checkpoints of
    ``n_checkpoints=2`` are written), then NaN rows come."""
    from tiny_lm import tiny_model, tiny_token_dataset

    from sae_adaptive_plugin.data.local_lm import save_local_model

    model = tiny_model()
    with torch.no_grad():
        model.W_E[7, 0] = float("nan")
    save_local_model(model, tmp_path / "nan_model")
    rows = tiny_token_dataset(n_rows=128)["input_ids"]
    rows = [[8 if (t == 7 and i < 48) else t for t in row] for i, row in enumerate(rows)]
    rows[48][3] = 7
    from datasets import Dataset

    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "nan_tokens"))
    return tmp_path / "nan_model", tmp_path / "nan_tokens"


@pytest.mark.parametrize("arch", ("softsae", "hierarchical_topk"))
def test_nan_activations_stop_training_with_the_step_and_the_kept_checkpoint(
    arch,
    tmp_path,
    local,
    capsys,
):
    model, tokens = _nan_model_and_data(tmp_path)
    cfg = train_config(local, tmp_path / arch, arch)
    cfg.update(model_name=str(model), dataset_path=str(tokens), n_checkpoints=2)
    cfg_path = write_yaml(tmp_path / f"{arch}.yaml", cfg)
    rc = main(["train", str(cfg_path)])
    err = capsys.readouterr().err
    assert rc == 1
    match = re.search(r"training stopped at step (\d+) \((\d+) samples trained\)", err)
    assert match, err
    assert 11 <= int(match[1]) < STEPS and int(match[2]) == int(match[1]) * BATCH
    assert re.search(r"\d+ of 64 activation rows hold NaN or Inf", err)
    (ckpt,) = (tmp_path / arch / "checkpoints").glob(f"*/{11 * BATCH}")
    assert f"the last good checkpoint is kept: {ckpt} (resume with --resume)" in err
    assert torch.isfinite(_weights(ckpt)["W_enc"]).all()
    assert not (tmp_path / arch / "final").exists()


def test_train_refuses_an_output_path_holding_a_saved_sae(tmp_path, local, capsys):
    cfg_path = write_yaml(tmp_path / "c.yaml", train_config(local, tmp_path / "run", "topk"))
    assert main(["train", str(cfg_path)]) == 0
    final = tmp_path / "run" / "final"
    before = _weights(final)
    capsys.readouterr()
    assert main(["train", str(cfg_path), "--set", "lr=1e-2"]) == 2
    err = capsys.readouterr().err
    assert f"output_path {final}: the folder already exists" in err and "--overwrite" in err
    torch.testing.assert_close(_weights(final), before, rtol=0, atol=0)

    (final / "stale.txt").write_text("from an earlier run")
    assert main(["train", str(cfg_path), "--set", "lr=1e-2", "--overwrite"]) == 0
    after = _weights(final)
    assert not torch.equal(after["W_enc"], before["W_enc"])
    assert not (final / "stale.txt").exists()
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".")] == []


def test_an_interrupted_overwrite_leaves_the_old_sae_whole(tmp_path, local, monkeypatch):
    from sae_lens import LanguageModelSAETrainingRunner

    cfg_path = write_yaml(tmp_path / "c.yaml", train_config(local, tmp_path / "run", "topk"))
    assert main(["train", str(cfg_path)]) == 0
    final = tmp_path / "run" / "final"
    before = _weights(final)

    def crash(self, sae, output_path, log_feature_sparsity=None):
        Path(output_path, "sae_weights.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(LanguageModelSAETrainingRunner, "save_final_sae", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(cfg_path), "--set", "lr=1e-2", "--overwrite"])
    torch.testing.assert_close(_weights(final), before, rtol=0, atol=0)
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training_tokens=0", "config key 'training_tokens': must be an integer > 0, got 0"),
        ("training_tokens=-64", "config key 'training_tokens': must be an integer > 0, got -64"),
        ("lr=.nan", "config key 'lr': must be a finite number > 0, got nan"),
        ("lr=0", "config key 'lr': must be a finite number > 0, got 0.0"),
        ("sae.d_in=0", "config key 'sae.d_in': must be an integer > 0, got 0"),
        ("sae.d_sae=-1", "config key 'sae.d_sae': must be an integer > 0, got -1"),
    ],
)
def test_values_that_defeat_training_are_config_errors(override, message, tmp_path, local, capsys):
    cfg_path = write_yaml(tmp_path / "c.yaml", train_config(local, tmp_path / "run", "softsae"))
    assert main(["train", str(cfg_path), "--set", override, "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_cuda_device_without_cuda_is_named(tmp_path, local, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg_path = write_yaml(tmp_path / "c.yaml", train_config(local, tmp_path / "run", "topk"))
    assert main(["train", str(cfg_path), "--set", "device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "config key 'device': device 'cuda' is not available" in err
    assert "use 'cpu'" in err


def test_empty_dataset_and_folder_as_config_are_named(tmp_path, local, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty_file = tmp_path / "empty.jsonl"
    empty_file.write_text("")
    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([], type=pa.list_(pa.int64()))}), no_rows)
    for dataset, message in (
        (empty_file, "the file is empty (it has no rows)"),
        (no_rows, "could not be read as parquet"),
    ):
        cfg = train_config(local, tmp_path / "run", "topk")
        cfg["dataset_path"] = str(dataset)
        cfg_path = write_yaml(tmp_path / "c.yaml", cfg)
        assert main(["train", str(cfg_path)]) == 2
        assert f"config key 'dataset_path': dataset {dataset}: {message}" in capsys.readouterr().err

    assert main(["train", str(tmp_path)]) == 2
    assert f"CONFIG {tmp_path} is a folder, not a YAML file" in capsys.readouterr().err


def test_nan_is_not_a_finite_lr_in_python_either():
    from sae_adaptive_plugin.training.config import ConfigError, _check_ranges

    with pytest.raises(ConfigError, match="'lr'"):
        _check_ranges("", {"lr": math.nan})
