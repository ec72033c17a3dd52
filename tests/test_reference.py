"""The reference of an evaluation (callbacks/reference.py): random subsets that represent a
class-sorted split, real-vs-real floors and bootstrap spreads, truthful labels in every output, and
a standalone ``make eval`` that reproduces the run's own numbers (docs/evaluation.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import tiny  # tests/ is on sys.path

from callbacks.reference import load_reference, subset_order
from freqdiff.config import load
from freqdiff.metrics.evaluator import SetStats, bootstrap_spread, compare
from freqdiff.metrics.fid import WEIGHTS_ENV, InceptionWeightsNotFound, StatsCache

SWD = {"min_res": 8, "patches_per_image": 32}


def write_set(folder: Path, images: np.ndarray, labels: list[int] | None = None, names=None) -> Path:
    """A shard set of uint8 images [N, H, W, 3] (optionally labelled) in ``folder``."""
    from datamodules.manifest import ShardWriter, make_manifest, sample_dict, write_manifest

    r = images.shape[1]
    with ShardWriter(folder, shard_size=37) as w:
        for i, img in enumerate(images):
            w.write(sample_dict(i, {r: img}, None if labels is None else labels[i]))
    m = make_manifest(count=len(images), resolutions=[r], channels=3, shards=w.shards, labels=names)
    write_manifest(folder, m)
    return folder


def dead_leaves(n: int, seed: int, r: int = 16) -> np.ndarray:
    from datamodules.synthetic import DeadLeaves

    return DeadLeaves(resolution=r, seed=seed).images(n, "train")


def datamodule(path: Path, **kw):
    from datamodules.webdataset import ShardDataModule

    dm = ShardDataModule(path=str(path), batch_size=16, num_workers=0, **kw)
    dm.setup()
    return dm


def test_a_reference_subset_of_a_class_sorted_split_holds_every_class_in_proportion(tmp_path):
    # 4 classes of 50 images each, sorted by class (as an image folder of class sub-folders is);
    # class k is a flat grey of level 40 + 50 k with a little noise, so an image's class can be read off it
    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(4), 50)
    imgs = (40 + 50 * classes[:, None, None, None] + rng.integers(0, 8, (200, 16, 16, 3))).astype(np.uint8)
    dm = datamodule(write_set(tmp_path / "sorted", imgs, classes.tolist(), names=list("abcd")))
    ref = load_reference(dm, "train", 40, None, True, 40, False, None, seed=0)
    read = ref.stats.swd_images()  # the reference images as read, uint8 [40, 3, 16, 16]
    got = np.bincount(((read.float().mean((1, 2, 3)) - 40) / 50).round().long().numpy(), minlength=4)
    # hypergeometric: 10 per class expected, sd 2.4; the first 40 files would be 40, 0, 0, 0
    assert got.sum() == 40 and got.min() >= 3 and got.max() <= 17, got
    # the statistics are those of exactly the images the permutation selects
    want = subset_order(200, 0)[:40]
    assert np.array_equal(np.sort(np.bincount(classes[want], minlength=4)), np.sort(got))
    direct = SetStats(spectra=True)
    x, index = dm.images_at(want, split="train")
    direct.update(x, torch.arange(40))
    torch.testing.assert_close(ref.stats.raps_sum, direct.raps_sum, rtol=1e-9, atol=1e-12)
    assert torch.equal(direct.swd_images() if direct.swd_n else read, read)
    # another seed, another subset
    other = load_reference(dm, "train", 40, None, True, 40, False, None, seed=1)
    assert not torch.equal(other.stats.swd_images(), read)


def test_the_floor_is_cached_reproducible_and_below_a_bad_model(tmp_path, monkeypatch):
    from datamodules.webdataset import ShardDataModule

    dm = datamodule(write_set(tmp_path / "dl", dead_leaves(240, seed=3)))
    cache = StatsCache(tmp_path / "cache")
    kw = dict(seed=0, floor=SWD, bootstrap=8)
    ref = load_reference(dm, "train", 60, None, True, 60, False, cache, **kw)
    floor = ref.floor
    assert floor["n"] == 60 and set(floor["metrics"]) == {"spectral", "swd/16", "swd/8", "swd/avg"}
    assert set(floor["spread"]) == set(floor["metrics"]) and all(v > 0 for v in floor["spread"].values())
    # it is the metric between positions [0, 60) and [60, 120) of the subset permutation
    order = subset_order(240, 0)
    a, b = SetStats(spectra=True, swd_n=60), SetStats(spectra=True, swd_n=60)
    a.update(dm.images_at(order[:60], "train")[0], torch.arange(60))
    b.update(dm.images_at(order[60:120], "train")[0], torch.arange(60))
    for k, v in compare(b, a, swd=SWD).items():
        assert floor["metrics"][k] == pytest.approx(v, rel=1e-6), k
    # cached with the reference: a second load reads no pass (only the SWD images, by index)
    with monkeypatch.context() as m:
        m.setattr(ShardDataModule, "eval_dataloader", lambda *a, **k: pytest.fail("cache hit read a pass"))
        again = load_reference(datamodule(tmp_path / "dl"), "train", 60, None, True, 60, False, cache, **kw)
    assert again.floor == floor and again.info["ref_cache"] == "hit"
    assert torch.equal(again.stats.swd_images(), ref.stats.swd_images())
    # a clearly bad model (uniform noise) lies above the floor in every weight-free metric, far above
    # it where the metric resolves anything at n = 60 (the 8² residual of 16² images holds 4 patch
    # positions per image: its floor is high, which is what the floor is there to show)
    noise = SetStats(spectra=True, swd_n=60, keep_raps=True)
    noise.update(torch.rand(60, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1, range(60))
    bad, spread = compare(noise, ref.stats, swd=SWD), bootstrap_spread(noise, ref.stats, SWD, reps=8)
    for k in floor["metrics"]:
        assert bad[k] > floor["metrics"][k], k
    for k in ("spectral", "swd/16"):
        assert bad[k] > floor["metrics"][k] + 3 * (floor["spread"][k] + spread[k]), k


def test_the_bootstrap_spread_matches_the_spread_over_independent_sets(tmp_path):
    # the spread of one set of 50 (bootstrap) against the sd of the metric over 8 disjoint sets of 50
    dm = datamodule(write_set(tmp_path / "dl", dead_leaves(600, seed=5)))
    ref = load_reference(dm, "train", 200, None, True, 200, False, None, seed=0).stats
    x = dm.images_at(np.arange(200, 600), "train")[0]
    values, spreads = [], []
    for k in range(8):
        s = SetStats(spectra=True, swd_n=50, keep_raps=True)
        s.update(x[50 * k : 50 * (k + 1)], range(50))
        values.append(compare(s, ref, swd=SWD))
        spreads.append(bootstrap_spread(s, ref, SWD, reps=20, seed=k))
    for key in ("spectral", "swd/16", "swd/8"):
        sd = float(np.std([v[key] for v in values], ddof=1))
        boot = float(np.median([s[key] for s in spreads]))
        assert 0.5 < boot / sd < 2.0, (key, boot, sd)


def test_a_run_without_val_records_train_everywhere_and_eval_reproduces_it(tmp_path, monkeypatch):
    """No val split: every output names train; make eval with no arguments gives the same numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    import experiments.evaluate as ev
    from experiments.__main__ import main
    from experiments.runner import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    train = write_set(tmp_path / "only_train", dead_leaves(64, seed=0))
    over = {"data.path": str(train), "callbacks.eval.every_n_steps": 0, "callbacks.eval.ref_n": 20}
    over.update({"callbacks.eval.n": 20, "callbacks.eval.swd_n": 20, "callbacks.eval.split": "val"})
    out = run(load("quickstart", tiny(tmp_path, **over)))
    run_dir = Path(out["run_dir"])
    final = json.loads((run_dir / "final_metrics.json").read_text())
    (record,) = [json.loads(x) for x in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    for r in (final, record):
        assert r["ref_split"] == "train" and r["ref_requested"] == "val" and r["ref_n"] == 20
        assert Path(r["ref_path"]).resolve() == train.resolve() and len(r["ref_manifest"]) == 16
        assert r["floor_n"] == 20 and set(r["floor"]) == set(r["spread"]) == {
            "spectral",
            "swd/16",
            "swd/8",
            "swd/avg",
        }
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0}).Reload()
    start = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hp["eval/ref_split"].string_value == "train"

    # make eval with no arguments: the run's own settings, the same numbers
    monkeypatch.setattr(ev, "_generate", ev._generate)
    again = ev.evaluate_run(str(run_dir), progress=False)
    assert again["metrics"] == record["metrics"] and again["spread"] == record["spread"]
    assert again["floor"] == record["floor"] and again["ref_split"] == "train" and again["n"] == 20
    first = ev.record_path(str(run_dir))
    assert first.is_file() and first.with_suffix(".png").is_file()
    # another reference (a shard folder) gives another file; the first stays
    other = write_set(tmp_path / "other", dead_leaves(64, seed=9))
    ev.evaluate_run(str(run_dir), ref=str(other), progress=False)
    second = ev.record_path(str(run_dir), ref=str(other))
    assert second != first and second.is_file() and first.is_file()
    assert json.loads(second.read_text())["ref_path"] == str(other)

    # KID / PR without Inception weights: refused before any sampling, saying what to do
    monkeypatch.setattr(ev, "_generate", lambda *a, **k: pytest.fail("sampled before checking weights"))
    with pytest.raises(InceptionWeightsNotFound, match="--weights"):
        ev.evaluate_run(str(run_dir), n=8, kid=True, progress=False)
    assert main(["eval", str(run_dir), "--n", "8", "--prc", "--no-progress"]) == 2
