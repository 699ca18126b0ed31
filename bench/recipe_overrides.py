"""The `--set KEY=VALUE` option the training benches share: recipe overrides applied to every run
a bench trains, written as on `vtc train`'s command line (e.g. `trainer.threads=1` to run beside
another job on one core, or `stages.0.steps=2` for a quick pass that only checks the bench runs)."""

import argparse


def add_set_option(parser: argparse.ArgumentParser, example: str = "trainer.threads=1") -> None:
    """Adds `--set` (repeatable; `args.set` is the list of KEY=VALUE strings, empty by default)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a recipe override for every run the bench trains (repeatable), e.g. {example}",
    )
