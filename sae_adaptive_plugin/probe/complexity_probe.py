"""AdaptiveK's complexity probe: a linear map ``ĉ = wᵀx + b``, fitted by streamed closed-form ridge.

:class:`ComplexityProbe` is fitted in memory (``fit``), from batches (``fit_stream``) or from a
:class:`~sae_adaptive_plugin.probe.ridge.RidgeAccumulator` filled elsewhere (``from_accumulator``,
e.g. during an AdaptiveK warm-up). ``λ`` is picked from a grid (default 1e-2 … 1e3 in
half-decades) by k-fold cross-validation of the held-out squared error and the probe refitted on
all rows; ``λ`` multiplies the summed Gram matrix, so an optimum on the default grid's upper edge
extends the grid upwards. ``predict(x)`` is ``wᵀx + b`` in float32 clamped to the label range.
Reported: held-out R² and Pearson (exact, from the statistics) and Spearman (reservoir rows).
A probe is one ``.safetensors`` file (``weight``, ``bias``, JSON metadata); no pickle.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from sae_adaptive_plugin.probe.ridge import (
    DEFAULT_LAMBDAS,
    ProbeReport,
    RidgeAccumulator,
    _centred,
    _check_lambdas,
    _solve_all,
)
from sae_adaptive_plugin.stats import spearman as rank_correlation

#: Upper limit of the automatic extension of the default grid (see ``from_accumulator``).
MAX_EXTENDED_LAMBDA: float = 1e12

#: Key of the JSON document in the safetensors metadata, and its format version.
_META_KEY = "complexity_probe"
_FORMAT_VERSION = 1


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
