"""Command line: ``python -m experiments run EXP [key=value ...]`` (what ``make exp`` calls).

``DRY=1`` prints the resolved config and exits. Overrides use dotted keys
(``trainer.max_steps=1000 data.batch_size=16``); ``+key=value`` adds a key that does not exist.
"""

from __future__ import annotations

import argparse
import sys

from freqdiff.config import ConfigError, env_flag, load, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="train (or resume) an experiment")
    p_run.add_argument("exp", help="experiment name under experiments/ or a path to a .yaml")
    p_run.add_argument("overrides", nargs="*", help="key=value overrides")
    p_run.add_argument("--dry", action="store_true", help="print the resolved config and exit (also DRY=1)")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.exp, args.overrides)
        if args.dry or env_flag("DRY"):
            print(to_yaml(cfg), end="")
            return 0
        from experiments.runner import run

        out = run(cfg)
        print(f"run folder: {out['run_dir']}")
        return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
