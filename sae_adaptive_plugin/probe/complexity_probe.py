"""AdaptiveK's complexity probe: a linear map ``ĉ = wᵀx + b``, fitted by streamed closed-form ridge.

Public API (small on purpose; ``sae-adaptive fit-probe`` and ``saes/adaptivek.py`` build on it):

- :class:`RidgeAccumulator` — streamed sufficient statistics. ``acc.update(X, y)`` adds a batch
  (``X [N, d_in]``, ``y [N]``); it keeps, per cross-validation fold, the count and the sums
  ``Σx``, ``Σy``, ``Σxxᵀ``, ``Σxy``, ``Σy²`` (float64, shifted by the first batch's mean for
  numerical stability), the label min/max, and a small uniform reservoir of rows for the held-out
  Spearman. Memory is ``O(n_folds · d_in²)`` whatever the number of rows, so millions of
  activations stream through. Rows go to folds uniformly at random (seeded) unless ``fold=`` is
  given (an int for the whole batch, or a per-row tensor — use it to keep a context's tokens in
  one fold). ``acc.to(device)`` moves the statistics; ``acc.state_tensors(prefix)`` /
  ``acc.load_state_tensors(tensors, prefix)`` save and restore them (safetensors-compatible).
- :meth:`ComplexityProbe.fit` ``(X, y, lambdas=None, n_folds=5, seed=0)`` — in-memory fit.
- :meth:`ComplexityProbe.fit_stream` ``(batches, lambdas=None, n_folds=5, seed=0)`` — fit from an
  iterable of ``(X, y)`` batches; :meth:`ComplexityProbe.from_accumulator` ``(acc, lambdas=None)``
  — fit from statistics accumulated elsewhere (e.g. during an AdaptiveK warm-up).
- ``probe.predict(x)`` — ``wᵀx + b`` over the last dimension of ``x`` ``[..., d_in]``, computed in
  float32 and clamped to ``[label_min, label_max]``.
- ``probe.save(path)`` / :meth:`ComplexityProbe.load` ``(path)`` — one ``.safetensors`` file:
  tensors ``weight [d_in]`` and ``bias [1]``, plus a JSON document (format version, ``d_in``,
  label range, ``lam``, the report) in the safetensors metadata. No pickle.
- Attributes: ``d_in``, ``weight`` (float32 ``[d_in]``), ``bias`` (float), ``label_min``,
  ``label_max``, ``lam``, ``report`` (:class:`ProbeReport` or ``None``).
- :meth:`ComplexityProbe.check_d_in` — the clear error for a probe/SAE width mismatch.

The fit (docs/METHODS.md §3): ridge ``θ = (XᵀX + λI')⁻¹Xᵀy`` with the bias unregularised, solved on
centred statistics (``w = (S_xx + λI)⁻¹ S_xy``, ``b = ȳ − wᵀx̄``); ``λ`` is picked from the grid
(default :data:`DEFAULT_LAMBDAS`, 1e-2 … 1e3 in half-decades) by k-fold cross-validation on the
held-out squared error, every fold and every ``λ`` from one eigendecomposition per fold; the final
probe is refitted on all rows. ``λ`` multiplies the raw (summed, not averaged) Gram matrix, as in
the formula, so its effect shrinks as data grows; hence, with the default grid, an optimum on the
grid's upper edge extends the grid upwards (with a warning, see :meth:`ComplexityProbe.
from_accumulator`). Reported: held-out R² (pooled over folds, each
fold against its own mean) and Pearson, both exact from the statistics (before clamping), and
held-out Spearman on the reservoir rows (after clamping).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_adaptive_plugin.reporting import jsonable
from sae_adaptive_plugin.stats import spearman as rank_correlation

#: Default ridge grid: 1e-2 … 1e3 in half-decade steps.
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(float(10.0 ** (e / 2)) for e in range(-4, 7))

#: Upper limit of the automatic extension of the default grid (see ``from_accumulator``).
MAX_EXTENDED_LAMBDA: float = 1e12

#: Key of the JSON document in the safetensors metadata, and its format version.
_META_KEY = "complexity_probe"
_FORMAT_VERSION = 1


@dataclass
class ProbeReport:
    """Cross-validated quality of a probe fit.

    Attributes:
        lam: the chosen ``λ``.
        lambdas: the grid searched.
        cv_mse: held-out mean squared error for each ``λ`` in ``lambdas``.
        r2: held-out R² at ``lam`` (pooled over folds; each fold against its own label mean).
        pearson: held-out Pearson correlation of predictions and labels at ``lam``.
        spearman: held-out Spearman correlation on the reservoir rows at ``lam`` (NaN if fewer
            than 3 reservoir rows or a constant side).
        n_samples: rows the probe was fitted on.
        n_folds: cross-validation folds.
        n_spearman: reservoir rows behind ``spearman``.
    """

    lam: float
    lambdas: list[float]
    cv_mse: list[float]
    r2: float
    pearson: float
    spearman: float
    n_samples: int
    n_folds: int
    n_spearman: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite numbers become ``None``)."""
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeReport:
        def num(v: Any) -> float:
            return float("nan") if v is None else float(v)

        return cls(
            lam=num(data["lam"]),
            lambdas=[num(v) for v in data["lambdas"]],
            cv_mse=[num(v) for v in data["cv_mse"]],
            r2=num(data["r2"]),
            pearson=num(data["pearson"]),
            spearman=num(data["spearman"]),
            n_samples=int(data["n_samples"]),
            n_folds=int(data["n_folds"]),
            n_spearman=int(data.get("n_spearman", 0)),
        )


