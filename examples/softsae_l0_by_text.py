"""Mean L0 (and mean k̂, for SoftSAE) of a saved SAE on cached activation files.

Reads the ``acts`` tensor of each ``compare --lm`` activation cache (safetensors) given, first
``--rows`` rows, and prints the SAE's mean L0 on it: e.g. the training text against the held-out
text, to see whether a variable-k SAE gives one text more latents than the other::

    python examples/softsae_l0_by_text.py runs/compare_lm/saes/softsae \\
        runs/lm_cache/train-*.safetensors runs/lm_cache/heldout-*.safetensors
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sae", help="folder of a saved SAE (SAE.load_from_disk)")
    parser.add_argument("caches", nargs="+", help="activation caches with an 'acts' tensor")
    parser.add_argument("--rows", type=int, default=8192)
    args = parser.parse_args()

    import sae_lens  # noqa: F401  (registers the plugin's architectures)
    import torch
    from sae_lens import SAE
    from safetensors import safe_open

    sae = SAE.load_from_disk(args.sae)
    for path in args.caches:
        with safe_open(path, "pt") as f:
            if "acts" not in f.keys():  # noqa: SIM118  (safe_open has no __contains__)
                raise SystemExit(f"{path}: no 'acts' tensor (keys: {sorted(f.keys())})")
            x = f.get_slice("acts")[: args.rows].float()
        with torch.no_grad():
            l0 = (sae.encode(x) != 0).sum(-1).float().mean()
            line = f"{path}: {x.shape[0]} rows, mean L0 {float(l0):.1f}"
            if hasattr(sae, "estimate_k_from_sae_in"):
                k_hat = sae.estimate_k_from_sae_in(sae.process_sae_in(x)).mean()
                line += f", mean k̂ {float(k_hat):.1f}"
        print(line)


if __name__ == "__main__":
    main()
