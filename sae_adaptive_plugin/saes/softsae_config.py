"""SoftSAE's configs (inference and training) and its schedules as functions of the step.

``α_t`` falls linearly from ``alpha_start`` to ``alpha_end`` over ``alpha_anneal_steps``; the
penalty's target ``K_t`` moves linearly from ``k_target_start`` (default ``min(d_in, k_max)``) to
``k`` over ``k_anneal_steps``. From
``hard_topk_start_step`` on, training uses hard top-``⌊k̂⌋`` with the estimator frozen. Step fields
left ``None`` are fractions of the run (α over the first sixth, the k target over the first 1%,
the hard phase over the last three quarters), resolved when SAELens's trainer tells the run length.
With ``resample_below`` above 0, the rarely used latents restart at ``hard_topk_start_step`` and
every ``resample_interval_steps`` (an eighth of the run) after it, ``resample_rounds`` times (up
to 4 by default, as many as leave an interval of training after the last).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAEConfig

from sae_adaptive_plugin.saes.config_checks import (
    check_b_dec_init_method,
    check_int,
    check_number,
    check_share,
    check_sparse_training_code,
    missing_k_error,
    resolve_sizes,
    warn_if_auxk_rare_tokens_too_few,
)
from sae_adaptive_plugin.saes.run_length import fraction_of_run, unknown_run_length_error


def _check_int(name: str, value: Any, lo: int, hi: float | None = None, hi_name: str = "") -> int:
    return check_int(name, value, lo, hi, hi_name=hi_name)


def _validate_common(cfg: Any) -> None:
    """Checks shared by the inference and training configs (fields resolved to ints)."""
    resolve_sizes(cfg, "d_in", "d_sae")
    cfg.k_max = _check_int("k_max", cfg.k_max, 1, cfg.d_sae, "d_sae")
    cfg.k = check_int(
        "k",
        cfg.k,
        1,
        cfg.k_max,
        hi_name="k_max",
        why="k̂ never exceeds k_max, so a mean of k cannot be reached; raise k_max (at most "
        "d_sae) or leave it unset (default min(2k, d_sae))",
    )
    cfg.k_estimator_hidden = _check_int("k_estimator_hidden", cfg.k_estimator_hidden, 1)


@dataclass
class SoftSAEConfig(TopKSAEConfig):
    """Inference config of ``softsae``.

    Args:
        k: the target mean number of active latents the SAE was trained for (informational;
            each row uses its own ``⌊k̂(x)⌋``).
        k_max: upper bound of ``k̂(x)``; ``1 ≤ k ≤ k_max ≤ d_sae``.
        k_estimator_hidden: hidden width of the k-estimator.
        rescale_acts_by_decoder_norm: as SAELens's TopK (selection on pre-acts × ‖W_dec‖).
    """

    k_max: int = 200
    k_estimator_hidden: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate_common(self)

    @classmethod
    def architecture(cls) -> str:
        return "softsae"


#: Default schedules, as fractions of the run's training steps (``bind_run_length``).
ALPHA_ANNEAL_FRACTION = 1 / 6
K_ANNEAL_FRACTION = 0.01
HARD_PHASE_FRACTION = 0.25
RESAMPLE_INTERVAL_FRACTION = 1 / 8
#: Default ``resample_below``: latents firing under a tenth as often as the mean latent restart.
DEFAULT_RESAMPLE_BELOW = 0.1
#: Restarts when ``resample_rounds`` is unset (fewer where the run leaves no room for them).
DEFAULT_RESAMPLE_ROUNDS = 4
#: Allowed ``k_penalty_scale`` values (the penalty weight ``λ_k``).
K_PENALTY_SCALES = ("mse", "constant")
#: Default soft-phase candidates per row: this many per unit of ``k_max``, plus 2 (capped at
#: ``d_sae``): the entries the exact LapSum threshold reads when every latent is a candidate.
SOFT_CANDIDATES_PER_K_MAX = 2
#: Default width of the k-estimator's hidden layer per input dimension (capped at ``d_sae``).
ESTIMATOR_WIDTH_PER_INPUT = 4


@dataclass(frozen=True)
class SoftSAESchedule:
    """SoftSAE's schedules with every step count resolved (pure functions of the step)."""

    alpha_start: float
    alpha_end: float
    alpha_anneal_steps: int
    k_start: float
    k: float
    k_anneal_steps: int
    hard_topk_start_step: int
    resample_interval_steps: int = 0
    resample_steps: tuple[int, ...] = ()

    def alpha_at(self, step: int) -> float:
        """LapSum scale α at ``step``."""
        n = self.alpha_anneal_steps
        frac = 1.0 if n == 0 else min(step / n, 1.0)
        return self.alpha_start + (self.alpha_end - self.alpha_start) * frac

    def k_target_at(self, step: int) -> float:
        """Target ``K_t`` of the batch-mean k̂ at ``step``."""
        n = self.k_anneal_steps
        frac = 1.0 if n == 0 else min(step / n, 1.0)
        return self.k_start + (self.k - self.k_start) * frac

    def is_hard_phase(self, step: int) -> bool:
        """Whether ``step`` trains with hard top-``⌊k̂⌋`` and a frozen estimator."""
        return step >= self.hard_topk_start_step

    def counts_fires_at(self, step: int) -> bool:
        """Whether ``step``'s firings count towards a restart: from one interval before the
        first restart up to the last."""
        if not self.resample_steps:
            return False
        first = self.resample_steps[0] - self.resample_interval_steps
        return first <= step < self.resample_steps[-1]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["resample_steps"] = list(self.resample_steps)
        return out


