"""SAELens's own training CLI (``python -m sae_lens.llm_sae_training_runner --architecture ...``)
offers this package's architectures, because its choices come from the registry we fill."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sae_lens.llm_sae_training_runner import _parse_cfg_args

from sae_adaptive_plugin.registration import plugin

OURS = sorted(arch.name for arch in plugin.sae_lens_architectures())


@pytest.mark.parametrize("name", OURS)
def test_sae_lens_cli_parses_our_architecture(name: str) -> None:
    args = ["--architecture", name, "--model_name", "tiny", "--dataset_path", "local"]
    cfg = _parse_cfg_args([*args, "--d_in", "64", "--k", "16"])
    assert type(cfg.sae).architecture() == name
    assert type(cfg.sae).__module__.startswith("sae_adaptive_plugin.saes.")
    assert cfg.sae.d_in == 64 and cfg.sae.k == 16


@pytest.mark.parametrize("name", ["adaptivek", "softsae"])
def test_sae_lens_cli_refuses_an_adaptive_sae_without_its_target_k(name: str) -> None:
    args = ["--architecture", name, "--model_name", "tiny", "--dataset_path", "local"]
    with pytest.raises(ValueError, match=f"{name}: k is not set"):
        _parse_cfg_args([*args, "--d_in", "64"])


@pytest.mark.slow
def test_sae_lens_cli_help_lists_our_architectures_in_a_fresh_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sae_lens.llm_sae_training_runner", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for name in OURS:
        assert name in proc.stdout
