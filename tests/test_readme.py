"""The README's Python blocks run as written, on the tiny offline model instead of Pythia-70M."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_lm import CONTEXT_SIZE, D_MODEL, HOOK_NAME, tiny_model, tiny_token_dataset

README = Path(__file__).resolve().parents[1] / "README.md"

#: What the test changes in the README's Python so it runs offline in seconds: the model, its hook
#: and width, and the run's size. Every key must occur in the README, or the README changed and
#: this table (and what it claims to test) must follow.
SIZE_SUBSTITUTIONS = {
    "d_in=512, d_sae=8192, k=32": f"d_in={D_MODEL}, d_sae=64, k=4",
    '"pythia-70m-deduped"': '"tiny-random"',
    '"blocks.3.hook_resid_post"': repr(HOOK_NAME),
    "context_size=1024": f"context_size={CONTEXT_SIZE}",
    "training_tokens=2_000_000": "training_tokens=64 * 60",
    "train_batch_size_tokens=4096": "train_batch_size_tokens=64",
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.slow
def test_readme_python_blocks_train_save_and_load(tmp_path, monkeypatch):
    import sae_lens

    blocks = python_blocks(README.read_text())
    assert blocks, "README has no ```python block"
    output = tmp_path / "runs" / "pythia70m_adaptivek"

    class OfflineRunner(sae_lens.LanguageModelSAETrainingRunner):
        """SAELens's runner with the tiny model and a local token dataset in place of the Hub's."""

        def __init__(self, cfg, **kwargs):
            cfg.logger.log_to_wandb = False
            cfg.checkpoint_path = str(tmp_path / "checkpoints")
            super().__init__(
                cfg,
                override_model=tiny_model(),
                override_dataset=tiny_token_dataset(n_rows=1024),
                **kwargs,
            )

    monkeypatch.setattr(sae_lens, "LanguageModelSAETrainingRunner", OfflineRunner)
    monkeypatch.chdir(tmp_path)
    for source in blocks:
        for old, new in SIZE_SUBSTITUTIONS.items():
            if old in source:
                source = source.replace(old, new)
        namespace: dict = {}
        exec(compile(source, str(README), "exec"), namespace)

    joined = "\n".join(blocks)
    missing = [old for old in SIZE_SUBSTITUTIONS if old not in joined]
    assert not missing, f"README no longer contains {missing}: update SIZE_SUBSTITUTIONS"
    assert (output / "cfg.json").is_file() and (output / "sae_weights.safetensors").is_file()
    sae = namespace["sae"]
    assert sae.cfg.architecture() == "adaptivek"
    assert (sae.cfg.k_min, sae.cfg.k_max) == (1, 16)  # the defaults README promises for k = 4
