"""Time a training step with AuxK on the CPU by either of its two paths, bags of the chosen dead
latents or matmuls over every dead column (``topk_family.AUXK_DENSE_RATIO``), for a range of dead
counts at the d_in 576 end-to-end shape (d_sae 4,608, k 32, batch 1,024, one thread). Not used by
the package (docs/bench.md, issue 23, round 8: where the two paths cross).

    python examples/auxk_path_timing.py hierarchical_topk 1200,2000,2500,3200,3900
    python examples/auxk_path_timing.py adaptivek 2500,3200,3500,3900

Prints the CPU ms of a step without AuxK, with the bag path (ratio 0) and with the dense path
(ratio 1000); the minimum over 3 rounds of 2 steps each.
"""

import sys
import time

import torch
from sae_lens.saes.sae import TrainStepInput

from sae_adaptive_plugin.experiments.registry_saes import build_training_sae
from sae_adaptive_plugin.saes import topk_family


def main() -> None:
    architecture, counts = sys.argv[1], [int(c) for c in sys.argv[2].split(",")]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sae = build_training_sae(architecture, {"k": 32}, {}, d_in=576, d_sae=4608)
    if hasattr(sae, "bind_run_length"):
        sae.bind_run_length(10**6)
    x = torch.randn(1024, 576)

    def step(dead: torch.Tensor | None) -> None:
        sae.zero_grad(set_to_none=True)
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={},
                dead_neuron_mask=dead,
                n_training_steps=5,
                is_logging_step=False,
            )
        )
        out.loss.backward()

    def timed(dead: torch.Tensor | None, steps: int) -> float:
        step(dead)
        start = time.process_time()
        for _ in range(steps):
            step(dead)
        return (time.process_time() - start) / steps

    for n_dead in counts:
        dead = torch.zeros(4608, dtype=torch.bool)
        dead[torch.randperm(4608)[:n_dead]] = True
        times: dict[int, list[float]] = {}
        for _ in range(3):
            for ratio in (0, 1000):
                topk_family.AUXK_DENSE_RATIO = ratio
                times.setdefault(ratio, []).append(timed(dead, 2))
        none = min(timed(None, 1) for _ in range(3))
        print(
            f"{architecture} {n_dead} dead: no AuxK {1000 * none:.0f} ms, "
            f"bags {1000 * min(times[0]):.0f} ms, dense columns {1000 * min(times[1000]):.0f} ms"
        )


if __name__ == "__main__":
    main()
