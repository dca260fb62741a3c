"""The GPU check from a source tree: ``python scripts/gpu_check.py --help`` (``make gpu-check`` runs
it on CUDA; ``--device cpu --tiny`` is the dry run). The code: sae_adaptive_plugin/experiments/gpu_check.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae_adaptive_plugin.experiments.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
