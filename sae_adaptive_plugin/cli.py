"""The ``sae-adaptive`` command line: what SAELens has no command for.

A sub-command is a function ``run(args) -> exit code`` decorated with :func:`command` in the module
that owns the feature; :data:`COMMAND_MODULES` lists those modules. They must import nothing heavy
at module level (torch, sae_lens go inside ``run``), so ``sae-adaptive --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sae_adaptive_plugin import __version__

#: Modules whose ``@command`` functions become sub-commands (imported by :func:`build_parser`).
COMMAND_MODULES: tuple[str, ...] = (
    "sae_adaptive_plugin.hub",
    "sae_adaptive_plugin.training",
    "sae_adaptive_plugin.evaluation",
    "sae_adaptive_plugin.probe.fit_from_model",
    "sae_adaptive_plugin.experiments.bench",
    "sae_adaptive_plugin.experiments.compare",
)

#: name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


def command(
    name: str,
    help: str,
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments,
):
    """Register the decorated ``run(args) -> exit code`` as sub-command ``name``.

    ``arguments(parser)`` adds the sub-command's flags.
    """

    def decorate(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help, arguments, run)
        return run

    return decorate


def _plugins_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--all", action="store_true", help="also list SAELens's built-in architectures"
    )


@command(
    "plugins",
    "list installed SAELens plugins and the architectures each registered",
    arguments=_plugins_arguments,
)
def _cmd_plugins(args: argparse.Namespace) -> int:
    from sae_lens import registry

    from sae_adaptive_plugin.registration.loader import load_plugins

    reports = load_plugins()
    if not reports:
        print("no SAELens plugins installed (entry-point group 'sae_lens.plugins')")
    for report in reports:
        print(f"{report.name}  ({report.distribution or 'unknown distribution'}; {report.value})")
        if report.error:
            print(f"  FAILED: {report.error}")
        for name in report.architectures:
            kinds = [
                kind
                for kind, table in (
                    ("inference", registry.SAE_CLASS_REGISTRY),
                    ("training", registry.SAE_TRAINING_CLASS_REGISTRY),
                )
                if name in table
            ]
            print(f"  {name:<24} {' + '.join(kinds)}")
    if args.all:
        from_plugins = {name for r in reports for name in r.architectures}
        builtin = sorted(
            (set(registry.SAE_CLASS_REGISTRY) | set(registry.SAE_TRAINING_CLASS_REGISTRY))
            - from_plugins
        )
        print("SAELens built-in: " + ", ".join(builtin))
    return 1 if any(not r.ok for r in reports) else 0


def build_parser() -> argparse.ArgumentParser:
    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="sae-adaptive",
        description="Adaptive-sparsity SAEs for SAELens: compare, train, fit probes, publish, bench.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
