"""Test helpers: one SAELens training step, its outputs and parameter gradients, and the check that
two code paths (fused vs plain encode, top-m vs full-sort LapSum) give the same step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput

Step = tuple[Any, dict[str, torch.Tensor]]


def train_step(
    sae: Any,
    x: torch.Tensor,
    step: int = 0,
    dead: torch.Tensor | None = None,
    *,
    is_logging_step: bool = False,
) -> Any:
    """``training_forward_pass`` on ``x`` at ``step`` (no backward): the ``TrainStepOutput``."""
    return sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=dead,
            n_training_steps=step,
            is_logging_step=is_logging_step,
        )
    )


def loss_and_grads(
    sae: Any,
    x: torch.Tensor,
    step: int = 0,
    dead: torch.Tensor | None = None,
    *,
    is_logging_step: bool = False,
) -> Step:
    """``training_forward_pass`` at ``step`` + backward: ``(TrainStepOutput, {param: grad})``."""
    sae.zero_grad(set_to_none=True)
    out = train_step(sae, x, step, dead, is_logging_step=is_logging_step)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    return out, grads


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a dense tensor (a training step's code may come as COO: ``sparse_training_code``)."""
    return t.to_dense() if t.is_sparse else t


def assert_steps_match(
    a: Step,
    b: Step,
    *,
    fields: Iterable[str] = ("sae_out", "feature_acts", "hidden_pre"),
    required_grads: Iterable[str] = ("W_enc", "b_enc", "W_dec", "b_dec"),
    rtol: float = 1e-10,
    atol: float = 1e-12,
    grad_rtol: float = 1e-9,
    grad_atol: float = 1e-12,
) -> None:
    """Same losses (names and values), output ``fields`` and parameter gradients."""
    (o1, g1), (o0, g0) = a, b
    assert set(o1.losses) == set(o0.losses)
    for name in o1.losses:
        torch.testing.assert_close(o1.losses[name], o0.losses[name], rtol=rtol, atol=atol)
    for field in fields:
        torch.testing.assert_close(
            dense(getattr(o1, field)), dense(getattr(o0, field)), rtol=rtol, atol=atol
        )
    assert set(g1) == set(g0) and set(required_grads) <= set(g1)
    for name in g1:
        torch.testing.assert_close(g1[name], g0[name], rtol=grad_rtol, atol=grad_atol, msg=name)
