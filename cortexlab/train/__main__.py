"""`python -m cortexlab.train <recipe> ...`: every training recipe behind one command (see `--help`)."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import conflicts, lm, longtext, mqar, recall, recall_conflicts, smollm2_exits
from .common import git_revision


def main(argv=None) -> int:
    git_revision(refresh=True)   # the code as the run starts, not as it ends
    parser = argparse.ArgumentParser(prog="python -m cortexlab.train",
                                     description="Train and evaluate: Cortex recall across calls, NeuroLlama on text.")
    sub = parser.add_subparsers(dest="recipe", required=True)
    recall.add_cli(sub)
    recall_conflicts.add_cli(sub)
    lm.add_cli(sub)
    smollm2_exits.add_cli(sub)
    mqar.add_cli(sub)
    conflicts.add_cli(sub)
    longtext.add_cli(sub)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m cortexlab.train " + " ".join(sys.argv[1:] if argv is None else argv)
    print(json.dumps(args.run(args, command), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
