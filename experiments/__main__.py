"""Command line: ``python -m experiments run EXP [key=value ...]`` (what ``make exp`` calls),
``python -m experiments run PIPELINE [key=value ...]`` runs a multi-stage experiment part by part
(experiments/pipeline.py), ``python -m experiments resume RUN [key=value ...]`` (``make exp RUN=...``:
resume a run folder from its saved config; only resumable keys such as ``trainer.max_steps`` may be given),
``python -m experiments sample RUN [--n N ...]`` (``make sample``) and
``python -m experiments eval RUN [--n N] [--ref REF ...]`` (``make eval``; see experiments/evaluate.py:
with no options a run is evaluated exactly as its own Evaluate callback did),
``python -m experiments submit EXP [key=value ...]`` (``make submit``: Slurm jobs through submitit,
experiments/cluster.py) and ``python -m experiments status PATH`` (``make status``: their state).

``DRY=1`` prints the resolved config as the run will use it and exits, writing nothing: a
``data.resolution: null`` is read from the manifest at ``data.path`` (else the synthetic generator's
settings), as the run does, and a comment line at the top says where it came from. Overrides use
dotted keys (``trainer.max_steps=1000 data.batch_size=16``); ``+key=value`` adds a key that does not
exist.

A bad config value is one line on stderr, ``config error: <key>=<value>: expected ...``, and exit
code 2; a run that diverges (NaN/Inf loss) stops with exit code 3; ``FREQDIFF_DEBUG=1`` shows the
traceback as well.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from freqdiff.config import ConfigError, env_flag, load, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _experiment_args(
        sub.add_parser("run", help="train (or resume) an experiment"), "print the resolved config"
    )
    p_res = sub.add_parser("resume", help="resume a run folder from its saved config")
    p_res.add_argument("run", help="run folder: <run.root>/<experiment>/<run.name>")
    p_res.add_argument("overrides", nargs="*", help="resumable key=value overrides (trainer.max_steps=...)")
    p_res.add_argument("--dry", action="store_true", help="print the config it would resume with")
    p_sub = sub.add_parser("submit", help="submit an experiment to Slurm (experiments/cluster.py)")
    _experiment_args(p_sub, "print the sbatch scripts")
    p_st = sub.add_parser("status", help="the Slurm jobs of a run folder or a matrix")
    p_st.add_argument("path", help="run folder, or a folder above run folders (runs/<matrix>)")
    _add_sample_eval(sub)
    args = parser.parse_args(argv)
    if args.cmd in ("sample", "eval"):
        return _sample_eval(args)
    if args.cmd in ("submit", "status"):
        return _cluster(args)
    from callbacks.checkpoint import TrainingDiverged
    from datamodules.health import BadDataError

    try:
        from experiments.runner import load_saved, quiet_libraries, resolve_data, run
        from experiments.validate import check_config

        if args.cmd == "resume":
            cfg = load_saved(args.run, args.overrides)
            with quiet_libraries():
                if args.dry or env_flag("DRY"):
                    print(to_yaml(cfg), end="")
                    return 0
                run(cfg, data_note="as saved in the run's config.yaml")
            return 0
        from experiments.pipeline import is_pipeline, run_pipeline

        if is_pipeline(args.exp):  # a multi-stage experiment (experiments/pipeline.py)
            with quiet_libraries():
                run_pipeline(args.exp, args.overrides, dry=bool(args.dry or env_flag("DRY")))
            return 0
        cfg = load(args.exp, args.overrides)
        with quiet_libraries():  # library banners and warnings that do not matter here (runner.py)
            if args.dry or env_flag("DRY"):
                check_config(cfg)
                cfg, source = resolve_data(cfg, args.exp, args.overrides, write=False)
                if "data" in cfg and "resolution" in cfg.data:
                    res = cfg.data.resolution
                    print(f"# data.resolution: {'null' if res is None else res} ({source}; no data written)")
                print(to_yaml(cfg), end="")
                return 0
            cfg, source = resolve_data(cfg, args.exp, args.overrides)
            run(cfg, data_note=source)
        return 0
    except (ConfigError, FileNotFoundError) as e:
        return _fail("config error", e)
    except TrainingDiverged as e:
        return _fail("error", e, code=3)
    except BadDataError as e:  # too much of the data is unreadable (datamodules/health.py)
        return _fail("data error", e)


def _experiment_args(p: argparse.ArgumentParser, dry: str) -> None:
    p.add_argument("exp", help="experiment name under experiments/ or a path to a .yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides (cluster.* for Slurm resources)")
    p.add_argument("--dry", action="store_true", help=f"{dry} and exit (also DRY=1)")


def _cluster(args) -> int:
    from experiments import cluster

    try:
        if args.cmd == "status":
            return cluster.status(args.path)
        cluster.submit(args.exp, args.overrides, dry=bool(args.dry or env_flag("DRY")))
        return 0
    except (ConfigError, FileNotFoundError) as e:
        return _fail("config error", e)
    except cluster.SubmitError as e:
        return _fail("slurm error", e)


def _fail(prefix: str, e: BaseException, code: int = 2) -> int:
    """``<prefix>: <message>`` on stderr, exit ``code``; with ``FREQDIFF_DEBUG=1`` the traceback first."""
    if env_flag("FREQDIFF_DEBUG"):
        traceback.print_exception(e)
    print(f"{prefix}: {e}", file=sys.stderr)
    return code


def _add_sample_eval(sub) -> None:
    for name, text in (
        ("sample", "write EMA samples of a run in resumable chunks"),
        ("eval", "FID / SWD / spectral distance of a run's EMA samples, to a JSON"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", help="run folder (runs/<experiment>/<name>) or a .ckpt")
        own = " (default: the run's Evaluate callback's, else %s)"
        if name == "sample":
            p.add_argument("--n", type=int, default=50000, help="number of samples (default 50000)")
            p.add_argument("--seed", type=int, default=0, help="first per-sample seed (seeds seed..seed+n-1)")
            p.add_argument(
                "--batch-size",
                type=int,
                default=None,
                help="seeds per sampler call (default: from free GPU memory; 64 on the CPU)",
            )
            p.add_argument("--chunk", type=int, default=1000, help="seeds per resumable chunk")
        else:
            p.add_argument("--n", type=int, default=None, help="number of samples" + own % 50000)
            p.add_argument("--seed", type=int, default=None, help="first per-sample seed" + own % 0)
            p.add_argument("--batch-size", type=int, default=None, help="seeds per sampler call" + own % 64)
            p.add_argument("--chunk", type=int, default=None, help="seeds per resumable chunk (~1000)")
        p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the module's)")
        p.add_argument("--eta", type=float, default=None, help="sampler eta (default: the module's)")
        p.add_argument("--workers", type=int, default=None, help="processes (default: local GPUs, else 1)")
        p.add_argument("--precision", default=None, help="bf16-mixed | 16-mixed | 32 (default: the run's)")
        p.add_argument("--out", default=None, help="output folder (sample) or JSON path (eval)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "sample":
            p.add_argument("--format", choices=("npz", "png"), default="npz", help="chunk format")
        else:
            p.add_argument(
                "--ref", default=None, help="shard folder or .npz (mu, sigma); default: the run's data"
            )
            p.add_argument(
                "--ref-split", choices=("train", "val"), default=None, help="split" + own % "train"
            )
            p.add_argument("--ref-n", type=int, default=None, help="reference images" + own % "n, capped")
            p.add_argument("--ref-seed", type=int, default=None, help="reference subset seed" + own % 0)
            p.add_argument(
                "--fid",
                choices=("auto", "true", "false"),
                default=None,
                help="auto: FID when Inception weights are found; true: fail without them" + own % "auto",
            )
            p.add_argument("--weights", default=None, help="Inception weights file")
            p.add_argument(
                "--swd-n", type=int, default=None, help="images per set for SWD, 0: off" + own % 2048
            )
            p.add_argument("--swd-min-res", type=int, default=None, help="coarsest SWD level" + own % 16)
            p.add_argument("--swd-patches", type=int, default=None, help="SWD patches per image" + own % 128)
            p.add_argument(
                "--bootstrap", type=int, default=None, help="resamplings for the spread" + own % 10
            )
            p.add_argument("--no-floor", action="store_true", help="skip the real-vs-real floors")
            p.add_argument("--panel", type=int, default=None, help="samples in the PNG, 0: none" + own % 64)
            p.add_argument("--kid", action="store_true", help="also KID (keeps features; Inception weights)")
            p.add_argument("--prc", action="store_true", help="also precision / recall (Inception weights)")
            p.add_argument("--cache-dir", default=None, help="reference statistics cache")


def _sample_eval(args) -> int:
    from experiments.evaluate import evaluate_run, sample_run
    from freqdiff.metrics.fid import InceptionWeightsNotFound

    common = dict(
        n=args.n,
        seed=args.seed,
        steps=args.steps,
        eta=args.eta,
        batch_size=args.batch_size,
        chunk=args.chunk,
        workers=args.workers,
        precision=args.precision,
        out=args.out,
        progress=not args.no_progress,
    )
    try:
        if args.cmd == "sample":
            sample_run(args.run, fmt=args.format, **common)
        else:
            fid = {"auto": "auto", "true": True, "false": False, None: None}[args.fid]
            evaluate_run(
                args.run,
                ref=args.ref,
                ref_split=args.ref_split,
                ref_n=args.ref_n,
                ref_seed=args.ref_seed,
                fid=fid,
                weights=args.weights,
                swd_n=args.swd_n,
                swd_min_res=args.swd_min_res,
                swd_patches=args.swd_patches,
                bootstrap=args.bootstrap,
                floor=False if args.no_floor else None,
                panel=args.panel,
                kid=args.kid or None,
                prc=args.prc or None,
                cache_dir=args.cache_dir,
                **common,
            )
        return 0
    except (FileNotFoundError, InceptionWeightsNotFound, ValueError) as e:
        return _fail("error", e)


if __name__ == "__main__":
    sys.exit(main())