@dataclass
class SoftSAETrainingSAEConfig(TopKTrainingSAEConfig):
    """Training config of ``softsae`` (fields beyond SAELens's TopK training config).

    Step-keyed fields left ``None`` are fractions of the run, which SAELens's trainer tells the
    SAE (``bind_run_length``): ``alpha_anneal_steps`` 1/6, ``k_anneal_steps`` 1%,
    ``hard_topk_start_step`` a quarter of the training steps.

    Args:
        k: target mean number of active latents (required, no default; ``1 ≤ k ≤ k_max``).
        k_max: upper bound of ``k̂(x)``; default ``min(2k, d_sae)``; at most ``d_sae``.
        k_estimator_hidden: hidden width of the k-estimator; default ``min(d_sae, 4·d_in)`` (the
            reference uses ``d_sae``, which is the default wherever ``d_sae ≤ 4·d_in``).
        alpha_start, alpha_end: LapSum scale at step 0 and after ``alpha_anneal_steps`` (> 0).
        alpha_relative: α is in units of the batch's mean largest pre-activation (so the same
            values suit activations of any scale); False: in units of the pre-activations (the
            reference).
        alpha_anneal_steps: steps of the linear α schedule (≥ 0; 0 = ``alpha_end`` throughout).
        k_anneal_steps: steps over which the penalty's target moves linearly from
            ``k_target_start`` to ``k`` (≥ 0; 0 = ``k`` throughout).
        k_target_start: the penalty's target at step 0 (≥ 1; above ``k_max`` warned); default
            ``min(d_in, k_max)`` (the reference starts at ``d_in``, which a ``k_max`` below
            ``d_in`` cannot reach: its pull drives the estimator's sigmoid into saturation).
        k_penalty_scale: the unit of the k penalty's weight ``λ_k``: ``"mse"`` (default), the
            step's ``mse_loss`` (detached) over the target ``K_t`` — the reconstruction error
            per latent of the budget, so the penalty holds the mean ``k̂`` against the
            reconstruction's pull at any activation scale; ``"constant"``: 1.
        k_penalty_coefficient: ``λ_k`` in that unit (> 0; default 1). The reference's weight is
            ``k_penalty_scale="constant"``, ``k_penalty_coefficient=1``.
        hard_topk_start_step: first step of the hard phase (≥ 1, before the end of the run: the
            saved SAE always uses hard top-``⌊k̂⌋``, so the run must train it that way).
        decoder_unit_norm: keep decoder rows at unit norm during training and remove the
            gradient component parallel to each row (EleutherAI sparsify's decoder handling).
        b_dec_init_method: how training starts the decoder bias: ``"zeros"`` (SAELens's
            start, default) or ``"mean"`` (the first training batch's mean, over every rank;
            EleutherAI sparsify's start). A ``b_dec`` that is not all zeros at the first step
            (a loaded SAE) is kept.
        auxk_rare_tokens: a latent firing less than once per this many training tokens (a
            moving estimate over the last 4× as many) also counts as dead for the AuxK loss, as
            well as those SAELens's dead-feature window marks (``None``, default: that window
            only; SAELens counts one firing in the window as alive).
        soft_candidates: the soft phase's support: each row's top ``soft_candidates`` ReLU'd
            pre-activations, over which the LapSum mask is solved (``Σ m = k̂`` over them; 0 on
            the other latents). The code, its decode and the encoder's backward then touch
            ``batch × soft_candidates`` latents, not ``batch × d_sae``. In ``(k_max, d_sae]``;
            default ``min(2·k_max + 2, d_sae)``; ``d_sae``: every latent, the soft phase as the
            method is published.
        resample_below: at ``hard_topk_start_step`` and every ``resample_interval_steps`` after
            it, every latent that fired (hard phase: in its row's top-``⌊k̂⌋``; soft phase:
            ``m > ½``) on fewer than ``resample_below`` × the mean latent's count of rows since
            the previous restart (the first: over the interval before it) starts again along a
            residual of that step's batch, rows drawn ∝ their squared residual over their
            squared centred input. In ``[0, 1]``; 0 = never; default 0.1.
        resample_rounds: how many restarts (≥ 1); default: up to 4, as many as leave an
            interval of training after the last; a set value that does not fit is refused.
        resample_interval_steps: steps between restarts, and the counting window before the
            first (≥ 1); default an eighth of the run.
        sparse_training_code: training steps hand SAELens's trainer the code as a COO tensor
            built from the selection (``True``), so no dense ``[batch, d_sae]`` code is built
            for its firing counts, or the dense code (``False``, as SAELens's TopK; a soft
            phase over every latent always gives it dense, from its decode). ``None`` (default): COO on
            the CPU, dense elsewhere (SAELens's sums over a COO code make a GPU's host wait).
            COO only where nothing hooks ``hook_sae_acts_pre``/``hook_sae_acts_post``;
            ``encode`` is unaffected.
    """

    k: int | None = None  # type: ignore[assignment]  # required: SAELens TopK's 100 is no target
    k_max: int | None = None
    k_estimator_hidden: int | None = None
    alpha_start: float = 0.99
    alpha_end: float = 0.02
    alpha_relative: bool = True
    alpha_anneal_steps: int | None = None
    k_anneal_steps: int | None = None
    k_target_start: float | None = None
    k_penalty_scale: str = "mse"
    k_penalty_coefficient: float = 1.0
    hard_topk_start_step: int | None = None
    decoder_unit_norm: bool = False
    b_dec_init_method: str = "zeros"
    auxk_rare_tokens: int | None = None
    soft_candidates: int | None = None
    resample_below: float = DEFAULT_RESAMPLE_BELOW
    resample_rounds: int | None = None
    resample_interval_steps: int | None = None
    sparse_training_code: bool | None = None

    def __post_init__(self) -> None:
        resolve_sizes(
            self, "d_in", "d_sae", "auxk_rare_tokens", "resample_rounds", "resample_interval_steps"
        )
        self.resample_below = check_share(
            "resample_below", self.resample_below, " (0 = no restarts of rarely used latents)"
        )
        check_b_dec_init_method(self.b_dec_init_method)
        check_sparse_training_code(self.sparse_training_code)
        if self.k is None:
            raise missing_k_error("softsae", "k_max defaults to min(2k, d_sae)")
        self.k = _check_int("k", self.k, 1, self.d_sae, "d_sae")
        if self.k_max is None:
            self.k_max = min(2 * self.k, self.d_sae)
        if self.k_estimator_hidden is None:
            self.k_estimator_hidden = min(self.d_sae, ESTIMATOR_WIDTH_PER_INPUT * self.d_in)
        _validate_common(self)
        if self.soft_candidates is None:
            self.soft_candidates = min(SOFT_CANDIDATES_PER_K_MAX * self.k_max + 2, self.d_sae)
        else:
            self.soft_candidates = check_int(
                "soft_candidates",
                self.soft_candidates,
                min(self.k_max + 1, self.d_sae),
                self.d_sae,
                lo_name="k_max + 1",
                hi_name="d_sae",
                why="the soft mask sums to k̂ ≤ k_max over the candidates, each weighing below "
                "1; d_sae: every latent; leave it unset for min(2·k_max + 2, d_sae)",
            )
        check_number("alpha_start", self.alpha_start)
        check_number("alpha_end", self.alpha_end)
        if self.alpha_anneal_steps is not None:
            self.alpha_anneal_steps = _check_int("alpha_anneal_steps", self.alpha_anneal_steps, 0)
        if self.k_anneal_steps is not None:
            self.k_anneal_steps = _check_int("k_anneal_steps", self.k_anneal_steps, 0)
        if self.hard_topk_start_step is not None:
            # step 0 would freeze the k-estimator before it ever trained
            self.hard_topk_start_step = _check_int(
                "hard_topk_start_step", self.hard_topk_start_step, 1
            )
        if self.k_target_start is None:
            self.k_target_start = float(min(self.d_in, self.k_max))
        check_number(
            "k_target_start",
            self.k_target_start,
            1,
            inclusive=True,
            note=" (k̂ is at least 1); leave it unset for min(d_in, k_max)",
        )
        if self.k_target_start > self.k_max:
            warnings.warn(
                f"softsae: k_target_start={self.k_target_start:g} is above k_max={self.k_max}: "
                "k̂ cannot reach it, and its pull drives the k-estimator's sigmoid into "
                "saturation (every input at k_max); leave it unset for min(d_in, k_max)",
                UserWarning,
                stacklevel=3,
            )
        check_number("k_penalty_coefficient", self.k_penalty_coefficient)
        if self.b_dec_init_method == "mean":
            warnings.warn(
                "softsae: b_dec_init_method='mean' gives the k-estimator centred inputs, and "
                "in the package's measurements its per-input k then stopped following the "
                "input's complexity and its mean L0 overshot k (docs/compare.md, 'Starting "
                "b_dec at the data mean'); leave it 'zeros' unless you check k̂ yourself",
                UserWarning,
                stacklevel=3,
            )
        if self.k_penalty_scale not in K_PENALTY_SCALES:
            raise ValueError(
                f"k_penalty_scale must be one of {K_PENALTY_SCALES}, got {self.k_penalty_scale!r}"
            )
        if self.use_sparse_activations:
            raise ValueError("use_sparse_activations must be False for softsae (not supported)")
        warn_if_auxk_rare_tokens_too_few(self, "softsae")
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "softsae"

    def schedule(self, total_steps: int | None = None) -> SoftSAESchedule:
        """The schedules for a run of ``total_steps`` steps (``None``: the run length is unknown,
        so every step-keyed field must be set). Raises ``ValueError`` when the hard phase would
        start at or after the end of the run; warns when α or the k target are still annealing
        when it starts."""
        defaults = {
            "alpha_anneal_steps": ALPHA_ANNEAL_FRACTION,
            "k_anneal_steps": K_ANNEAL_FRACTION,
            "hard_topk_start_step": HARD_PHASE_FRACTION,
        }
        missing = [name for name in defaults if getattr(self, name) is None]
        if missing and total_steps is None:
            raise unknown_run_length_error("softsae", missing)
        steps = {
            name: getattr(self, name)
            if getattr(self, name) is not None
            else fraction_of_run(frac, int(total_steps or 0))
            for name, frac in defaults.items()
        }
        steps["hard_topk_start_step"] = max(1, steps["hard_topk_start_step"])
        schedule = SoftSAESchedule(
            alpha_start=float(self.alpha_start),
            alpha_end=float(self.alpha_end),
            k_start=float(self.k_target_start),
            k=float(self.k),
            **steps,
        )
        if total_steps is not None:
            _check_schedule_fits(schedule, total_steps)
        resample = self._resample_schedule(schedule.hard_topk_start_step, total_steps)
        return dataclasses.replace(schedule, **resample)

    def _resample_schedule(self, hard: int, total_steps: int | None) -> dict[str, Any]:
        """``resample_interval_steps`` and ``resample_steps`` of the schedule: restarts from
        ``hard`` on, each followed by an interval of training; none when ``resample_below`` is
        0, or when neither the run length nor ``resample_interval_steps`` is known."""
        interval = self.resample_interval_steps
        if interval is None and total_steps is not None:
            interval = max(1, fraction_of_run(RESAMPLE_INTERVAL_FRACTION, total_steps))
        if self.resample_below <= 0 or interval is None:
            return {}
        rounds = self.resample_rounds or DEFAULT_RESAMPLE_ROUNDS
        restarts = [hard + i * interval for i in range(rounds)]
        if total_steps is not None:
            restarts = [step for step in restarts if step + interval <= total_steps]
            if self.resample_rounds is not None and len(restarts) < self.resample_rounds:
                raise ValueError(
                    f"softsae: resample_rounds={self.resample_rounds} restarts every "
                    f"{interval} steps (resample_interval_steps) from hard_topk_start_step="
                    f"{hard} do not fit a run of {total_steps} training steps with an interval "
                    f"of training after the last; set resample_rounds in [1, {len(restarts)}] "
                    "(at least 1 needs hard_topk_start_step + resample_interval_steps <= the "
                    "run's steps), leave it unset (as many as fit, up to "
                    f"{DEFAULT_RESAMPLE_ROUNDS}) or set resample_below=0"
                )
        return {"resample_interval_steps": interval, "resample_steps": tuple(restarts)}

    def check_run_length(self, total_steps: int) -> None:
        """Raise ``ValueError`` if the schedules do not fit a run of ``total_steps`` steps
        (checked before the model is loaded)."""
        self.schedule(total_steps)


