"""Config checks shared by the three architectures, so that their errors read alike.

Sizes (``d_in``, ``d_sae``, ``k``, ``k_min``, ``k_max``, …) must be integers; an integral float such
as ``256.0`` is taken as ``256``. A value out of range names the field and each bound by its field
name: ``k=10 must lie in [1, k_max=8]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any


def _bound(value: float | None, name: str) -> str:
    if value is None or value == math.inf:
        return "inf"
    return f"{name}={value}" if name else str(value)


def int_range(lo: int, hi: float | None = None, lo_name: str = "", hi_name: str = "") -> str:
    """``[lo, hi]`` with each bound named (``[1, k_max=8]``); ``[lo, inf)`` without ``hi``."""
    upper = _bound(hi, hi_name)
    return f"[{_bound(lo, lo_name)}, {upper}{')' if upper == 'inf' else ']'}"


def _integral(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def check_int(
    name: str,
    value: Any,
    lo: int = 1,
    hi: float | None = None,
    *,
    lo_name: str = "",
    hi_name: str = "",
    why: str = "",
) -> int:
    """``value`` as an int in ``[lo, hi]`` (``hi`` None: unbounded); an integral float is taken
    as its int. Otherwise ``ValueError`` naming ``name`` and the bounds (and ``why``, if given)."""
    allowed = int_range(lo, hi, lo_name, hi_name)
    if not _integral(value):
        raise ValueError(f"{name} must be an integer in {allowed}, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={value} must lie in {allowed}" + (f": {why}" if why else ""))
    return value


def check_number(
    name: str, value: Any, low: float = 0, *, inclusive: bool = False, note: str = ""
) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite real number (not a
    bool) above ``low`` (at least ``low`` if ``inclusive``); ``note`` ends the message."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and (value >= low if inclusive else value > low)):
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}{note}")


def check_share(name: str, value: Any, note: str = "") -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a real number
    (not a bool) in ``[0, 1]``; ``note`` ends the message."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1]{note}, got {value!r}")
    return float(value)


def resolve_sizes(cfg: Any, *names: str, lo: int | None = 1) -> None:
    """Replace each named field of ``cfg`` that is set by its int, checked to be ``>= lo``
    (``lo=None``: integrality only, the range is checked later against other fields)."""
    for name in names:
        value = getattr(cfg, name)
        if value is None:
            continue
        if lo is not None:
            setattr(cfg, name, check_int(name, value, lo))
        elif _integral(value):
            setattr(cfg, name, int(value))
        else:
            raise ValueError(f"{name} must be an integer, got {value!r}")


def missing_k_error(architecture: str, defaults: str) -> ValueError:
    """The error for a training config whose target mean L0 ``k`` was not given."""
    return ValueError(
        f"{architecture}: k is not set. k is the target mean number of active latents (L0) and "
        f"has no default; set it (e.g. k=32, in YAML sae.k: 32); {defaults}"
    )


#: How a training run starts the decoder bias ``b_dec`` (field ``b_dec_init_method``):
#: ``"zeros"``, SAELens's start, or ``"mean"``, the first training batch's mean.
B_DEC_INIT_METHODS = ("zeros", "mean")


def check_b_dec_init_method(value: Any) -> None:
    """``ValueError`` naming ``b_dec_init_method`` unless it is one of :data:`B_DEC_INIT_METHODS`."""
    if value not in B_DEC_INIT_METHODS:
        raise ValueError(f"b_dec_init_method must be one of {B_DEC_INIT_METHODS}, got {value!r}")


def check_sparse_training_code(value: Any) -> None:
    """``ValueError`` naming ``sparse_training_code`` unless it is ``None``, ``True`` or ``False``."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"sparse_training_code must be true, false or null (COO on the CPU), got {value!r}"
        )


def check_recipe(cfg: Any) -> None:
    """A comparison's recipe settings, each ``None`` or valid: ``b_dec_init_method`` one of
    :data:`B_DEC_INIT_METHODS`, ``auxk_rare_tokens`` an int ``>= 1`` (integral floats taken)."""
    if cfg.b_dec_init_method is not None:
        check_b_dec_init_method(cfg.b_dec_init_method)
    resolve_sizes(cfg, "auxk_rare_tokens")


#: ``auxk_rare_tokens`` below this many times ``d_sae / k`` marks latents firing at more than
#: ``1/AUXK_RARE_MIN_FACTOR`` of the mean rate ``k / d_sae`` as dead (measured: about 60×).
AUXK_RARE_MIN_FACTOR = 8


def warn_if_auxk_rare_tokens_too_few(cfg: Any, architecture: str) -> None:
    """Warn, naming the field, when ``auxk_rare_tokens`` would hand AuxK latents that fire at an
    ordinary rate: fewer than ``AUXK_RARE_MIN_FACTOR · d_sae / k`` tokens per firing."""
    every = cfg.auxk_rare_tokens
    if every is None or every * cfg.k >= AUXK_RARE_MIN_FACTOR * cfg.d_sae:
        return
    warnings.warn(
        f"{architecture}: auxk_rare_tokens={every} counts as dead every latent firing less than "
        f"once per {every} tokens, while the mean latent fires once per d_sae/k = "
        f"{cfg.d_sae / cfg.k:.0f} tokens: AuxK would train latents that fire at an ordinary "
        f"rate. Use at least {AUXK_RARE_MIN_FACTOR}·d_sae/k = "
        f"{math.ceil(AUXK_RARE_MIN_FACTOR * cfg.d_sae / cfg.k)} (measured: ~60·d_sae/k)",
        UserWarning,
        stacklevel=4,
    )