def _check_lambdas(lambdas: Sequence[float] | None) -> list[float]:
    lams = list(DEFAULT_LAMBDAS if lambdas is None else lambdas)
    if not lams or any(not (math.isfinite(float(v)) and float(v) >= 0) for v in lams):
        raise ValueError(f"lambdas must be a non-empty list of finite values >= 0, got {lams}")
    return [float(v) for v in lams]


class RidgeAccumulator:
    """Streamed statistics for a ridge fit with k-fold CV (see the module docstring).

    Args:
        d_in: width of the inputs.
        n_folds: cross-validation folds, ``>= 2``.
        seed: seed of the random fold assignment and of the reservoir.
        reservoir_size: rows kept (uniformly over the stream) for the held-out Spearman; 0 = none.
        device: where the statistics live (default: the device of the first batch).
    """

    def __init__(
        self,
        d_in: int,
        n_folds: int = 5,
        seed: int = 0,
        reservoir_size: int = 4096,
        device: torch.device | str | None = None,
    ) -> None:
        if int(d_in) < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in}")
        if int(n_folds) < 2:
            raise ValueError(f"n_folds must be >= 2, got {n_folds}")
        if int(reservoir_size) < 0:
            raise ValueError(f"reservoir_size must be >= 0, got {reservoir_size}")
        self.d_in = int(d_in)
        self.n_folds = int(n_folds)
        self.seed = int(seed)
        self.reservoir_size = int(reservoir_size)
        self.device = torch.device(device) if device is not None else None
        self._gen: torch.Generator | None = None
        self.shift_x: torch.Tensor | None = None
        self.shift_y: float = 0.0
        self.count: torch.Tensor | None = None  # [F]
        self.sum_x: torch.Tensor | None = None  # [F, d]
        self.sum_y: torch.Tensor | None = None  # [F]
        self.sum_xx: torch.Tensor | None = None  # [F, d, d]
        self.sum_xy: torch.Tensor | None = None  # [F, d]
        self.sum_yy: torch.Tensor | None = None  # [F]
        self.label_min = math.inf
        self.label_max = -math.inf
        # reservoir: rows (float32), labels, folds, random keys (keep the smallest keys)
        self.res_x: torch.Tensor | None = None
        self.res_y: torch.Tensor | None = None
        self.res_fold: torch.Tensor | None = None
        self.res_key: torch.Tensor | None = None

    @property
    def n_samples(self) -> int:
        return 0 if self.count is None else int(self.count.sum().item())

    def _init(self, X: torch.Tensor, y: torch.Tensor) -> None:
        dev = self.device if self.device is not None else X.device
        self.device = dev
        F, d = self.n_folds, self.d_in
        f64 = torch.float64
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.shift_x = X.to(dev, f64).mean(0)
        self.shift_y = float(y.to(f64).mean())
        self.count = torch.zeros(F, dtype=f64, device=dev)
        self.sum_x = torch.zeros(F, d, dtype=f64, device=dev)
        self.sum_y = torch.zeros(F, dtype=f64, device=dev)
        self.sum_xx = torch.zeros(F, d, d, dtype=f64, device=dev)
        self.sum_xy = torch.zeros(F, d, dtype=f64, device=dev)
        self.sum_yy = torch.zeros(F, dtype=f64, device=dev)

    @torch.no_grad()
    def update(
        self, X: torch.Tensor, y: torch.Tensor, fold: int | torch.Tensor | None = None
    ) -> RidgeAccumulator:
        """Add rows ``X [N, d_in]`` with labels ``y [N]``; returns ``self``.

        Raises ``ValueError`` for a wrong shape, a non-finite label or input, or a bad fold.
        """
        X = torch.as_tensor(X)
        y = torch.as_tensor(y)
        if X.ndim != 2 or X.shape[1] != self.d_in:
            raise ValueError(
                f"X must be [N, d_in={self.d_in}], got shape {tuple(X.shape)} "
                "(probe d_in mismatch?)"
            )
        y = y.reshape(-1)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"y must have one label per row of X ({X.shape[0]}), got {y.shape[0]}")
        n = X.shape[0]
        if n == 0:
            return self
        if not torch.isfinite(y).all():
            bad = int((~torch.isfinite(y)).sum())
            raise ValueError(f"labels y must be finite; got {bad} NaN/inf label(s) of {n}")
        if not torch.isfinite(X).all():
            raise ValueError("activations X must be finite; got NaN/inf entries")
        if self.count is None:
            self._init(X, y)
        assert self._gen is not None and self.shift_x is not None
        dev = self.device
        if fold is None:
            folds = torch.randint(0, self.n_folds, (n,), generator=self._gen).to(dev)
        elif isinstance(fold, int):
            if not 0 <= fold < self.n_folds:
                raise ValueError(f"fold must lie in [0, n_folds={self.n_folds}), got {fold}")
            folds = torch.full((n,), fold, dtype=torch.long, device=dev)
        else:
            folds = torch.as_tensor(fold).reshape(-1).long().to(dev)
            if folds.shape[0] != n or int(folds.min()) < 0 or int(folds.max()) >= self.n_folds:
                raise ValueError(
                    f"fold must hold one value in [0, n_folds={self.n_folds}) per row ({n})"
                )
        Xs = X.to(dev, torch.float64) - self.shift_x
        ys = y.to(dev, torch.float64) - self.shift_y
        onehot = torch.nn.functional.one_hot(folds, self.n_folds).to(torch.float64)  # [N, F]
        self.count += onehot.sum(0)
        self.sum_x += onehot.T @ Xs
        self.sum_y += onehot.T @ ys
        self.sum_xy += onehot.T @ (Xs * ys[:, None])
        self.sum_yy += onehot.T @ (ys * ys)
        for f in range(self.n_folds):
            rows = Xs[folds == f]
            if rows.shape[0]:
                self.sum_xx[f] += rows.T @ rows
        self.label_min = min(self.label_min, float(y.min()))
        self.label_max = max(self.label_max, float(y.max()))
        if self.reservoir_size:
            self._reservoir_add(X, y, folds)
        return self

    def _reservoir_add(self, X: torch.Tensor, y: torch.Tensor, folds: torch.Tensor) -> None:
        keys = torch.rand(X.shape[0], generator=self._gen)
        x32 = X.detach().to("cpu", torch.float32)
        y64 = y.detach().to("cpu", torch.float64)
        f = folds.to("cpu")
        if self.res_key is not None:
            assert self.res_x is not None and self.res_y is not None and self.res_fold is not None
            keys = torch.cat([self.res_key, keys])
            x32 = torch.cat([self.res_x, x32])
            y64 = torch.cat([self.res_y, y64])
            f = torch.cat([self.res_fold, f])
        if keys.shape[0] > self.reservoir_size:
            keep = keys.topk(self.reservoir_size, largest=False).indices
            keys, x32, y64, f = keys[keep], x32[keep], y64[keep], f[keep]
        self.res_key, self.res_x, self.res_y, self.res_fold = keys, x32, y64, f

    def to(self, device: torch.device | str) -> RidgeAccumulator:
        """Move the statistics to ``device`` (the reservoir stays on the CPU); returns ``self``."""
        self.device = torch.device(device)
        for name in ("count", "sum_x", "sum_y", "sum_xx", "sum_xy", "sum_yy", "shift_x"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(self.device))
        return self

    # -- state for checkpoints (safetensors-compatible tensors only) --------------------------

    def state_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """All statistics as named tensors (empty before the first update)."""
        if self.count is None:
            return {}
        assert self._gen is not None
        out = {
            "count": self.count,
            "sum_x": self.sum_x,
            "sum_y": self.sum_y,
            "sum_xx": self.sum_xx,
            "sum_xy": self.sum_xy,
            "sum_yy": self.sum_yy,
            "shift_x": self.shift_x,
            "scalars": torch.tensor(
                [self.shift_y, self.label_min, self.label_max], dtype=torch.float64
            ),
            "rng_state": self._gen.get_state(),
        }
        if self.res_key is not None:
            out.update(res_x=self.res_x, res_y=self.res_y, res_fold=self.res_fold)
            out["res_key"] = self.res_key
        return {prefix + k: v.detach().clone() for k, v in out.items() if v is not None}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Restore statistics written by :meth:`state_tensors` (same ``d_in``/``n_folds``)."""
        t = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not t:
            return
        if t["sum_xx"].shape != (self.n_folds, self.d_in, self.d_in):
            raise ValueError(
                f"accumulator state has shape {tuple(t['sum_xx'].shape)}, expected "
                f"(n_folds={self.n_folds}, d_in={self.d_in}, d_in={self.d_in})"
            )
        dev = self.device if self.device is not None else t["count"].device
        self.device = torch.device(dev)
        for name in ("count", "sum_x", "sum_y", "sum_xx", "sum_xy", "sum_yy", "shift_x"):
            setattr(self, name, t[name].to(dev, torch.float64))
        self.shift_y, self.label_min, self.label_max = (float(v) for v in t["scalars"])
        self._gen = torch.Generator(device="cpu")
        self._gen.set_state(t["rng_state"].to("cpu", torch.uint8))
        if "res_key" in t:
            self.res_key = t["res_key"].cpu()
            self.res_x = t["res_x"].cpu().float()
            self.res_y = t["res_y"].cpu().double()
            self.res_fold = t["res_fold"].cpu().long()


def _solve_all(S: torch.Tensor, s: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """``w(λ) = (S + λI)⁻¹ s`` for every ``λ`` via one eigendecomposition: ``[L, d]``."""
    evals, evecs = torch.linalg.eigh(S)
    evals = evals.clamp(min=0.0)
    proj = evecs.T @ s  # [d]
    lam = torch.tensor(list(lambdas), dtype=S.dtype, device=S.device)
    denom = evals[None, :] + lam[:, None]  # [L, d]
    # λ = 0 with a singular S: minimum-norm solution (pseudo-inverse)
    tol = evals.max().clamp(min=1e-300) * S.shape[0] * torch.finfo(S.dtype).eps
    inv = torch.where(denom > tol, 1.0 / denom.clamp(min=tol), torch.zeros_like(denom))
    return (inv * proj[None, :]) @ evecs.T


def _centred(n, sx, sy, sxx, sxy):
    """Centred Gram and cross terms from raw (shifted) sums."""
    mx = sx / n
    my = sy / n
    S = sxx - n * torch.outer(mx, mx)
    s = sxy - n * mx * my
    return S, s, mx, my


class ComplexityProbe:
    """Linear complexity probe ``ĉ = clamp(wᵀx + b, label_min, label_max)`` (module docstring)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: float,
        label_min: float,
        label_max: float,
        lam: float = 0.0,
        report: ProbeReport | None = None,
    ) -> None:
        weight = torch.as_tensor(weight).detach().reshape(-1).to("cpu", torch.float32)
        if weight.numel() < 1:
            raise ValueError("weight must have d_in >= 1 entries")
        if not torch.isfinite(weight).all() or not math.isfinite(float(bias)):
            raise ValueError("probe weight and bias must be finite")
        if not (math.isfinite(label_min) and math.isfinite(label_max)) or label_min > label_max:
            raise ValueError(
                f"label range must be finite with label_min <= label_max, got "
                f"[{label_min}, {label_max}]"
            )
        self.weight = weight
        self.bias = float(bias)
        self.label_min = float(label_min)
        self.label_max = float(label_max)
        self.lam = float(lam)
        self.report = report

    @property
    def d_in(self) -> int:
        return int(self.weight.numel())

    def check_d_in(self, d_in: int, what: str = "the SAE") -> None:
        """Raise ``ValueError`` unless this probe reads ``d_in``-wide activations."""
        if int(d_in) != self.d_in:
            raise ValueError(
                f"probe d_in={self.d_in} does not match d_in={d_in} of {what}; fit the probe on "
                "activations of the same hook point and width"
            )

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Clamped complexity of each row of ``x [..., d_in]`` (float32, shape ``x.shape[:-1]``)."""
        x = torch.as_tensor(x)
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must be [..., d_in={self.d_in}], got shape {tuple(x.shape)}")
        w = self.weight.to(x.device)
        out = x.to(torch.float32) @ w + self.bias
        return out.clamp(self.label_min, self.label_max)

    def __repr__(self) -> str:
        r = self.report
        extra = f", r2={r.r2:.4f}, spearman={r.spearman:.4f}" if r is not None else ""
        return (
            f"ComplexityProbe(d_in={self.d_in}, lam={self.lam:g}, "
            f"labels=[{self.label_min:g}, {self.label_max:g}]{extra})"
        )

    # -- fitting ------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        X: torch.Tensor,
        y: torch.Tensor,
        lambdas: Sequence[float] | None = None,
        n_folds: int = 5,
        seed: int = 0,
    ) -> ComplexityProbe:
        """Fit on in-memory rows ``X [N, d_in]``, labels ``y [N]``."""
        X = torch.as_tensor(X)
        if X.ndim != 2:
            raise ValueError(f"X must be [N, d_in], got shape {tuple(X.shape)}")
        acc = RidgeAccumulator(X.shape[1], n_folds=n_folds, seed=seed)
        acc.update(X, y)
        return cls.from_accumulator(acc, lambdas)

    @classmethod
    def fit_stream(
        cls,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        lambdas: Sequence[float] | None = None,
        n_folds: int = 5,
        seed: int = 0,
        reservoir_size: int = 4096,
    ) -> ComplexityProbe:
        """Fit from an iterable of ``(X [N, d_in], y [N])`` batches (``d_in`` from the first)."""
        acc: RidgeAccumulator | None = None
        for X, y in batches:
            X = torch.as_tensor(X)
            if acc is None:
                if X.ndim != 2:
                    raise ValueError(f"X must be [N, d_in], got shape {tuple(X.shape)}")
                acc = RidgeAccumulator(
                    X.shape[1], n_folds=n_folds, seed=seed, reservoir_size=reservoir_size
                )
            acc.update(X, y)
        if acc is None:
            raise ValueError("batches is empty: nothing to fit the probe on")
        return cls.from_accumulator(acc, lambdas)

    @classmethod
    @torch.no_grad()
    def from_accumulator(
        cls, acc: RidgeAccumulator, lambdas: Sequence[float] | None = None
    ) -> ComplexityProbe:
        """Pick ``λ`` by k-fold CV on ``acc``'s statistics, refit on all rows, report.

        With the default grid (``lambdas=None``), when the CV optimum is the grid's largest
        ``λ`` the grid is extended upwards in half-decades (4 at a time, stopping once past
        :data:`MAX_EXTENDED_LAMBDA`) until the held-out error stops falling (``λ`` multiplies
        the summed Gram matrix, so the useful range grows with the row count); a chosen ``λ``
        above the default grid, or one still on the searched grid's upper edge, warns. A
        user-given grid is never extended. The report's ``lambdas``/``cv_mse`` cover the grid
        actually searched.
        """
        lams = _check_lambdas(lambdas)
        top = lams[-1]
        while True:
            probe = cls._fit_on_grid(acc, lams)
            edge = probe.lam == lams[-1]
            if not edge or lambdas is not None or lams[-1] >= MAX_EXTENDED_LAMBDA:
                break
            lams = lams + [lams[-1] * 10.0 ** (e / 2) for e in range(1, 5)]
        if edge:
            warnings.warn(
                f"probe ridge: the cross-validated optimum is the largest lambda searched "
                f"({lams[-1]:g}); a larger one may fit better",
                stacklevel=2,
            )
        elif probe.lam > top:
            warnings.warn(
                f"probe ridge: the cross-validated optimum lambda={probe.lam:g} lies above the "
                f"default grid (top {top:g}); the grid was extended to find it",
                stacklevel=2,
            )
        return probe

    @classmethod
    def _fit_on_grid(cls, acc: RidgeAccumulator, lams: list[float]) -> ComplexityProbe:
        if acc.count is None:
            raise ValueError("the accumulator holds no rows: nothing to fit the probe on")
        assert acc.sum_x is not None and acc.sum_y is not None and acc.sum_xx is not None
        assert acc.sum_xy is not None and acc.sum_yy is not None and acc.shift_x is not None
        F = acc.n_folds
        n_total = float(acc.count.sum())
        if n_total < 2:
            raise ValueError(f"need at least 2 rows to fit the probe, got {int(n_total)}")
        tot = [t.sum(0) for t in (acc.count, acc.sum_x, acc.sum_y, acc.sum_xx, acc.sum_xy)]
        # per fold: weights [L, d] and biases [L] fitted without that fold
        sse = torch.zeros(len(lams), dtype=torch.float64, device=acc.device)
        sst = 0.0
        # pooled held-out sums for Pearson: Σŷ, Σŷ², Σŷy, Σy, Σy², n
        p_h = torch.zeros(len(lams), dtype=torch.float64, device=acc.device)
        p_hh = torch.zeros_like(p_h)
        p_hy = torch.zeros_like(p_h)
        p_y = p_yy = p_n = 0.0
        fold_models: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for f in range(F):
            nf = float(acc.count[f])
            n_train = n_total - nf
            if nf == 0 or n_train < 2:
                continue
            S, s, mx, my = _centred(
                n_train,
                tot[1] - acc.sum_x[f],
                tot[2] - acc.sum_y[f],
                tot[3] - acc.sum_xx[f],
                tot[4] - acc.sum_xy[f],
            )
            W = _solve_all(S, s, lams)  # [L, d]
            B = my - W @ mx  # [L] (in shifted coordinates)
            fold_models[f] = (W, B)
            # held-out: ŷ = W x + B on fold f's rows, from its sums
            sx, sy, sxx, sxy, syy = (
                acc.sum_x[f],
                acc.sum_y[f],
                acc.sum_xx[f],
                acc.sum_xy[f],
                acc.sum_yy[f],
            )
            sum_h = W @ sx + nf * B
            sum_hh = torch.einsum("ld,de,le->l", W, sxx, W) + 2 * B * (W @ sx) + nf * B * B
            sum_hy = W @ sxy + B * sy
            sse += syy - 2 * sum_hy + sum_hh
            sst += float(syy - sy * sy / nf)
            p_h += sum_h
            p_hh += sum_hh
            p_hy += sum_hy
            p_y += float(sy)
            p_yy += float(syy)
            p_n += nf
        if not fold_models:
            raise ValueError("cross-validation needs rows in at least two folds")
        cv_mse = (sse / p_n).tolist()
        best = int(torch.tensor(cv_mse).argmin())
        lam = lams[best]
        r2 = 1.0 - float(sse[best]) / sst if sst > 0 else float("nan")
        cov = float(p_hy[best]) / p_n - (float(p_h[best]) / p_n) * (p_y / p_n)
        var_h = float(p_hh[best]) / p_n - (float(p_h[best]) / p_n) ** 2
        var_y = p_yy / p_n - (p_y / p_n) ** 2
        pearson = cov / math.sqrt(var_h * var_y) if var_h > 0 and var_y > 0 else float("nan")

        # final fit on all rows
        S, s, mx, my = _centred(n_total, tot[1], tot[2], tot[3], tot[4])
        w = _solve_all(S, s, [lam])[0]
        b_shifted = float(my - w @ mx)
        # undo the shift: y - sy = w (x - sx) + b'  =>  y = w x + (b' + sy - w sx)
        bias = b_shifted + acc.shift_y - float(w @ acc.shift_x)

        # held-out Spearman on the reservoir (clamped predictions of each row's fold model)
        spearman, n_sp = float("nan"), 0
        if acc.res_x is not None and acc.res_x.shape[0] >= 3:
            preds, labels = [], []
            for f, (W, B) in fold_models.items():
                sel = acc.res_fold == f
                if not sel.any():
                    continue
                xs = acc.res_x[sel].to(acc.device, torch.float64) - acc.shift_x
                pred = xs @ W[best] + B[best] + acc.shift_y
                preds.append(pred.clamp(acc.label_min, acc.label_max).cpu())
                labels.append(acc.res_y[sel])
            if preds:
                ph, ly = torch.cat(preds), torch.cat(labels)
                n_sp = int(ph.shape[0])
                spearman = rank_correlation(ph, ly)
        report = ProbeReport(
            lam=lam,
            lambdas=lams,
            cv_mse=cv_mse,
            r2=r2,
            pearson=pearson,
            spearman=spearman,
            n_samples=int(n_total),
            n_folds=F,
            n_spearman=n_sp,
        )
        return cls(w, bias, acc.label_min, acc.label_max, lam=lam, report=report)

    # -- persistence --------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        """The probe's non-tensor fields as a JSON-safe dict."""
        return {
            "format": "sae_adaptive_plugin.ComplexityProbe",
            "version": _FORMAT_VERSION,
            "d_in": self.d_in,
            "label_min": self.label_min,
            "label_max": self.label_max,
            "lam": self.lam,
            "report": self.report.to_dict() if self.report is not None else None,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one ``.safetensors`` file (tensors + JSON metadata); returns its path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.weight.contiguous(),
            "bias": torch.tensor([self.bias], dtype=torch.float32),
        }
        meta = {_META_KEY: json.dumps(self.to_json_dict(), allow_nan=False)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ComplexityProbe:
        """Read a file written by :meth:`save`; clear errors for missing or corrupt files."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"complexity probe file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises several types for bad headers/data
            raise ValueError(
                f"{path} is not a readable complexity probe file (truncated or corrupted "
                f"safetensors): {exc}"
            ) from exc
        if _META_KEY not in meta or "weight" not in tensors or "bias" not in tensors:
            raise ValueError(
                f"{path} is a safetensors file but not a complexity probe (needs tensors "
                f"'weight', 'bias' and metadata '{_META_KEY}')"
            )
        try:
            info = json.loads(meta[_META_KEY])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: corrupted probe metadata JSON: {exc}") from exc
        if info.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{path}: unsupported probe format version {info.get('version')!r}, "
                f"expected {_FORMAT_VERSION}"
            )
        weight = tensors["weight"]
        if weight.ndim != 1 or weight.numel() != int(info["d_in"]):
            raise ValueError(
                f"{path}: weight has shape {tuple(weight.shape)} but the metadata says "
                f"d_in={info['d_in']}"
            )
        report = ProbeReport.from_dict(info["report"]) if info.get("report") else None
        return cls(
            weight,
            float(tensors["bias"].reshape(-1)[0]),
            float(info["label_min"]),
            float(info["label_max"]),
            lam=float(info.get("lam", 0.0)),
            report=report,
        )


__all__ = [
    "DEFAULT_LAMBDAS",
    "ComplexityProbe",
    "ProbeReport",
    "RidgeAccumulator",
]
