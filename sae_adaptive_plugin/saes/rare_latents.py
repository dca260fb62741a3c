"""``auxk_rare_tokens``: AuxK also trains latents that fire less than once per N tokens.

SAELens's trainer marks a latent dead (its AuxK loss trains the dead latents toward the residual)
only when it fired on no token of its dead-feature window, so one firing keeps a latent "alive".
With ``auxk_rare_tokens = N`` a latent also counts as dead when its firing rate is below ``1/N``,
the rate being a moving estimate over the last ``RARE_HORIZON · N`` training tokens: decayed
counts ``f_j ← e^{−T/H} f_j + c_j`` and ``t ← e^{−T/H} t + T`` for a step of ``T`` tokens in which
latent ``j`` fired ``c_j`` times (``H = RARE_HORIZON · N``), rare when ``f_j / t < 1/N``. No
latent is rare before ``H`` tokens. Under data parallelism the counts are the global batch's.
The estimate is training state only: it is not saved, and a resumed run starts it again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput

from sae_adaptive_plugin.distributed import all_reduce_, is_distributed, world_size

#: The firing-rate estimate looks back over this many times ``auxk_rare_tokens`` tokens.
RARE_HORIZON = 4


def firing_counts(feature_acts: torch.Tensor) -> torch.Tensor:
    """How many rows each latent fired on: ``[..., d_sae]`` code (dense or COO) → ``[d_sae]``."""
    d_sae = feature_acts.shape[-1]
    if feature_acts.is_sparse:
        feature_acts = feature_acts.to_dense()
    return (feature_acts.reshape(-1, d_sae) != 0).sum(0)


class RareLatents:
    """One training SAE's ``auxk_rare_tokens`` criterion (module docstring): :meth:`record`
    counts a step's firings, :meth:`step_input` adds the latents now rare to SAELens's dead
    mask."""

    def __init__(self, every_tokens: int):
        self.every_tokens = every_tokens
        self.horizon = RARE_HORIZON * every_tokens
        self.fires: torch.Tensor | None = None  # [d_sae] float32, decayed counts
        self.tokens = 0.0  # decayed token count
        self.seen = 0  # tokens counted so far

    def rare(self) -> torch.Tensor | None:
        """Bool ``[d_sae]``: latents firing less than once per ``every_tokens`` tokens
        (``None`` until ``horizon`` tokens were counted)."""
        if self.fires is None or self.seen < self.horizon:
            return None
        return self.fires < self.tokens / self.every_tokens

    @torch.no_grad()
    def record(self, counts: torch.Tensor, tokens: int) -> None:
        """Count one step: ``counts[j]`` firings of latent ``j`` over ``tokens`` tokens (this
        rank's; summed over ranks here)."""
        counts = counts.float()
        if is_distributed():
            counts = all_reduce_(counts.clone())
            tokens *= world_size()
        decay = math.exp(-tokens / self.horizon)
        if self.fires is None:
            self.fires = torch.zeros_like(counts)
        self.fires.mul_(decay).add_(counts)
        self.tokens = self.tokens * decay + tokens
        self.seen += tokens

    def step_input(self, step_input: TrainStepInput) -> TrainStepInput:
        """``step_input`` with its ``dead_neuron_mask`` OR the latents now rare."""
        rare = self.rare()
        if rare is None:
            return step_input
        dead = step_input.dead_neuron_mask
        mask = rare if dead is None else dead.bool() | rare.to(dead.device)
        return dataclasses.replace(step_input, dead_neuron_mask=mask)


def rare_latents_of(sae: Any) -> RareLatents | None:
    """The SAE's :class:`RareLatents` when its config sets ``auxk_rare_tokens`` (made on first
    use and kept on the SAE), else ``None``."""
    every = getattr(sae.cfg, "auxk_rare_tokens", None)
    if every is None:
        return None
    tracker = getattr(sae, "_rare_latents", None)
    if tracker is None or tracker.every_tokens != every:
        tracker = RareLatents(every)
        sae._rare_latents = tracker
    return tracker
