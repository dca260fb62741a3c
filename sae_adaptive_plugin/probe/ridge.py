"""Streamed ridge regression with k-fold cross-validation: the statistics and the solve.

:class:`RidgeAccumulator` keeps, per fold, the count and the sums ``Σx``, ``Σy``, ``Σxxᵀ``,
``Σxy``, ``Σy²`` (float64, shifted by the first batch's mean for stability), the label range and
a small reservoir of rows for a held-out Spearman: memory ``O(n_folds · d_in²)`` whatever the
number of rows. The fit solves ridge on centred statistics, ``w = (S_xx + λI)⁻¹ S_xy`` and
``b = ȳ − wᵀx̄`` (bias unregularised), for every ``λ`` of a grid from one eigendecomposition
(docs/METHODS.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sae_adaptive_plugin.reporting import jsonable

#: Default ridge grid: 1e-2 … 1e3 in half-decade steps.
DEFAULT_LAMBDAS: tuple[float, ...] = tuple(float(10.0 ** (e / 2)) for e in range(-4, 7))


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
        On a GPU, after the first batch, the host reads the device once per call: the checks,
        the label range and the new reservoir rows come back in one copy (folds and reservoir
        keys are drawn on the CPU and sent without waiting).
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
        if self.count is None:  # the shift comes from the first batch: check it first
            self._check_finite(*_batch_checks(X, y).tolist()[:2], n)
            self._init(X, y)
        assert self._gen is not None and self.shift_x is not None
        dev = self.device
        gen_state = self._gen.get_state()
        folds = self._folds(fold, n)  # on the CPU
        counts = torch.bincount(folds, minlength=self.n_folds)
        order = _to_device(torch.argsort(folds, stable=True), dev)
        folds_dev = _to_device(folds, dev)
        Xs = X.to(dev, torch.float64) - self.shift_x
        ys = y.to(dev, torch.float64) - self.shift_y
        onehot = torch.nn.functional.one_hot(folds_dev, self.n_folds).to(torch.float64)  # [N, F]
        sorted_rows = Xs[order].split(counts.tolist())  # each fold's rows (sizes known here)
        deltas = {
            "count": onehot.sum(0),
            "sum_x": onehot.T @ Xs,
            "sum_y": onehot.T @ ys,
            "sum_xy": onehot.T @ (Xs * ys[:, None]),
            "sum_yy": onehot.T @ (ys * ys),
            "sum_xx": torch.stack([rows.T @ rows for rows in sorted_rows]),
        }
        reservoir = self._reservoir_plan(n) if self.reservoir_size else None
        fetch = [_batch_checks(X, y)]
        if reservoir is not None:
            new_rows = _to_device(reservoir.new_rows, X.device)
            fetch += [y[new_rows].to(torch.float64), X[new_rows]]
        fetched = _to_host(fetch)  # the one host read
        bad_y, bad_x, y_min, y_max = fetched[0].tolist()
        try:
            self._check_finite(bad_y, bad_x, n)
        except ValueError:
            self._gen.set_state(gen_state)
            raise
        for name, delta in deltas.items():
            getattr(self, name).add_(delta)
        self.label_min = min(self.label_min, y_min)
        self.label_max = max(self.label_max, y_max)
        if reservoir is not None:
            new_y, new_x = fetched[1], fetched[2].float()
            self._reservoir_keep(reservoir, new_x, new_y, folds[reservoir.new_rows])
        return self

    @staticmethod
    def _check_finite(bad_y: float, bad_x: float, n: int) -> None:
        if bad_y:
            raise ValueError(f"labels y must be finite; got {int(bad_y)} NaN/inf label(s) of {n}")
        if bad_x:
            raise ValueError("activations X must be finite; got NaN/inf entries")

    def _folds(self, fold: int | torch.Tensor | None, n: int) -> torch.Tensor:
        """Each row's fold (long ``[n]``, on the CPU): drawn, one fold, or given."""
        if fold is None:
            return torch.randint(0, self.n_folds, (n,), generator=self._gen, device="cpu")
        if isinstance(fold, int):
            if not 0 <= fold < self.n_folds:
                raise ValueError(f"fold must lie in [0, n_folds={self.n_folds}), got {fold}")
            return torch.full((n,), fold, dtype=torch.long, device="cpu")
        folds = torch.as_tensor(fold).reshape(-1).long().cpu()
        if folds.shape[0] != n or int(folds.min()) < 0 or int(folds.max()) >= self.n_folds:
            raise ValueError(
                f"fold must hold one value in [0, n_folds={self.n_folds}) per row ({n})"
            )
        return folds

    def _reservoir_plan(self, n: int) -> _ReservoirPlan:
        """Which stored and which new rows the reservoir keeps (the smallest random keys)."""
        keys = torch.rand(n, generator=self._gen, device="cpu")
        n_old = 0 if self.res_key is None else self.res_key.shape[0]
        all_keys = keys if self.res_key is None else torch.cat([self.res_key, keys])
        if all_keys.shape[0] > self.reservoir_size:
            keep = all_keys.topk(self.reservoir_size, largest=False).indices
        else:
            keep = torch.arange(all_keys.shape[0], device="cpu")
        new_rows = (keep[keep >= n_old] - n_old).sort().values
        return _ReservoirPlan(all_keys, keep, n_old, new_rows)

    def _reservoir_keep(
        self, plan: _ReservoirPlan, new_x: torch.Tensor, new_y: torch.Tensor, new_f: torch.Tensor
    ) -> None:
        x32, y64, f = new_x, new_y, new_f
        if self.res_key is not None:
            assert self.res_x is not None and self.res_y is not None and self.res_fold is not None
            x32 = torch.cat([self.res_x, x32])
            y64 = torch.cat([self.res_y, y64])
            f = torch.cat([self.res_fold, f])
        # position of each kept row among the stored rows followed by the fetched new ones
        keep = plan.keep
        is_new = keep >= plan.n_old
        rank = torch.searchsorted(plan.new_rows, (keep - plan.n_old).clamp(min=0))
        at = torch.where(is_new, plan.n_old + rank, keep)
        self.res_key = plan.all_keys[keep]
        self.res_x, self.res_y, self.res_fold = x32[at], y64[at], f[at]

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


@dataclass
class _ReservoirPlan:
    """The reservoir after a batch: ``keep`` indexes ``all_keys`` (stored rows, then the
    ``n_old``-offset new rows); ``new_rows``: the new rows it keeps, ascending."""

    all_keys: torch.Tensor
    keep: torch.Tensor
    n_old: int
    new_rows: torch.Tensor


def _batch_checks(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[non-finite labels, any non-finite input, min y, max y]`` as one float64 device tensor."""
    y64 = y.to(torch.float64)
    return torch.stack(
        [
            (~torch.isfinite(y)).sum().to(torch.float64),
            (~torch.isfinite(X)).any().to(torch.float64),
            y64.min(),
            y64.max(),
        ]
    )


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` on the CPU through one device-to-host copy of their concatenated bytes."""
    flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    host = torch.cat(flat).cpu()
    out, at = [], 0
    for t, f in zip(tensors, flat):
        part = host[at : at + f.numel()].clone()  # aligned for the view below
        out.append(part.view(t.dtype).reshape(t.shape))
        at += f.numel()
    return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU from pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
