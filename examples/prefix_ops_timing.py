"""Time the blocked prefix ops (all-prefix errors and block-end errors, forward + backward) of this
checkout against the same file at another commit, in one process, and print the largest relative
difference of their outputs and gradients. Not used by the package (docs/bench.md, issue 23).

    python examples/prefix_ops_timing.py 4ac126c 64 256     # baseline commit, then K values
                                                            # (B 4,096, d 768, F 16,384, one thread)
"""

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae_adaptive_plugin.ops import hierarchical as current

torch.set_num_threads(1)
B, D, F = 4096, 768, 16384
FILE = "sae_adaptive_plugin/ops/hierarchical.py"


def _module_at(commit: str):
    """``ops/hierarchical.py`` as it was at ``commit``, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{commit}:{FILE}"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "hierarchical_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("hierarchical_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time(fn, inputs):
    """CPU seconds of the forward and the backward, and the outputs and gradients."""
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    start = time.process_time()
    out = fn(*leaves, inputs[3])
    middle = time.process_time()
    out.pow(2).mean().backward()
    end = time.process_time()
    return middle - start, end - middle, [out.detach(), *(t.grad for t in leaves)]


def main() -> None:
    baseline = _module_at(sys.argv[1])
    for K in (int(a) for a in sys.argv[2:]):
        g = torch.Generator().manual_seed(0)
        W_dec = torch.randn(F, D, generator=g) / D**0.5
        residual0 = torch.randn(B, D, generator=g)
        indices = torch.randint(0, F, (B, K), generator=g)
        values = torch.rand(B, K, generator=g).sort(-1, descending=True).values
        inputs = (residual0, values, W_dec, indices)
        for name in ("prefix_reconstruction_errors", "block_end_errors"):
            runs = {}
            for label, module in (("baseline", baseline), ("current", current)) * 2:
                runs[label] = _time(getattr(module, name), inputs)  # the second round is kept
            (f0, b0, r0), (f1, b1, r1) = runs["baseline"], runs["current"]
            diff = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(r0, r1))
            print(
                f"K={K} {name}: baseline fwd {f0:.2f} s bwd {b0:.2f} s | "
                f"current fwd {f1:.2f} s bwd {b1:.2f} s | max rel. diff {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
