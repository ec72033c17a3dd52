"""Evaluation during training: FID, multi-scale SWD and spectral distance of EMA samples (docs/evaluation.md).

``Evaluate`` (alias ``FIDCallback``) samples ``n`` images with the EMA weights every
``every_n_steps`` optimiser steps and at the end of training, and compares them with real images:

- ``eval/fid`` (Heusel et al. 2017): torch-fidelity's Inception (TF1-bilinear resize to 299, i.e.
  torchmetrics' ``antialias=False``), weights from a local file only (``weights``, then
  ``$FREQDIFF_INCEPTION_WEIGHTS``, then the torch hub cache). ``fid=True`` fails at setup, before
  training, when the file is absent (the message says where to put it); ``fid="auto"`` computes FID
  only when a file is found; ``fid=False`` never.
- ``eval/swd/<res>`` and ``eval/swd/avg`` (Karras et al. 2018): sliced Wasserstein distance per
  Laplacian-pyramid level, ×10³, on the first ``swd_n`` samples and real images.
- ``eval/spectral``: RAPS log-distance between the mean spectra of the samples and the real images.
- optional ``eval/kid``, ``eval/precision``, ``eval/recall`` (torch-fidelity; these keep features).

Fair-comparison rules made explicit: the reference is a seeded random subset of ``ref_n`` real
images of ``split`` (``callbacks.reference``: one exact pass, cached on disk under a key of the split
manifest checksum, resolution, ref_n, subset seed, extractor with its weights' sha256 and resize);
every record names the reference actually used (``ref_path``, ``ref_split``: ``train`` when no val
split exists, ``ref_manifest``, ``ref_n``, ``ref_seed``). Each weight-free metric comes with its
real-vs-real floor at the same n (``floor``, from two disjoint real subsets, cached with the
reference) and a bootstrap spread over the samples (``spread``; ``bootstrap`` resamplings).
Generation is sharded over DDP ranks by position in one global list of per-sample seeds
(rank r takes positions r::world_size), so the sample set does not depend on the world size; the
EMA weights are always used. Every evaluation is logged with its n, sampler and NFE as TensorBoard
hparams (beside the run's own hyper-parameters, ``trainer.logger.hparams``) and appended to
``<run>/eval/metrics.jsonl``; the last one also goes to
``<run>/final_metrics.json`` and, with ``panel``, ``<run>/samples_vs_real.png`` shows the evaluated
samples beside the real ones (the quickstart uses this instead of sampling the same seeds twice);
``<run>/eval/final.npz`` keeps the first 64 samples and real images and both mean spectra for the
comparison report (``callbacks.reference.write_eval_arrays``).
The Inception network lives here, never in the module's ``state_dict``. It only calls
``pl_module.sample``, so it works for every method.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.reference import (  # noqa: F401
    NFECounter,
    describe_floor,
    load_reference,
    split_manifest,
    write_eval_arrays,
)
from freqdiff.analysis.images import make_grid, save_png, side_by_side
from freqdiff.config import check_args
from freqdiff.metrics.evaluator import SetStats, add_generated, all_reduce_stats, bootstrap_spread, compare
from freqdiff.metrics.fid import (
    RESIZE,
    InceptionFeatures,
    InceptionWeightsNotFound,
    StatsCache,
    resolve_inception_weights,
)


class Evaluate(L.Callback):
    def __init__(
        self,
        every_n_steps: int = 0,  # evaluation interval in optimiser steps (0: only at the end)
        at_end: bool = True,  # evaluate when training ends
        n: int = 10000,  # generated samples (seeds seed .. seed + n - 1)
        ref_n: int | None = None,  # real images for the reference (None: n; capped at the split size)
        split: str = "train",  # real split of the reference: "train" (FID convention) or "val"
        ref_seed: int = 0,  # seed of the random reference subset (and of the floor's second subset)
        floor: bool = True,  # real-vs-real floors of the weight-free metrics (needs 2 ref_n real images)
        bootstrap: int = 10,  # resamplings for the spread of the weight-free metrics (0 or 1: none)
        seed: int = 0,  # first sample seed
        steps: int | None = None,  # sampler steps (None: the module's default)
        eta: float | None = None,  # sampler eta (None: the module's default)
        batch_size: int = 64,  # samples per sample() call and real images per batch
        fid: bool | str = True,  # True | "auto" (only when weights are found) | False
        weights: str | None = None,  # Inception weights file (then $FREQDIFF_INCEPTION_WEIGHTS, hub cache)
        spectral: bool = True,  # eval/spectral
        swd: bool = True,  # eval/swd/<res>
        swd_n: int = 1024,  # images per set for SWD (descriptors are held in memory)
        swd_min_res: int = 16,  # coarsest pyramid level
        swd_patches: int = 128,  # descriptors per image and level
        kid: bool = False,  # eval/kid (needs FID features; keeps them)
        prc: bool = False,  # eval/precision, eval/recall (keeps features)
        cache_dir: str | None = None,  # reference cache (None: $FREQDIFF_CACHE_DIR or ~/.cache/freqdiff)
        panel: int = 0,  # at the end, <run>/samples_vs_real.png of this many evaluated samples (<= swd_n)
        upscale: int = 4,  # nearest upscaling of that PNG
    ):
        if not (fid is True or fid is False or fid == "auto"):
            raise ValueError(f"fid={fid!r}: expected 'auto', true or false")
        if (kid or prc) and fid is False:
            raise ValueError("kid / prc need the Inception features: set fid=true or 'auto'")
        check_args(
            "a non-negative integer",
            every_n_steps=every_n_steps,
            swd_n=swd_n,
            panel=panel,
            bootstrap=bootstrap,
        )
        check_args("a positive integer", n=n, batch_size=batch_size, upscale=upscale, swd_patches=swd_patches)
        check_args("a positive integer", allow_none=True, ref_n=ref_n, steps=steps)
        if n < 2:
            raise ValueError(f"n={n}: expected an integer >= 2")
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: expected 'train' or 'val'")
        self.every_n_steps, self.at_end, self.n, self.ref_n = every_n_steps, at_end, int(n), ref_n
        self.split, self.seed, self.steps, self.eta, self.batch_size = split, seed, steps, eta, batch_size
        self.ref_seed, self.floor, self.bootstrap = int(ref_seed), bool(floor), int(bootstrap)
        self.fid, self.weights, self.spectral = fid, weights, spectral
        self.swd_n = int(swd_n) if swd else 0
        self.swd_opts = {"min_res": swd_min_res, "patches_per_image": swd_patches}
        self.kid, self.prc, self.cache_dir = kid, prc, cache_dir
        self.panel, self.upscale = int(panel), int(upscale)
        self._extractor: InceptionFeatures | None = None
        self._use_fid = False
        self._ref: SetStats | None = None
        self._floor: dict[str, Any] | None = None
        self._ref_ready = False
        self._last_step = -1
        self.history: list[dict[str, Any]] = []
        self.last_stats: SetStats | None = None

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._use_fid, self._ref, self._ref_ready = False, None, False
        if self.fid is True:
            resolve_inception_weights(self.weights)  # fail fast, before training, naming where to put it
            self._use_fid = True
        elif self.fid == "auto":
            try:
                resolve_inception_weights(self.weights)
                self._use_fid = True
            except InceptionWeightsNotFound as e:
                if trainer.is_global_zero:
                    warnings.warn(f"Evaluate: FID off ({e})", stacklevel=2)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.at_end:
            return
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module, final=True)
        elif trainer.is_global_zero and self.history:  # just evaluated at this step
            self._write_final(Path(trainer.default_root_dir), self.history[-1])
            self._write_panel(trainer)

    def missing_final_outputs(self, trainer) -> list[str]:
        """End-of-training outputs not (yet) written for this step (``experiments.runner``)."""
        if not self.at_end:
            return []
        run_dir, missing = Path(trainer.default_root_dir), []
        try:
            done = json.loads((run_dir / "final_metrics.json").read_text()).get("step") == trainer.global_step
        except (OSError, ValueError):
            done = False
        if not done:
            missing.append("final_metrics.json")
        if self.panel and not (run_dir / "samples_vs_real.png").is_file():
            missing.append("samples_vs_real.png")
        return missing

    # ---------------------------------------------------------------- evaluation
    def _extractor_for(self, device: torch.device) -> InceptionFeatures | None:
        if not self._use_fid:
            return None
        if self._extractor is None:
            self._extractor = InceptionFeatures(self.weights)
        return self._extractor.to(device)

    def reference(self, trainer, pl_module) -> SetStats | None:
        """Reference statistics, computed (or loaded) once per fit by all ranks; rank 0 keeps them."""
        if not self._ref_ready:
            dm = trainer.datamodule
            count = split_manifest(dm, self.split)["count"]
            ref_n = min(self.ref_n or self.n, count)
            if ref_n < (self.ref_n or self.n) and trainer.is_global_zero:
                warnings.warn(
                    f"Evaluate: the {self.split} split holds {count} images; ref_n = {ref_n}", stacklevel=2
                )
            ref = load_reference(
                dm,
                self.split,
                ref_n,
                self._extractor_for(pl_module.device),
                self.spectral,
                self.swd_n,
                self.kid or self.prc,
                StatsCache(self.cache_dir),
                seed=self.ref_seed,
                floor=self.floor_options(),
                bootstrap=self.bootstrap,
                batch_size=self.batch_size,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
            )
            self._ref, self._ref_info, self._floor = ref.stats, ref.info, ref.floor
            self._ref_ready = True
        return self._ref

    def floor_options(self) -> dict[str, Any] | None:
        """The metric settings of the floor (None: no floor; {} without SWD: spectral only)."""
        if not self.floor:
            return None
        return dict(self.swd_opts) if self.swd_n else {}

    @torch.no_grad()
    def evaluate(self, trainer, pl_module, final: bool = False) -> dict[str, Any] | None:
        """Sample, reduce over ranks, compare (rank 0 logs and returns the record)."""
        self._last_step = trainer.global_step
        t0 = time.perf_counter()
        ref = self.reference(trainer, pl_module)
        extractor = self._extractor_for(pl_module.device)
        gen = SetStats(
            extractor,
            spectra=self.spectral,
            swd_n=self.swd_n,
            keep_features=self.kid or self.prc,
            keep_raps=self.bootstrap > 1,
        )
        seeds = list(range(self.seed, self.seed + self.n))
        net = pl_module.net_for_sampling(True) if hasattr(pl_module, "net_for_sampling") else None
        counter, first, sample_s = NFECounter(net), [True], [0.0]

        def sample(batch_seeds: list[int]) -> torch.Tensor:  # sample_seconds: these calls only
            t = time.perf_counter()
            with counter if first[0] else contextlib.nullcontext():
                x = pl_module.sample(batch_seeds, steps=self.steps, eta=self.eta, use_ema=True)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            first[0], sample_s[0] = False, sample_s[0] + time.perf_counter() - t
            return x

        with trainer.precision_plugin.forward_context():
            add_generated(gen, sample, seeds, trainer.global_rank, trainer.world_size, self.batch_size)
        gen = all_reduce_stats(gen)
        if not trainer.is_global_zero:
            return None
        self.last_stats = gen  # the reduced statistics of this evaluation (for inspection)
        metrics = compare(
            gen,
            ref,
            swd=self.swd_opts if self.swd_n else None,
            kid={} if self.kid else None,
            prc={} if self.prc else None,
        )
        swd = self.swd_opts if self.swd_n else None
        spread = bootstrap_spread(gen, ref, swd=swd, reps=self.bootstrap, seed=self.seed)
        record = {
            "step": trainer.global_step,
            "n": gen.n,
            **self._ref_info,
            "sampler": self.sampler_name(pl_module),
            "steps": self.steps if self.steps is not None else getattr(pl_module, "sample_steps", None),
            "eta": self.eta if self.eta is not None else getattr(pl_module, "sample_eta", None),
            "nfe": counter.calls if net is not None else None,
            "weights": "ema",
            "extractor": None if extractor is None else extractor.name,
            "resize": None if extractor is None else RESIZE,
            "swd_n": min(self.swd_n, gen.n) if self.swd_n else 0,
            "seconds": round(time.perf_counter() - t0, 2),
            "sample_seconds": round(sample_s[0], 3),
            "metrics": metrics,
            "spread": spread,
            **floor_fields(self._floor),
        }
        self._log(trainer, record, final)
        return record

    def sampler_name(self, pl_module) -> str:
        steps = self.steps if self.steps is not None else getattr(pl_module, "sample_steps", None)
        eta = self.eta if self.eta is not None else getattr(pl_module, "sample_eta", None)
        which = getattr(pl_module, "sampler", None)  # a module with several samplers names the one in use
        extra = f", sampler={which}" if isinstance(which, str) else ""
        return f"{type(pl_module).__name__}.sample(steps={steps}, eta={eta}{extra})"

    def _log(self, trainer, record: dict[str, Any], final: bool) -> None:
        scalars = {f"eval/{k}": float(v) for k, v in record["metrics"].items()}
        scalars.update({f"eval/floor/{k}": float(v) for k, v in (record.get("floor") or {}).items()})
        hp = {
            f"eval/{k}": record.get(k)
            for k in ("n", "ref_n", "ref_split", "ref_path", "sampler", "nfe", "weights", "extractor")
        }
        hp = {k: ("none" if v is None else v) for k, v in hp.items()}
        logger = trainer.logger
        run_hp = dict(getattr(logger, "hparams", None) or {})  # the run's own settings (the runner logs them)
        hp = {**{k: v for k, v in run_hp.items() if isinstance(v, (str, int, float, bool))}, **hp}
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hp, metrics=scalars, step=record["step"])  # scalars at this step + hparams
            logger.experiment.add_text(
                "eval/record", "```\n" + json.dumps(record, indent=1) + "\n```", record["step"]
            )
        elif logger is not None:
            logger.log_metrics(scalars, step=record["step"])
        self.history.append(record)
        run_dir = Path(trainer.default_root_dir)
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        with open(run_dir / "eval" / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if final:
            self._write_final(run_dir, record)
            self._write_panel(trainer)
            if self.last_stats is not None:  # samples and spectra for experiments.compare
                write_eval_arrays(self.last_stats, self._ref, run_dir / "eval" / "final.npz")
        text = describe_floor(record["metrics"], record["spread"], self._floor)
        print(
            f"eval @ step {record['step']} (n={record['n']}, {record['sampler']}, NFE {record['nfe']}): "
            f"{text} "
            f"[{record['seconds']:.1f} s]"
        )

    def _write_panel(self, trainer) -> None:
        """``<run>/samples_vs_real.png``: the first ``panel`` evaluated samples beside as many real images."""
        if not self.panel or self.last_stats is None or self._ref is None:
            return
        gen, real = self.last_stats.swd_images(), self._ref.swd_images()
        if gen is None or real is None:
            return
        k = min(self.panel, gen.shape[0], real.shape[0])
        to_float = lambda u8: u8[:k].float() / 127.5 - 1  # noqa: E731
        img = side_by_side(
            {
                f"samples (EMA, step {trainer.global_step})": make_grid(to_float(gen), upscale=self.upscale),
                f"real ({self._ref_info['ref_split']}, random)": make_grid(
                    to_float(real), upscale=self.upscale
                ),
            }
        )
        save_png(img, Path(trainer.default_root_dir) / "samples_vs_real.png")
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            exp.add_image("samples_vs_real", img, trainer.global_step, dataformats="HWC")

    @staticmethod
    def _write_final(run_dir: Path, record: dict[str, Any]) -> None:
        """``<run>/final_metrics.json``: the record, metrics at top level (also as ``spectral_distance``)."""
        m = record["metrics"]
        summary = {k: v for k, v in record.items() if k != "metrics"}
        summary.update({"spectral_distance": m.get("spectral"), **m})
        tmp = run_dir / "final_metrics.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(run_dir / "final_metrics.json")


def floor_fields(floor: dict[str, Any] | None) -> dict[str, Any]:
    """The record fields of a reference's floor: ``floor``, ``floor_spread``, ``floor_n``."""
    if not floor:
        return {"floor": None, "floor_spread": None, "floor_n": None}
    return {"floor": floor["metrics"], "floor_spread": floor.get("spread", {}), "floor_n": floor["n"]}


FIDCallback = Evaluate
