"""Training throughput of ``sae-adaptive train`` in one process or under torchrun (a functional
check of data parallelism, not a benchmark).

Rank 0 writes a random 2-layer model (d_model 128) in the local format and a random token dataset
under ``--out``, then every rank trains the same config (a TopK SAE, d_sae 2048, k 32, global
batch 1024 tokens) through :func:`sae_adaptive_plugin.training.train_from_yaml`. Rank 0 prints one
JSON line: processes, tokens, seconds of ``train_from_yaml`` (model load and data set-up
included) and tokens per second.

Usage::

    python examples/distributed_throughput.py --out runs/throughput
    torchrun --standalone --nproc-per-node 2 examples/distributed_throughput.py --out runs/throughput
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from sae_adaptive_plugin import distributed

CONTEXT = 64
D_MODEL = 128
VOCAB = 1000


def _prepare(out: Path, n_rows: int) -> None:
    from datasets import Dataset
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from sae_adaptive_plugin.data.local_lm import save_local_model

    if (out / "tokens").is_dir():
        return
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_ctx=CONTEXT,
        d_head=32,
        n_heads=4,
        d_mlp=4 * D_MODEL,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        device="cpu",
    )
    save_local_model(HookedTransformer(cfg), out / "model")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (n_rows, CONTEXT), generator=g)
    Dataset.from_dict({"input_ids": tokens.tolist()}).save_to_disk(str(out / "tokens"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/throughput"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = distributed.init_from_env(cuda=False)  # the config trains on the CPU
    batch = 1024
    if distributed.is_main():
        _prepare(args.out, n_rows=args.steps * batch // CONTEXT + 64)
    distributed.barrier()
    config = {
        "model_name": str(args.out / "model"),
        "hook_name": "blocks.1.hook_resid_post",
        "dataset_path": str(args.out / "tokens"),
        "is_dataset_tokenized": True,
        "streaming": False,
        "context_size": CONTEXT,
        "prepend_bos": False,
        "training_tokens": batch * args.steps,
        "train_batch_size_tokens": batch,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 32,
        "lr": 3e-4,
        "seed": 0,
        "verbose": False,
        "n_checkpoints": 0,
        "checkpoint_path": None,
        "output_path": str(args.out / f"sae_{env.world_size}proc"),
        "sae": {"architecture": "topk", "d_in": D_MODEL, "d_sae": 2048, "k": 32},
    }
    config_file = args.out / f"config_{env.world_size}proc_rank{env.rank}.yaml"
    config_file.write_text(yaml.safe_dump(config))

    from sae_adaptive_plugin.training import train_from_yaml

    distributed.barrier()
    start = time.perf_counter()
    train_from_yaml(config_file, overwrite=True)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        tokens = batch * args.steps
        print(
            json.dumps(
                {
                    "processes": env.world_size,
                    "threads_per_process": args.threads,
                    "tokens": tokens,
                    "seconds": round(seconds, 2),
                    "tokens_per_second": round(tokens / seconds),
                }
            )
        )


if __name__ == "__main__":
    main()