def _check_schedule_fits(schedule: SoftSAESchedule, total_steps: int) -> None:
    hard = schedule.hard_topk_start_step
    if total_steps < 2:
        raise ValueError(
            f"softsae: the run is too short ({total_steps} training step(s)): it needs at least "
            "2 steps, a soft phase that trains the k-estimator and then the hard phase the saved "
            "SAE uses. Raise training_tokens to at least 2 × train_batch_size_tokens (many more "
            "for a useful SAE)"
        )
    if hard >= total_steps:
        raise ValueError(
            f"softsae: hard_topk_start_step={hard} is at or after the end of the run "
            f"({total_steps} training steps): the saved SAE uses hard top-⌊k̂⌋ but would never "
            f"have been trained with it. Set hard_topk_start_step in [1, {total_steps - 1}] or "
            f"leave it unset (default {HARD_PHASE_FRACTION:g} of the run)"
        )
    for name, value in (
        ("alpha_anneal_steps", schedule.alpha_anneal_steps),
        ("k_anneal_steps", schedule.k_anneal_steps),
    ):
        if value > hard:
            warnings.warn(
                f"softsae: {name}={value} ends after the hard phase starts "
                f"(hard_topk_start_step={hard}): the soft phase stops before its schedule has "
                f"finished; set {name} <= {hard} or leave it unset",
                UserWarning,
                stacklevel=3,
            )
