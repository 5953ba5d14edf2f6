"""``propseg models``: list the installed reference models (one line each)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``models`` subcommand to the ``propseg`` parser."""
    p = subparsers.add_parser(
        "models",
        help="list the installed reference models (name, region, organs, card, training data)",
        description="List the reference models in models/reference/<name>/ ($PROPSEG_MODELS moves the folder); "
        "pass a name to suggest/segment with --model NAME.",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..reference.models import DEFAULT_MODEL, list_models, reference_root

    models = list_models()
    if not models:
        print(f"no reference models installed in {reference_root()}")
        return 0
    for m in models:
        print(m.summary() + (" [default]" if m.name == DEFAULT_MODEL else ""))
    return 0
