"""``sae-adaptive train`` under torchrun: 2 CPU ranks (gloo) against 1 process on the same global
batch, for SAELens's TopK, BatchTopK and Matryoshka and the three adaptive architectures, and a
2-rank resume.

The 2-rank runs read a token dataset in contiguous halves (rank 0 the first, rank 1 the second),
so global step ``t`` trains on rank 0's rows ``2t, 2t+1`` followed by rank 1's; the 1-process run
reads a dataset laid out in exactly that order. Activations are served unshuffled
(``activations_mixing_fraction: 0``) and the LLM runs one prompt at a time, so both runs see the
same activations in the same order. All 2-rank jobs run in one ``torchrun`` launch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_lm import CONTEXT_SIZE, D_MODEL, HOOK_NAME, tiny_model, tiny_token_dataset
from tiny_lm import SAE_BLOCKS as TINY_SAE_BLOCKS

from sae_adaptive_plugin.cli import main

pytestmark = pytest.mark.slow

RANKS = 2
BATCH = 64  # global: 4 contexts of 16 tokens, 2 per rank
STEPS = 16
ROWS = 128
ARCHITECTURES = (
    "topk",
    "batchtopk",
    "matryoshka_batchtopk",
    "hierarchical_topk",
    "adaptivek",
    "softsae",
)
#: warm-up switch at step 6 (labels gathered from step 3); soft phase until step 12.
SAE_BLOCKS = {
    **TINY_SAE_BLOCKS,
    "topk": {"k": 4, "normalize_activations": "expected_average_only_in"},
    "batchtopk": {"k": 4},
    "matryoshka_batchtopk": {"k": 4, "matryoshka_widths": [16, 64]},
    # b_dec starts at the global batch's mean: both ranks' rows, as the 1-process run's; rare
    # latents (firing counts of the global batch, a horizon of 4 steps) join AuxK's dead mask
    "hierarchical_topk": {
        **TINY_SAE_BLOCKS["hierarchical_topk"],
        "b_dec_init_method": "mean",
        "auxk_rare_tokens": 64,
    },
}
#: a checkpoint after 5 of 16 steps: AdaptiveK is inside its label-gathering window.
RESUMED = "adaptivek"
TOLERANCE = 1e-5
#: the NaN test's model has a NaN embedding for this token; rank 1 meets it from this shard row.
NAN_TOKEN = 7
NAN_FROM_ROW = 20


def _config(root: Path, tokens: str, out: Path, arch: str, **extra) -> dict:
    return {
        "model_name": str(root / "model"),
        "hook_name": HOOK_NAME,
        "dataset_path": str(root / tokens),
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT_SIZE,
        "prepend_bos": False,
        "training_tokens": BATCH * STEPS,
        "train_batch_size_tokens": BATCH,
        "store_batch_size_prompts": 1,
        "n_batches_in_buffer": 4,
        "activations_mixing_fraction": 0.0,
        "lr": 1e-3,
        "seed": 0,
        "verbose": False,
        "n_checkpoints": 0,
        "n_batches_for_norm_estimate": 2,
        "dead_feature_window": 3,  # latents idle for 3 steps are dead: the AuxK loss runs
        "checkpoint_path": str(out / "checkpoints"),
        "output_path": str(out / "final"),
        "sae": {"architecture": arch, "d_in": D_MODEL, "d_sae": 64, **SAE_BLOCKS[arch]},
        **extra,
    }


def _write(path: Path, cfg: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every architecture trained by 2 ranks (one torchrun launch) and by 1 process; the resumed
    architecture also checkpointed and resumed by 2 ranks."""
    from datasets import Dataset

    from sae_adaptive_plugin.data.local_lm import save_local_model

    root = tmp_path_factory.mktemp("distributed")
    save_local_model(tiny_model(), root / "model")
    rows = tiny_token_dataset(n_rows=ROWS)["input_ids"]
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(root / "tokens"))
    # one process: global batch t = rank 0's 2 rows, then rank 1's 2 rows
    per_rank = BATCH // RANKS // CONTEXT_SIZE
    half = ROWS // RANKS
    merged = []
    for start in range(0, half, per_rank):
        for r in range(RANKS):
            merged += rows[r * half + start : r * half + start + per_rank]
    Dataset.from_dict({"input_ids": merged}).save_to_disk(str(root / "tokens_one_process"))

    jobs = []
    for arch in ARCHITECTURES:
        extra = {"n_checkpoints": 3} if arch == RESUMED else {}
        cfg = _config(root, "tokens", root / "ranks" / arch, arch, **extra)
        jobs.append({"argv": ["train", _write(root / f"ranks_{arch}.yaml", cfg)]})
    resumed_out = root / "ranks_resumed" / "final"
    jobs.append(
        {
            "argv": ["train", "--set", f"output_path={resumed_out}", "--set", "n_checkpoints=0"],
            "resume_from": str(root / "ranks" / RESUMED / "checkpoints"),
        }
    )
    # a global batch that 2 ranks cannot split: refused before anything loads (exit status 2)
    odd = _config(root, "tokens", root / "odd", "topk", train_batch_size_tokens=BATCH + 1)
    jobs.append({"argv": ["train", _write(root / "odd.yaml", odd)], "expect_rc": 2})
    # NaN activations on rank 1 only, from its 11th step: both ranks stop (exit status 1)
    nan_model = tiny_model()
    with torch.no_grad():
        nan_model.W_E[NAN_TOKEN, 0] = float("nan")
    save_local_model(nan_model, root / "nan_model")
    clean = [[NAN_TOKEN + 1 if t == NAN_TOKEN else t for t in row] for row in rows]
    for i in range(half + NAN_FROM_ROW, ROWS):
        clean[i][3] = NAN_TOKEN
    Dataset.from_dict({"input_ids": clean}).save_to_disk(str(root / "nan_tokens"))
    nan = _config(root, "nan_tokens", root / "nan", "hierarchical_topk", n_checkpoints=1)
    nan["model_name"] = str(root / "nan_model")
    jobs.append({"argv": ["train", _write(root / "nan.yaml", nan)], "expect_rc": 1})
    jobs_file = root / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    proc = subprocess.run(
        [*torchrun, f"--nproc-per-node={RANKS}", str(worker), str(jobs_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    (root / "torchrun_stderr.txt").write_text(proc.stderr)

    for arch in ARCHITECTURES:
        cfg = _config(root, "tokens_one_process", root / "single_runs" / arch, arch)
        assert main(["train", _write(root / f"single_{arch}.yaml", cfg)]) == 0
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_two_ranks_match_one_process(runs, arch):
    ranks = _weights(runs / "ranks" / arch / "final")
    single = _weights(runs / "single_runs" / arch / "final")
    diff = _max_difference(ranks, single)
    print(f"{arch}: max |2 ranks - 1 process| = {diff:.3g}")
    assert diff <= TOLERANCE
    # the runs trained: the weights moved away from a fresh SAE's
    assert not torch.equal(ranks["W_dec"], ranks["W_enc"].T)
    # firing statistics cover both ranks' rows: the same dead latents and final-window L0
    meta_ranks = json.loads((runs / "ranks" / arch / "final" / "cfg.json").read_text())["metadata"]
    meta_single = json.loads((runs / "single_runs" / arch / "final" / "cfg.json").read_text())
    assert meta_ranks["num_dead_features"] == meta_single["metadata"]["num_dead_features"]
    window = meta_single["metadata"]["l0_training_window"]
    assert meta_ranks["l0_training_window"] == pytest.approx(window, abs=1e-6)
    # the saved SAE's L0: measured by rank 0 on its own held-out batches after training
    assert meta_ranks["l0_heldout_tokens"] > 0 and meta_ranks["l0"] > 0
    if "threshold" in ranks:  # BatchTopK family: the threshold moved from its start at 0
        assert float(ranks["threshold"].max()) > 0
    if arch == "adaptivek":  # the probe was fitted from both ranks' labels, switch included
        assert float(ranks["probe_fitted"]) == 1.0
        torch.testing.assert_close(ranks["probe_weight"], single["probe_weight"])
        # resample_below: both ranks restarted the same latents as the 1-process run (the
        # weights above agree), from counts summed over the ranks
        resampled = meta_ranks["adaptivek_probe_report"]["resampled_latents"]
        assert resampled > 0
        assert resampled == meta_single["metadata"]["adaptivek_probe_report"]["resampled_latents"]
    if arch == "softsae":  # resample_below: restarts at steps 12 and 14, counts from both ranks
        restarts = meta_ranks["softsae_resampled_latents"]
        assert len(restarts) == 2 and sum(restarts) > 0
        assert restarts == meta_single["metadata"]["softsae_resampled_latents"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_output_folder_with_world_size(runs, arch):
    out = runs / "ranks" / arch
    checkpointed = arch == RESUMED
    assert sorted(p.name for p in out.iterdir()) == (
        ["checkpoints", "final"] if checkpointed else ["final"]
    )
    if checkpointed:  # one run id (rank 0's), each checkpoint with every rank's data state
        (run_id,) = list((out / "checkpoints").iterdir())
        ckpts = list(run_id.iterdir())
        assert len(ckpts) == 3
        for ckpt in ckpts:
            names = {p.name for p in ckpt.iterdir()}
            assert {f"resume_state.rank{r}.safetensors" for r in range(RANKS)} <= names
            assert "sae_weights.safetensors" in names
    meta = json.loads((out / "final" / "cfg.json").read_text())["metadata"]
    assert meta["world_size"] == RANKS
    assert meta["tokens_per_rank"] == [BATCH * STEPS // RANKS] * RANKS


def test_two_rank_resume_matches_uninterrupted(runs):
    resumed = _weights(runs / "ranks_resumed" / "final")
    uninterrupted = _weights(runs / "ranks" / RESUMED / "final")
    diff = _max_difference(resumed, uninterrupted)
    print(f"{RESUMED}: max |2-rank resume - uninterrupted 2-rank| = {diff:.3g}")
    assert diff <= TOLERANCE
    meta = json.loads((runs / "ranks_resumed" / "final" / "cfg.json").read_text())["metadata"]
    assert meta["tokens_per_rank"] == [BATCH * STEPS // RANKS] * RANKS


def test_indivisible_batch_is_refused(runs):
    assert not (runs / "odd").exists()


def test_nan_on_one_rank_stops_both_before_a_save(runs):
    err = (runs / "torchrun_stderr.txt").read_text()
    per_rank = BATCH // RANKS // CONTEXT_SIZE
    # the ranks share one stderr: their lines may run together, so match messages, not lines
    stops = re.findall(r"training stopped at step (\d+) \(\d+ samples trained\): ([^;]*);", err)
    assert len(stops) == RANKS, err[-4000:]  # every rank, at the step that met the NaN rows
    for step, what in stops:
        assert int(step) == NAN_FROM_ROW // per_rank
        assert re.fullmatch(
            r"activation rows hold NaN or Inf \(rank 1: \d+ of 32 rows per rank\)", what
        )
    assert not (runs / "nan" / "final").exists()
    (run_id,) = list((runs / "nan" / "checkpoints").iterdir())
    (kept,) = list(run_id.iterdir())  # the checkpoint before the NaN rows, and nothing after
    assert 0 < int(kept.name) <= NAN_FROM_ROW // per_rank * BATCH


def test_one_process_refuses_a_two_rank_checkpoint(runs, capsys):
    run_dir = next((runs / "ranks" / RESUMED / "checkpoints").iterdir())
    ckpt = min(run_dir.iterdir(), key=lambda p: int(p.name))
    rc = main(["train", "--resume", str(ckpt), "--set", f"output_path={runs / 'refused'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "resume_from_checkpoint" in err and "2 process" in err
    assert not (runs / "refused").exists()
