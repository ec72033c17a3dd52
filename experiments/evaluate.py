"""Standalone sampling and evaluation of a trained run: ``make sample`` / ``make eval`` (docs/evaluation.md).

``sample_run``: ``n`` images with the EMA weights and per-sample seeds ``seed .. seed + n - 1``,
written in chunks of ``chunk`` seeds to ``<run>/generated/<tag>/`` as ``chunk_NNNNNN.npz`` (uint8
``images [k, H, W, C]`` and ``seeds [k]``) or ``chunk_NNNNNN/<seed>.png``. The tag names what the
images depend on (checkpoint step, sampler steps and eta, first seed, precision). A chunk is written
under a temporary name and renamed when complete, so an interrupted command resumes by skipping the
chunks that exist.

``evaluate_run``: the metrics of ``n`` such samples against a reference (``callbacks.fid``): FID
(when Inception weights are found, or always with ``fid=True``), SWD per pyramid level, spectral
distance, optional KID and precision/recall; each weight-free metric with its bootstrap spread and
its real-vs-real floor at the same n (``callbacks.reference``). With no arguments a run is evaluated
with its own ``Evaluate`` callback's settings and reproduces its ``final_metrics.json``
(``eval_options``). Images come from the sample chunks when they exist and are generated otherwise.
After every chunk a worker saves its streaming statistics
(``<run>/eval/<tag>-n<n>.state/<what>/part-*.pt`` with the chunks they cover; ``<what>`` hashes the
extractor, SWD subset, kept features and chunk size), so an interrupted evaluation resumes, even with
another number of workers. The result is ``<run>/eval/<record_name>.json`` (named by everything that
changes the numbers), a ``.npz`` of the same name (first samples, real images and mean spectra, for
``experiments.compare``) and, with ``panel``, a ``.png`` of the same name: samples beside real images.
The reference (``ref``): the run's own data (``ref_split``, a seeded random subset of ``ref_n``
images, cached statistics), a shard folder, or an ``.npz`` with Inception ``mu`` and ``sigma`` (FID
only; its resize and weights must match for the number to mean anything). The record names it:
``ref_path``, ``ref_split`` (the split read), ``ref_manifest``, ``ref_n``, ``ref_seed``.

Workers: one process per local GPU (or ``workers`` CPU processes sharing the cores), each taking
chunks ``w::W``; with one worker everything runs in this process. The reference statistics are
computed in this process first (cached on disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from callbacks.fid import floor_fields
from callbacks.reference import NFECounter, describe_floor, write_eval_arrays
from experiments.chunks import chunk_path, read_chunk, write_chunk  # noqa: F401  (re-exported)
from experiments.eval_options import DEFAULTS, record_name, resolve_options
from experiments.eval_reference import build_reference, write_panel
from experiments.sample_batch import auto_batch_size
from freqdiff.checkpoints import load_run, run_folder
from freqdiff.metrics.evaluator import SetStats, bootstrap_spread, compare, quantize
from freqdiff.metrics.fid import InceptionFeatures, InceptionWeightsNotFound, inception_available


# -------------------------------------------------------------------- settings shared by both commands
def autocast_for(precision: str | None, device: torch.device):
    """The autocast context of a Lightning precision string (``bf16-mixed``, ``16-mixed``, ``32``...)."""
    p = str(precision or "32")
    if p == "auto":  # the trainer's rule (experiments.runner.auto_precision)
        from experiments.runner import auto_precision

        p = auto_precision(device.type)
    if p.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if p.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def default_workers() -> int:
    return max(1, torch.cuda.device_count())


def sampler_settings(
    module, run: str, cfg, steps: int | None, eta: float | None, precision: str | None
) -> dict:
    """What the samples depend on besides the seeds: checkpoint step, sampler steps / eta, precision."""
    ckpt_step = int(module.checkpoint_step)  # set by load_run from the checkpoint it read
    return {
        "step": ckpt_step,
        "steps": steps if steps is not None else getattr(module, "sample_steps", None),
        "eta": eta if eta is not None else getattr(module, "sample_eta", None),
        "precision": str(precision or cfg.trainer.get("precision", "32")),
        "sampler": f"{type(module).__name__}.sample",
        "weights": "ema",
        # what else the samples depend on (Relay: the stage-1 checkpoint's step); part of the cache tag
        "depends_on": dict(getattr(module, "sampling_depends_on", dict)()),
    }


def tag_for(s: dict[str, Any], seed: int) -> str:
    extra = "".join(f"-{k}{v}" for k, v in sorted(s.get("depends_on", {}).items()))
    return f"ema-step{s['step']}{extra}-steps{s['steps']}-eta{s['eta']}-seed{seed}-{s['precision']}"


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    if n < 1 or chunk < 1:
        raise ValueError(f"n and chunk must be >= 1, got n={n}, chunk={chunk}")
    return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]


# -------------------------------------------------------------------- workers
def _run_workers(fn, workers: int, args: tuple) -> None:
    if workers <= 1:
        fn(0, 1, *args)
        return
    import torch.multiprocessing as mp

    mp.spawn(_worker_entry, args=(fn, workers, args), nprocs=workers, join=True)


def _worker_entry(w: int, fn, workers: int, args: tuple) -> None:
    import freqdiff  # noqa: F401  (torchvision hook in the spawned interpreter)

    fn(w, workers, *args)


def _device_for(w: int, workers: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(w % torch.cuda.device_count())
        return torch.device("cuda", w % torch.cuda.device_count())
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    return torch.device("cpu")


def _load(run: str, device: torch.device):
    module, cfg = load_run(run, map_location="cpu")
    return module.to(device).eval(), cfg


# -------------------------------------------------------------------- sample
def sample_run(
    run: str,  # run folder (or checkpoint)
    n: int = 50000,  # images
    fmt: str = "npz",  # "npz" | "png"
    chunk: int = 1000,  # seeds per chunk file
    seed: int = 0,  # first seed
    steps: int | None = None,  # sampler steps (None: the module's default)
    eta: float | None = None,  # sampler eta (None: the module's default)
    batch_size: int | None = None,  # seeds per sample() call (None: from free GPU memory, 64 on CPU)
    workers: int | None = None,  # processes (None: local GPUs, else 1)
    precision: str | None = None,  # None: the run's trainer.precision
    out: str | None = None,  # folder (None: <run>/generated/<tag>)
    progress: bool = True,
) -> Path:
    """Write ``n`` samples in resumable chunks; returns the folder."""
    if fmt not in ("npz", "png"):
        raise ValueError(f"format must be 'npz' or 'png', got {fmt!r}")
    module, cfg = _load(run, torch.device("cpu"))
    s = sampler_settings(module, run, cfg, steps, eta, precision)
    folder = Path(out) if out else run_folder(run) / "generated" / tag_for(s, seed)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**s, "n": n, "seed": seed, "chunk": chunk, "format": fmt, "run": str(run)}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    todo = [
        c
        for c, (a, b) in enumerate(chunk_ranges(n, chunk))
        if read_chunk(folder, c, list(range(seed + a, seed + b))) is None
    ]
    print(f"sample: {n} images to {folder} ({len(todo)} of {len(chunk_ranges(n, chunk))} chunks to do)")
    args = (run, folder, n, chunk, seed, s, fmt, batch_size, todo, progress)
    w = min(workers or default_workers(), len(todo))
    if w == 1:  # in this process, with the module already loaded
        _sample_worker(0, 1, *args, module=module)
    elif todo:
        _run_workers(_sample_worker, w, args)
    return folder


def _sample_worker(
    w, workers, run, folder, n, chunk, seed, s, fmt, batch_size, todo, progress, module=None
) -> None:
    device = _device_for(w, workers)
    module = _load(run, device)[0] if module is None else module.to(device)
    ranges = chunk_ranges(n, chunk)
    mine = todo[w::workers]
    if batch_size is None:
        batch_size = auto_batch_size(module, s, device, cap=chunk)
        if progress:
            print(f"sample[{w}]: batch size {batch_size} on {device}", flush=True)
    bar = tqdm(
        total=sum(ranges[c][1] - ranges[c][0] for c in mine),
        disable=not progress,
        position=w,
        desc=f"sample[{w}]",
        unit="img",
    )
    for c in mine:
        a, b = ranges[c]
        seeds = list(range(seed + a, seed + b))
        x = _generate(module, seeds, s, batch_size, device, bar)
        write_chunk(folder, c, fmt, x, seeds)
    bar.close()


@torch.no_grad()
def _generate(
    module, seeds: list[int], s: dict, batch_size: int, device: torch.device, bar=None
) -> torch.Tensor:
    out = []
    for i in range(0, len(seeds), batch_size):
        with autocast_for(s["precision"], device):
            x = module.sample(seeds[i : i + batch_size], steps=s["steps"], eta=s["eta"], use_ema=True)
        out.append(quantize(x).cpu())
        if bar is not None:
            bar.update(len(out[-1]))
    return torch.cat(out)


# -------------------------------------------------------------------- eval
def evaluate_run(
    run: str,  # run folder (or checkpoint)
    n: int | None = None,  # generated images
    ref: str | None = None,  # None: the run's data; a shard folder; or an .npz with mu, sigma
    ref_split: str | None = None,  # split of the run's data / shard folder
    ref_n: int | None = None,  # real images (None: n, capped at the split size)
    ref_seed: int | None = None,  # seed of the random reference subset
    seed: int | None = None,  # first seed
    steps: int | None = None,  # sampler steps
    eta: float | None = None,  # sampler eta
    batch_size: int | None = None,  # seeds per sample() call, images per feature batch
    chunk: int | None = None,  # seeds per resumable unit (None: ~1000, a multiple of batch_size)
    workers: int | None = None,  # processes (None: local GPUs, else 1)
    precision: str | None = None,  # None: the run's trainer.precision
    fid: bool | str | None = None,  # True | "auto" | False
    weights: str | None = None,  # Inception weights file
    swd_n: int | None = None,  # images per set for SWD (0: off)
    swd_min_res: int | None = None,  # coarsest SWD pyramid level
    swd_patches: int | None = None,  # descriptors per image and level
    kid: bool | None = None,
    prc: bool | None = None,
    bootstrap: int | None = None,  # resamplings for the spread (0: none)
    floor: bool | None = None,  # real-vs-real floors of the weight-free metrics
    cache_dir: str | None = None,  # reference statistics cache
    panel: int | None = None,  # samples in <record>.png beside as many real images (0: none)
    out: str | None = None,  # JSON path (None: <run>/eval/<record_name>.json)
    progress: bool = True,
) -> dict[str, Any]:
    """Compute the metrics (module docstring); None means the run's own setting (eval_options)."""
    given = {k: v for k, v in locals().items() if k in DEFAULTS}
    module, cfg = _load(run, torch.device("cpu"))
    o, source = resolve_options(cfg, given)
    use_fid = _use_fid(o)
    if (o["kid"] or o["prc"]) and not use_fid:  # before any sampling
        raise InceptionWeightsNotFound(
            "KID and precision/recall use Inception features, and no Inception weights were found: "
            "put the torch-fidelity file where README 'Evaluation' says, or pass --weights FILE "
            "(or drop --kid / --prc)"
        )
    if o["fid"] == "auto" and not use_fid:
        print("eval: no Inception weights found, FID off (see README 'Evaluation' for where to put them)")
    device = _device_for(0, 1)
    s = sampler_settings(module, run, cfg, o["steps"], o["eta"], precision)
    tag = tag_for(s, o["seed"])
    extractor = InceptionFeatures(o["weights"]).to(device) if use_fid else None
    keep, swd_n, bs = o["kid"] or o["prc"], int(o["swd_n"]), int(o["batch_size"])
    chunk = chunk or bs * -(-1000 // bs)  # batches as in training: the same numerics
    swd_opts = {"min_res": o["swd_min_res"], "patches_per_image": o["swd_patches"]} if swd_n else None
    reference, res = build_reference(cfg, ref, o, extractor, swd_opts, keep, bs, progress)
    print(f"eval: settings from {source}; reference {reference.info}")

    eval_dir = run_folder(run) / "eval"
    name = record_name(tag, o, ref, use_fid)
    # partial statistics depend on what is accumulated, and on the chunking: both name the folder
    what = {"extractor": getattr(extractor, "name", None), "swd_n": swd_n, "keep": keep, "chunk": chunk}
    what["raps"] = o["bootstrap"] > 1
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
    state_dir = eval_dir / f"{tag}-n{o['n']}.state" / digest
    state_dir.mkdir(parents=True, exist_ok=True)
    ranges = chunk_ranges(o["n"], chunk)
    done = _done_chunks(state_dir)
    todo = [c for c in range(len(ranges)) if c not in done]
    print(f"eval: {o['n']} samples ({tag}); {len(todo)} of {len(ranges)} chunks to do")
    samples_dir = run_folder(run) / "generated" / tag
    opts = dict(fid=use_fid, weights=o["weights"], swd_n=swd_n, keep=keep, batch_size=bs)
    opts.update(progress=progress, raps=what["raps"])
    if todo:
        w = min(workers or default_workers(), len(todo))
        _run_workers(_eval_worker, w, (run, state_dir, samples_dir, ranges, o["seed"], s, todo, res, opts))
    gen = _merge_parts(state_dir, len(ranges), extractor, swd_n, keep, what["raps"])
    kid_prc = dict(kid={} if o["kid"] else None, prc={} if o["prc"] else None)
    metrics = compare(gen, reference.stats, swd=swd_opts, **kid_prc)
    spread = bootstrap_spread(gen, reference.stats, swd=swd_opts, reps=o["bootstrap"], seed=o["seed"])
    record = {
        "run": str(run),
        "n": gen.n,
        **s,
        "seed": o["seed"],
        "nfe": _nfe(module, s, device),
        **reference.info,
        "extractor": None if extractor is None else extractor.name,
        "resize": None if extractor is None else extractor.resize,
        "swd_n": min(swd_n, gen.n),
        "metrics": metrics,
        "spread": spread,
        **floor_fields(reference.floor),
    }
    path = Path(out) if out else eval_dir / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    write_eval_arrays(gen, reference.stats, path.with_suffix(".npz"))  # for experiments.compare
    if o["panel"]:
        write_panel(gen, reference, int(o["panel"]), path.with_suffix(".png"), s["step"])
    print("eval: " + describe_floor(metrics, spread, reference.floor) + f"\nwrote {path}")
    return record


def _use_fid(o: dict[str, Any]) -> bool:
    return o["fid"] is True or (o["fid"] == "auto" and inception_available(o["weights"]))


def record_path(run: str, **kwargs: Any) -> Path:
    """Where ``evaluate_run(run, **kwargs)`` writes its record (nothing is computed)."""
    if kwargs.get("out"):
        return Path(kwargs["out"])
    module, cfg = load_run(run, map_location="cpu")
    o, _ = resolve_options(cfg, {k: v for k, v in kwargs.items() if k in DEFAULTS})
    s = sampler_settings(module, run, cfg, o["steps"], o["eta"], kwargs.get("precision"))
    return (
        run_folder(run)
        / "eval"
        / f"{record_name(tag_for(s, o['seed']), o, kwargs.get('ref'), _use_fid(o))}.json"
    )


def _nfe(module, s: dict, device: torch.device) -> int | None:
    """Denoiser calls for one sample (one extra cheap 1-image pass at the sampler's settings)."""
    net = module.net_for_sampling(True) if hasattr(module, "net_for_sampling") else None
    if net is None:
        return None
    module = module.to(device)
    with NFECounter(net) as c, torch.no_grad(), autocast_for(s["precision"], device):
        module.sample([0], steps=s["steps"], eta=s["eta"], use_ema=True)
    return c.calls


def _eval_worker(w, workers, run, state_dir, samples_dir, ranges, seed, s, todo, res, opts) -> None:
    device = _device_for(w, workers)
    extractor = InceptionFeatures(opts["weights"]).to(device) if opts["fid"] else None
    module = None
    stats = SetStats(
        extractor, spectra=True, swd_n=opts["swd_n"], keep_features=opts["keep"], keep_raps=opts["raps"]
    )
    part = state_dir / f"part-{uuid.uuid4().hex[:12]}.pt"
    mine, covered = todo[w::workers], []
    bar = tqdm(
        total=sum(ranges[c][1] - ranges[c][0] for c in mine),
        disable=not opts["progress"],
        position=w,
        desc=f"eval[{w}]",
        unit="img",
    )
    for c in mine:
        a, b = ranges[c]
        seeds = list(range(seed + a, seed + b))
        x = read_chunk(samples_dir, c, seeds) if samples_dir.is_dir() else None
        generated = x is None
        if generated:  # the bar follows sampling (the slow part), batch by batch
            if module is None:
                module, _ = _load(run, device)
            x = _generate(module, seeds, s, opts["batch_size"], device, bar)
        if res is not None and x.shape[-1] != res:
            raise ValueError(
                f"samples are {x.shape[-1]}² but the reference is {res}² (give --ref at {x.shape[-1]}²)"
            )
        for i in range(0, x.shape[0], opts["batch_size"]):
            xb = x[i : i + opts["batch_size"]].to(device)
            stats.update(xb, torch.arange(a + i, a + i + xb.shape[0]))
            if not generated:  # samples read from disk: the bar follows the metric pass
                bar.update(xb.shape[0])
        covered.append(c)
        tmp = part.with_suffix(".tmp")
        torch.save({"chunks": covered, "stats": stats.state_dict()}, tmp)
        os.replace(tmp, part)  # after every chunk: resumable
    bar.close()


def _done_chunks(state_dir: Path) -> set[int]:
    done: set[int] = set()
    for p in sorted(state_dir.glob("part-*.pt")):
        done |= set(torch.load(p, map_location="cpu", weights_only=True)["chunks"])
    return done


def _merge_parts(state_dir: Path, n_chunks: int, extractor, swd_n: int, keep: bool, raps: bool) -> SetStats:
    total = SetStats(extractor, spectra=True, swd_n=swd_n, keep_features=keep, keep_raps=raps)
    seen: list[int] = []
    for p in sorted(state_dir.glob("part-*.pt")):
        blob = torch.load(p, map_location="cpu", weights_only=True)
        part = SetStats(extractor, spectra=True, swd_n=swd_n, keep_features=keep, keep_raps=raps)
        part.load_state_dict(blob["stats"])
        total.merge(part)
        seen += blob["chunks"]
    if sorted(seen) != list(range(n_chunks)):
        raise RuntimeError(
            f"{state_dir}: chunks covered {sorted(seen)} != 0..{n_chunks - 1} (delete it and rerun)"
        )
    return total
