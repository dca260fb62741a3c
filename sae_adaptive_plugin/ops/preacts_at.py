"""Encoder pre-activations at chosen latents, with a backward that touches only those latents.

``preacts_at(sae_in, W_enc, b_enc, indices, values, scale)`` is ``hidden_pre.gather(-1, indices)``
for ``hidden_pre = (sae_in @ W_enc + b_enc) · scale``, given those values already computed
(``values``, detached). Its gradient reaches ``sae_in``, ``W_enc``, ``b_enc`` and ``scale`` from the
``N·m`` chosen slots only: an ``embedding_bag`` over ``W_encᵀ`` and index-adds, never a dense
``[N, d_sae]`` gradient. The AuxK loss uses it for the ``k_aux`` dead latents of each row, so a step
with dead latents keeps the sparse backward of :func:`~.variable_topk.topk_encode`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_encoder_grads(
    grad_sel: torch.Tensor,
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor | None,
    h_sel: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(sae_in, W_enc, b_enc, scale)`` of ``L`` given ``∂L/∂hidden_pre`` at the slots
    ``indices`` ``[N, m]`` only (``grad_sel``, same shape); ``h_sel``: the unscaled pre-activations
    there (needed for ``scale``). ``b_enc``/``scale`` gradients accumulate in float32 at least."""
    need_x, need_w, need_b, need_s = needs
    d_sae = W_enc.shape[1]
    flat_idx = indices.reshape(-1)
    acc = torch.promote_types(W_enc.dtype, torch.float32)
    grad_s = None
    if scale is not None:
        if need_s:
            assert h_sel is not None
            contrib = (grad_sel.to(acc) * h_sel.to(acc)).reshape(-1)
            grad_s = torch.zeros(d_sae, dtype=acc, device=W_enc.device).index_add_(
                0, flat_idx, contrib
            )
            grad_s = grad_s.to(scale.dtype)
        grad_sel = grad_sel * scale[indices]
    grad_b = None
    if need_b:
        grad_b = torch.zeros(d_sae, dtype=acc, device=W_enc.device).index_add_(
            0, flat_idx, grad_sel.reshape(-1).to(acc)
        )
        grad_b = grad_b.to(W_enc.dtype)
    grad_x = grad_w = None
    if need_x or need_w:
        # ∂L/∂sae_in[n] = Σ_i g[n, i] · W_enc[:, idx[n, i]]: an embedding_bag over W_encᵀ;
        # ∂L/∂W_encᵀ[j] = Σ_{(n,i): idx=j} g[n, i] · sae_in[n]: that bag's weight gradient
        W_t = W_enc.detach().t().contiguous().requires_grad_(need_w)
        with torch.enable_grad():
            bag = F.embedding_bag(
                indices, W_t, per_sample_weights=grad_sel.to(W_t.dtype), mode="sum"
            )
            if need_w:
                (grad_w_t,) = torch.autograd.grad(bag, W_t, grad_outputs=sae_in.to(W_t.dtype))
                grad_w = grad_w_t.t().contiguous()
        grad_x = bag.detach().to(sae_in.dtype) if need_x else None
    return grad_x, grad_w, grad_b, grad_s


class _PreactsAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sae_in, W_enc, b_enc, scale, indices, values):  # type: ignore[override]
        h_sel = None
        if scale is not None:  # the unscaled pre-activation; a zero scale (a zero decoder row,
            # whose norm has zero gradient) contributes nothing to ∂scale
            s = scale[indices]
            h_sel = torch.where(s != 0, values / torch.where(s != 0, s, 1), 0)
        ctx.save_for_backward(sae_in, W_enc, scale, indices, h_sel)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        sae_in, W_enc, scale, indices, h_sel = ctx.saved_tensors
        grads = sparse_encoder_grads(
            grad, sae_in, W_enc, indices, scale, h_sel, tuple(ctx.needs_input_grad[:4])
        )
        return (*grads, None, None)


def preacts_at(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``values`` (``[N, m]``, the pre-activations ``(sae_in @ W_enc + b_enc) · scale`` at
    ``indices``), differentiable in ``sae_in`` ``[N, d_in]``, ``W_enc``, ``b_enc`` and ``scale``
    through the chosen slots only. ``values`` must be those pre-activations: only their gradient
    is computed here."""
    if indices.shape != values.shape or indices.dim() != 2 or sae_in.dim() != 2:
        raise ValueError(
            f"preacts_at takes sae_in [N, d_in] and indices/values [N, m], got "
            f"{tuple(sae_in.shape)}, {tuple(indices.shape)}, {tuple(values.shape)}"
        )
    return _PreactsAt.apply(sae_in, W_enc, b_enc, scale, indices, values.detach())


def preacts_at_reference(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain autograd: the dense pre-activations, gathered (the test reference)."""
    hidden_pre = sae_in @ W_enc + b_enc
    if scale is not None:
        hidden_pre = hidden_pre * scale
    return hidden_pre.gather(-1, indices)
