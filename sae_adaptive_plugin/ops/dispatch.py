"""How the ops adapt to dtype and device: accumulation dtype, autocast, exact float32 matmuls, blocks.

- :func:`accumulation_dtype`: sums, Gram forms and gradient buffers run in at least float32
  (float64 when an input is float64), whatever the input dtype.
- :func:`autocast_dtype`: the dtype ``torch.autocast`` gives matmuls on a device, or ``None``.
- :func:`autocast_off`: decorator of an autograd Function's ``forward``/``backward``: runs it with
  autocast disabled on the device of its first tensor argument, so the dtypes the op chooses
  explicitly are the ones its matmuls use (also when ``backward`` runs inside an autocast region).
- :func:`host_check_is_free`: whether a value check may read a tensor back (CPU, eager).
- :func:`exact_float32_matmul`: on CUDA, float32 matmuls in full precision (no TF32) inside;
  :func:`full_precision`: that and autocast off.
- :func:`block_rows`: rows per block of a blocked loop. On the CPU a block holds about a fixed
  number of elements (cache-sized, the caller's budget); on an accelerator a block holds at least
  :data:`ACCELERATOR_BLOCK_ELEMENTS` and there are at most :data:`ACCELERATOR_MAX_BLOCKS` blocks,
  so the loop's trip count never grows with the width (``d_sae``, ``K``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: Elements a block holds at least on an accelerator (256 MiB of float32 per ``[rows, cols]``).
ACCELERATOR_BLOCK_ELEMENTS = 1 << 26
#: Most blocks a blocked loop runs on an accelerator: its temporaries stay at about
#: ``1 / ACCELERATOR_MAX_BLOCKS`` of the whole ``[rows, cols]`` each, its trip count bounded.
ACCELERATOR_MAX_BLOCKS = 8


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The matmul dtype of an enabled ``torch.autocast`` on ``device_type``, else ``None``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def linear_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` (``[K, N]``, the right operand of ``x @ w``) cast to ``dtype``, differentiable. On
    the CPU in ``nn.Linear``'s weight layout, a transposed view of a contiguous ``[N, K]``: the
    one copy ``w.to(dtype)`` makes, in the layout PyTorch's own CPU kernels multiply fastest when
    the CPU has no bf16 units (about 0.65 s against 4.3 s for a bf16 ``[1,024, 576] @ [576,
    4,608]`` on an AVX2 CPU, one thread; docs/bench.md, round 9). Its products may differ from a
    row-major operand's by one rounding step of ``dtype`` in a few entries. Elsewhere (and when
    ``w`` already has ``dtype``): ``w.to(dtype)``, as autocast casts."""
    if w.dtype == dtype or w.device.type != "cpu":
        return w.to(dtype)
    return w.t().to(dtype, memory_format=torch.contiguous_format).t()


def host_check_is_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` back to Python costs nothing: a CPU tensor, not under
    ``torch.compile`` (where it would break the graph). Input checks that need a value run only
    then; elsewhere the op clamps instead."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def autocast_off(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd Function's ``forward(ctx, ...)`` or ``backward(ctx, ...)`` with autocast
    disabled on the device of its first tensor argument."""

    @functools.wraps(method)
    def wrapper(ctx: Any, *args: Any) -> Any:
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
        if device_type is None:
            return method(ctx, *args)
        with torch.autocast(device_type, enabled=False):
            return method(ctx, *args)

    return wrapper


@contextlib.contextmanager
def exact_float32_matmul(device_type: str) -> Iterator[None]:
    """On CUDA, float32 matmuls without TF32 inside (restored on exit); elsewhere nothing."""
    if device_type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch ≥ 2.9 spells the setting fp32_precision; older releases allow_tf32
    name, exact = (
        ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    )
    before = getattr(matmul, name)
    setattr(matmul, name, exact)
    try:
        yield
    finally:
        setattr(matmul, name, before)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off and (on CUDA) no TF32 inside: matmuls run in their operands' dtype, exactly."""
    with torch.autocast(device_type, enabled=False), exact_float32_matmul(device_type):
        yield


def block_rows(n_rows: int, row_elements: int, device_type: str, cpu_elements: int) -> int:
    """Rows per block for ``n_rows`` rows of ``row_elements`` elements each.

    ``device_type == "cpu"``: about ``cpu_elements`` elements a block (at least one row).
    Otherwise: at least :data:`ACCELERATOR_BLOCK_ELEMENTS` elements a block and at most
    :data:`ACCELERATOR_MAX_BLOCKS` blocks.
    """
    row_elements = max(row_elements, 1)
    if device_type == "cpu":
        return max(1, cpu_elements // row_elements)
    fewest = math.ceil(n_rows / ACCELERATOR_MAX_BLOCKS)
    return max(1, fewest, ACCELERATOR_BLOCK_ELEMENTS // row_elements)
