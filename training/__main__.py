"""``python -m training <verb> ...``: the PARE producer pipeline (``--help`` on every verb).

Each verb is a module with ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Adding a verb
is one line in ``VERBS`` (name -> module path). Verb modules keep heavy imports inside ``run``, since building
the parser imports every one of them. Launch under ``torchrun`` for multi-GPU / multi-node runs: logging is INFO
on rank 0 and WARNING elsewhere.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from comfyui_pare.errors import PareError

from .checkpointing import CheckpointError
from .config import ConfigError

VERBS: dict[str, str] = {
    "calibrate": "training.calibrate",
    "prune": "training.prune",
    "distill": "training.distill",
    "asymrnr-calibrate": "training.token_calibrate",
    "toyworld": "training.toyworld.cli",
    "route": "training.route",
    "export": "training.export",
    "calibrate-router": "training.calibrate_router",
    "estimate": "training.estimate",
    "cache-targets": "training.cache_targets",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, module_name in VERBS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PareError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
