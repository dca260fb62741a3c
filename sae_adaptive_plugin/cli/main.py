"""``sae-adaptive``: parse the command line and hand it to the library function of the command.

Each sub-command is a row of :data:`COMMANDS`: its flags (in :mod:`.arguments`) and the
``module:function`` that runs it, ``function(args) -> exit code``. The module is imported only
when its command runs, so ``sae-adaptive --help`` does not import torch or SAELens.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from sae_adaptive_plugin import __version__
from sae_adaptive_plugin.cli import arguments

#: (name, help, add_arguments(parser), "module:function" that runs it)
COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None], str], ...] = (
    (
        "plugins",
        "list installed SAELens plugins and the architectures each registered",
        arguments.plugins_arguments,
        "sae_adaptive_plugin.registration.loader:plugins_command",
    ),
    (
        "push",
        "publish a trained SAE folder to the Hugging Face Hub with a model card",
        arguments.push_arguments,
        "sae_adaptive_plugin.hub.push:push_command",
    ),
    (
        "import",
        "convert an SAE saved by the papers' reference code (AdaptiveK, SoftSAE) into a "
        "SAELens folder",
        arguments.import_arguments,
        "sae_adaptive_plugin.hub.reference_import.loaders:import_command",
    ),
    (
        "release",
        "train, evaluate and lay out a suite of SAEs as one SAELens release from a YAML spec; "
        "`release push DIR` uploads it in one commit",
        arguments.release_arguments,
        "sae_adaptive_plugin.hub.release:release_command",
    ),
    (
        "train",
        "train an SAE of any registered architecture with SAELens's runner from a YAML config",
        arguments.train_arguments,
        "sae_adaptive_plugin.training.run:train_command",
    ),
    (
        "eval",
        "SAELens run_evals (explained variance, CE/KL scores, L0) + per-token k distribution",
        arguments.eval_arguments,
        "sae_adaptive_plugin.evaluation:eval_command",
    ),
    (
        "fit-probe",
        "fit an AdaptiveK complexity probe on a model's activations over labelled texts or "
        "surprisal",
        arguments.fit_probe_arguments,
        "sae_adaptive_plugin.probe.fit_from_model:fit_probe_command",
    ),
    (
        "bench",
        "step time, step memory and inference tokens/s of each architecture vs SAELens TopK",
        arguments.bench_arguments,
        "sae_adaptive_plugin.experiments.bench:bench_command",
    ),
    (
        "compare",
        "train adaptive and fixed-sparsity SAEs on one variable-complexity synthetic stream; "
        "write results.json, PNGs and a Markdown table",
        arguments.compare_arguments,
        "sae_adaptive_plugin.experiments.compare:compare_command",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-adaptive",
        description="Adaptive-sparsity SAEs for SAELens: compare, train, fit probes, publish, bench.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text, add_arguments, target in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_target=target)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, _, function = args._target.partition(":")
    return int(getattr(importlib.import_module(module), function)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
