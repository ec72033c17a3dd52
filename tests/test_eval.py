"""Evaluation plumbing: streaming set statistics, the reference cache, the training callbacks and the
standalone ``sample`` / ``eval`` commands (docs/evaluation.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_fid import TinyFeatures  # tests/ is on sys.path (pytest rootdir-relative imports)

from callbacks.reference import load_reference, subset_order
from freqdiff.config import instantiate, load
from freqdiff.metrics.evaluator import SetStats, add_generated, compare, spectral_distance_from_raps
from freqdiff.metrics.fid import INCEPTION_FILE, WEIGHTS_ENV, InceptionWeightsNotFound, StatsCache
from freqdiff.metrics.spectra import spectral_distance


def fake_sample(seeds: list[int]) -> torch.Tensor:
    """A deterministic 'sampler': image i depends on its seed only, [B, 3, 16, 16] in [-1, 1]."""
    out = [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(int(s))) * 2 - 1 for s in seeds]
    return torch.stack(out)


def test_streaming_spectral_distance_equals_the_full_set_one():
    a, b = fake_sample(range(40)), fake_sample(range(100, 130)) * 0.5
    sa, sb = SetStats(spectra=True), SetStats(spectra=True)
    for i in range(0, 40, 7):
        sa.update(a[i : i + 7], torch.arange(i, min(i + 7, 40)))
    sb.update(b, torch.arange(30))
    q = lambda x: ((x + 1) * 127.5).round() / 127.5 - 1  # noqa: E731  (the uint8 quantisation)
    want = spectral_distance(q(a), q(b))
    assert spectral_distance_from_raps(sa.mean_raps(), sb.mean_raps()) == pytest.approx(want, rel=1e-9)
    assert compare(sa, sb)["spectral"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_generation_covers_seeds_once_and_matches_one_process(world_size):
    seeds = list(range(1000, 1023))
    net = TinyFeatures()
    kw = dict(spectra=True, swd_n=10, keep_features=True)
    single = SetStats(net, **kw)
    assert add_generated(single, fake_sample, seeds, batch_size=5) == list(range(23))
    parts, covered = [], []
    for rank in range(world_size):
        part = SetStats(net, **kw)
        covered += add_generated(part, fake_sample, seeds, rank, world_size, batch_size=4)
        parts.append(SetStats(net, **kw).load_state_dict(part.state_dict()))  # through a round trip
    assert sorted(covered) == list(range(23))
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert merged.n == single.n == 23
    torch.testing.assert_close(merged.fid.sum, single.fid.sum)
    torch.testing.assert_close(merged.fid.outer, single.fid.outer)
    torch.testing.assert_close(merged.raps_sum, single.raps_sum)
    assert torch.equal(merged.swd_images(), single.swd_images()) and merged.swd_images().shape[0] == 10
    assert torch.equal(merged.features(), single.features())


# ------------------------------------------------------------------ reference statistics cache
def _shards(folder: Path, n: int, seed: int, resolutions=(8, 16)) -> Path:
    from datamodules.manifest import ShardWriter, make_manifest, sample_dict, write_manifest
    from datamodules.synthetic import DeadLeaves

    imgs = {r: DeadLeaves(resolution=r, seed=seed).images(n, "train") for r in resolutions}
    with ShardWriter(folder, shard_size=7) as w:
        for i in range(n):
            w.write(sample_dict(i, {r: imgs[r][i] for r in resolutions}))
    write_manifest(folder, make_manifest(count=n, resolutions=list(resolutions), channels=3, shards=w.shards))
    return folder


def test_reference_cache_hits_on_the_same_key_and_misses_when_it_changes(tmp_path, monkeypatch):
    from datamodules.webdataset import ShardDataModule

    a, b = _shards(tmp_path / "a", 20, seed=0), _shards(tmp_path / "b", 20, seed=1)
    cache = StatsCache(tmp_path / "cache")
    net = TinyFeatures()

    def ref(path: Path, res: int, n: int) -> SetStats:
        dm = ShardDataModule(path=str(path), resolution=res, batch_size=6, num_workers=0)
        dm.setup()
        return load_reference(dm, "train", n, net, True, 0, False, cache, batch_size=6).stats

    first = ref(a, 16, 12)
    assert (cache.hits, cache.misses) == (0, 1) and first.n == 12
    from datamodules.webdataset import ShardDataModule as DM

    def no_reading(self, *args, **kwargs):
        raise AssertionError("a cache hit must not read the data")

    with monkeypatch.context() as m:
        m.setattr(DM, "eval_dataloader", no_reading)
        again = ref(a, 16, 12)
    assert (cache.hits, cache.misses) == (1, 1)
    torch.testing.assert_close(again.fid.outer, first.fid.outer)
    torch.testing.assert_close(again.raps_sum, first.raps_sum)
    ref(a, 16, 13)  # n changed
    ref(a, 8, 12)  # resolution changed
    other = ref(b, 16, 12)  # manifest changed
    assert (cache.hits, cache.misses) == (1, 4)
    assert not torch.equal(other.fid.sum, first.fid.sum)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4
    # the statistics are those of a seeded random subset of 12 images, read in one exact pass
    direct = SetStats(net, spectra=True)
    dm = ShardDataModule(path=str(a), resolution=16, num_workers=0)
    x, _ = dm.images_at(subset_order(20, 0)[:12], split="train")
    direct.update(x, torch.arange(12))
    torch.testing.assert_close(first.fid.sum, direct.fid.sum)


def test_kid_and_precision_recall_through_torch_fidelity():
    net = TinyFeatures()
    a, b = SetStats(net, keep_features=True), SetStats(net, keep_features=True)
    a.update(fake_sample(range(40)), torch.arange(40))
    b.update(fake_sample(range(40)), torch.arange(40))  # the same images
    same = compare(a, b, kid={"kid_subsets": 10}, prc={})
    assert abs(same["kid"]) < 1e-3 and same["precision"] == same["recall"] == 1.0
    c = SetStats(net, keep_features=True)
    c.update(fake_sample(range(40)) * 0.2, torch.arange(40))  # low-contrast images: far off
    far = compare(c, a, kid={"kid_subsets": 10}, prc={})
    assert far["kid"] > 100 * max(abs(same["kid"]), 1e-6) and far["precision"] < 0.5
    plain = SetStats(net)  # features not kept
    plain.update(fake_sample(range(4)), torch.arange(4))
    with pytest.raises(ValueError, match="keep_features"):
        compare(plain, a, kid={})


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Random torch-fidelity Inception weights (~96 MB) in a temporary folder."""
    from freqdiff.metrics.fid import write_random_inception_weights

    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILE)


# ------------------------------------------------------------------ callbacks during training
def tiny(tmp_path: Path, **extra) -> list[str]:
    o = {
        "run.root": str(tmp_path / "runs"),
        "data.path": str(tmp_path / "data" / "dl16"),
        "data.resolution": 16,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.synthetic.n_train": 64,
        "data.synthetic.n_val": 16,
        "module.sample_steps": 3,
        "+module.net.channel_mult": "[1,2]",
        "+module.net.attn_resolutions": "[8]",
        "trainer.max_steps": 2,
        "trainer.precision": "32-true",  # bf16 autocast is slower for a net this small on CPU
        "trainer.enable_progress_bar": False,
        "trainer.log_every_n_steps": 1,
        "callbacks.samples.every_n_steps": 0,
        "callbacks.samples.n": 4,
        "callbacks.eval.n": 6,
        "callbacks.eval.ref_n": 5,
        "callbacks.eval.swd_n": 6,
        "callbacks.eval.swd_min_res": 8,
        "callbacks.eval.every_n_steps": 1,
        "callbacks.eval.fid": False,
        "callbacks.strips.every_n_steps": 0,
        "callbacks.strips.frames": 2,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def scalar_tags(run_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir)).Reload()
    return {t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_quickstart_callbacks_log_weight_free_metrics_and_fid(tmp_path, monkeypatch, weights):
    from experiments.runner import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no weights anywhere ...
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(
        InceptionWeightsNotFound, match="hub/checkpoints"
    ):  # ... and fid=true fails before training
        run(load("quickstart", tiny(tmp_path, **{"callbacks.eval.fid": True})))
    for ckpt in (tmp_path / "runs").rglob("*.ckpt"):  # (the on-exception checkpoint) no step was taken
        assert torch.load(ckpt, weights_only=False)["global_step"] == 0

    monkeypatch.setenv(WEIGHTS_ENV, str(weights))
    out = run(load("quickstart", tiny(tmp_path, **{"callbacks.eval.fid": "auto", "run.name": "fid"})))
    run_dir = out["run_dir"]
    tags = scalar_tags(run_dir)
    for tag in ("eval/fid", "eval/spectral", "eval/swd/16", "eval/swd/8", "eval/swd/avg"):
        assert tags.get(tag) == [1, 2], (tag, sorted(tags))
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["step"] == 2 and final["n"] == 6 and final["ref_n"] == 5 and final["nfe"] == 3
    assert final["sampler"] == "DDPMModule.sample(steps=3, eta=0.0)" and final["weights"] == "ema"
    assert final["fid"] > 0 and final["spectral_distance"] == final["spectral"] > 0
    records = [json.loads(line) for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ref_cache"] for r in records] == ["miss", "miss"]  # computed once per fit, then kept
    assert (run_dir / "strips" / "step_0000002.png").is_file()
    assert (run_dir / "samples_vs_real.png").is_file()  # the evaluated samples beside the real images
    keys = list(out["module"].state_dict())
    assert not any("inception" in k or "net.Mixed" in k for k in keys)  # the metric is not in the module

    # the reference's statistics and its real-vs-real floor, cached for the next fit
    assert len(list((tmp_path / "runs" / ".cache" / "ref_stats").glob("*.pt"))) == 2
    assert final["ref_split"] == "val" and final["ref_path"].endswith("val") and final["floor_n"] == 5
    assert set(final["floor"]) == {"spectral", "swd/16", "swd/8", "swd/avg"}  # weight-free ones only
    assert set(final["spread"]) == set(final["floor"]) and all(v > 0 for v in final["spread"].values())
    for tag in ("eval/floor/spectral", "eval/floor/swd/16"):
        assert tags.get(tag) == [1, 2], (tag, sorted(tags))


def test_x0_hat_strip_runs_along_the_trajectory(tmp_path):
    from callbacks.strips import frame_steps, x0_hat_strip

    assert frame_steps(50, 8) == [0, 7, 14, 21, 28, 35, 42, 49] and frame_steps(3, 8) == [0, 1, 2]
    cfg = load("quickstart", tiny(tmp_path))
    module = instantiate(cfg.module, "module")
    strip, ts = x0_hat_strip(module, [0, 1], steps=5, frames=3)
    assert (
        strip.shape == (2 * 4, 3, 16, 16)
        and ts[0] == 1.0
        and ts[-1] == 0.0
        and ts == sorted(ts, reverse=True)
    )
    final = module.sample([0, 1], steps=5)
    torch.testing.assert_close(strip.view(2, 4, 3, 16, 16)[:, -1], final.clamp(-1, 1))


# ------------------------------------------------------------------ standalone commands
@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run folder with a checkpoint of an untrained tiny module (what sample / eval read)."""
    cfg = load("quickstart", tiny(tmp_path))
    module = instantiate(cfg.module, "module")
    d = tmp_path / "runs" / "quickstart" / "default"
    (d / "checkpoints").mkdir(parents=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    torch.save(
        {"state_dict": module.state_dict(), "freqdiff_config": container, "global_step": 7},
        d / "checkpoints" / "last.ckpt",
    )
    return d


def test_sample_command_writes_resumable_chunks(run_dir, tmp_path):
    from experiments.__main__ import main
    from experiments.evaluate import read_chunk, sample_run
    from freqdiff.checkpoints import load_run

    assert (
        main(["sample", str(run_dir), "--n", "10", "--chunk", "4", "--batch-size", "3", "--no-progress"]) == 0
    )
    folder = run_dir / "generated" / "ema-step7-steps3-eta0.0-seed0-32-true"
    chunks = sorted(folder.glob("chunk_*.npz"))
    assert [c.name for c in chunks] == ["chunk_000000.npz", "chunk_000001.npz", "chunk_000002.npz"]
    module, _ = load_run(run_dir)
    direct = module.sample([4, 5, 6, 7], steps=3)  # per-sample seeds: batching does not matter
    got = read_chunk(folder, 1, [4, 5, 6, 7])
    torch.testing.assert_close(got, ((direct.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    # resume: only the missing chunk is written again, with the same images
    before = {c.name: c.stat().st_mtime_ns for c in chunks}
    kept = read_chunk(folder, 2, [8, 9])
    chunks[2].unlink()
    sample_run(str(run_dir), n=10, chunk=4, batch_size=5, progress=False)
    after = {c.name: c.stat().st_mtime_ns for c in sorted(folder.glob("chunk_*.npz"))}
    assert after["chunk_000000.npz"] == before["chunk_000000.npz"] and set(after) == set(before)
    assert torch.equal(read_chunk(folder, 2, [8, 9]), kept)
    png = sample_run(str(run_dir), n=3, chunk=2, fmt="png", out=str(tmp_path / "png"), progress=False)
    assert sorted(p.name for p in (png / "chunk_000001").iterdir()) == ["00000002.png"]
    assert torch.equal(read_chunk(png, 0, [0, 1]), read_chunk(folder, 0, [0, 1, 2, 3])[:2])


def test_eval_command_is_resumable_and_reuses_samples(run_dir, monkeypatch):
    import experiments.evaluate as ev

    kw = dict(
        n=10,
        chunk=4,
        batch_size=4,
        swd_n=10,
        swd_min_res=8,
        fid=False,
        progress=False,
        ref_n=16,
        ref_split="val",
        cache_dir=str(run_dir / "cache"),
    )
    calls = []
    real_generate = ev._generate

    def crash_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return real_generate(*a, **k)

    monkeypatch.setattr(ev, "_generate", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate_run(str(run_dir), **kw)
    monkeypatch.setattr(ev, "_generate", real_generate)
    resumed = ev.evaluate_run(str(run_dir), **kw)  # chunks 1 and 2 only
    parts = list((run_dir / "eval").glob("*.state/*/part-*.pt"))
    assert sorted(sum((torch.load(p, weights_only=False)["chunks"] for p in parts), [])) == [0, 1, 2]
    m = resumed["metrics"]
    assert set(m) == {"spectral", "swd/16", "swd/8", "swd/avg"} and resumed["n"] == 10 and resumed["nfe"] == 3
    assert resumed["ref_n"] == 16 and resumed["ref_cache"] == "hit"  # the interrupted run cached it
    (path,) = (run_dir / "eval").glob("ema-step7-steps3-eta0.0-seed0-32-true-n10-val16-*.json")
    assert path == ev.record_path(str(run_dir), **kw)  # named by what changes the numbers
    saved = json.loads(path.read_text())
    assert saved["metrics"] == m and path.with_suffix(".png").is_file()  # with its samples-vs-real panel

    # from scratch, reading the samples that `sample` wrote (no sampling at all), with the cached reference
    for p in parts:
        p.unlink()
    ev.sample_run(str(run_dir), n=10, chunk=4, progress=False)
    monkeypatch.setattr(ev, "_generate", lambda *a, **k: pytest.fail("eval should read the sample chunks"))
    again = ev.evaluate_run(str(run_dir), **kw)
    assert again["ref_cache"] == "hit"
    for k, v in m.items():
        assert again["metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------ DDP (2 CPU processes, gloo)
DDP_SCRIPT = '''
import json, sys
from pathlib import Path

import freqdiff  # noqa: F401
import torch

from callbacks.fid import Evaluate
from experiments.runner import run
from freqdiff.config import load


class Probe(Evaluate):
    """Records the seeds this rank samples; rank 0 saves the reduced statistics and the EMA weights."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self.seen, orig = [], pl_module.sample

        def recording(seeds, **kw):
            self.seen += [int(s) for s in seeds]
            return orig(seeds, **kw)

        pl_module.sample = recording

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        out = Path(sys.argv[1])
        (out / f"seeds_{trainer.global_rank}_of_{trainer.world_size}.json").write_text(json.dumps(self.seen))
        if trainer.global_rank == 0:
            torch.save({"gen": self.last_stats.state_dict(), "ref": self._ref.state_dict(),
                        "module": pl_module.state_dict()}, out / "ddp.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    overrides = json.loads(sys.argv[2])
    probe = Probe(n=10, ref_n=12, split="train", batch_size=3, fid=True, weights=sys.argv[3], swd_n=7,
                  swd_min_res=8, cache_dir=str(out / "cache"))
    run(load("quickstart", overrides), callbacks=[probe])
'''


@pytest.mark.slow
def test_ddp_generation_covers_each_seed_once_and_equals_one_process(tmp_path):
    """Lightning DDP, 2 CPU processes (gloo): seeds r::2 per rank, all-reduced statistics = 1 process."""
    import subprocess
    import sys

    from datamodules.webdataset import ShardDataModule
    from freqdiff.metrics.evaluator import SetStats
    from freqdiff.metrics.fid import InceptionFeatures, write_random_inception_weights

    weights = write_random_inception_weights(tmp_path / INCEPTION_FILE)
    overrides = tiny(
        tmp_path,
        **{
            "trainer.max_steps": 1,
            "trainer.devices": 2,
            "+trainer.strategy": "ddp",
            "trainer.accelerator": "cpu",
            "callbacks.eval.every_n_steps": 0,
            "+callbacks.strips.at_end": False,
            "+callbacks.samples.final": False,
            "+callbacks.eval.at_end": False,  # the config's own evaluation: only the probe samples
        },
    )
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), json.dumps(overrides), str(weights)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    seeds = [json.loads((tmp_path / f"seeds_{r}_of_2.json").read_text()) for r in range(2)]
    assert seeds[0] == [0, 2, 4, 6, 8] and seeds[1] == [1, 3, 5, 7, 9]  # positions r::2 of seeds 0..9
    saved = torch.load(tmp_path / "ddp.pt", weights_only=False)

    # the same evaluation in one process: the trained module, and the reference in one exact pass
    cfg = load("quickstart", overrides)
    module = instantiate(cfg.module, "module")
    module.load_state_dict(saved["module"])
    net = InceptionFeatures(weights)
    single = SetStats(net, spectra=True, swd_n=7)
    add_generated(single, lambda s: module.sample(s, use_ema=True), list(range(10)), batch_size=3)
    ddp = SetStats(net, spectra=True, swd_n=7).load_state_dict(saved["gen"])
    assert ddp.n == single.n == 10 and ddp.fid.n == 10
    torch.testing.assert_close(ddp.fid.sum, single.fid.sum, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ddp.fid.outer, single.fid.outer, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ddp.raps_sum, single.raps_sum, rtol=1e-4, atol=1e-9)
    diff = (ddp.swd_images().int() - single.swd_images().int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # uint8 rounding of batch-size jitter

    dm = ShardDataModule(path=cfg.data.path, resolution=16, batch_size=5, num_workers=0)
    ref_one = SetStats(net, spectra=True)
    dm.setup()
    x, _ = dm.images_at(subset_order(dm.manifest["count"], 0)[:12], split="train")
    ref_one.update(x, torch.arange(12))
    ref_ddp = SetStats(net, spectra=True).load_state_dict(saved["ref"])
    assert ref_ddp.n == 12
    torch.testing.assert_close(ref_ddp.fid.sum, ref_one.fid.sum, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ref_ddp.fid.outer, ref_one.fid.outer, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ref_ddp.raps_sum, ref_one.raps_sum, rtol=1e-9, atol=1e-12)


def test_eval_command_fid_with_local_weights_and_an_npz_reference(run_dir, tmp_path, monkeypatch, weights):
    import numpy as np

    from experiments.__main__ import main
    from experiments.evaluate import evaluate_run
    from freqdiff.metrics.fid import InceptionFeatures

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    args = ["eval", str(run_dir), "--n", "4", "--ref-split", "val", "--no-progress", "--fid", "true"]
    assert main(args) == 2  # no weights anywhere: a clear error, exit code 2
    kw = dict(n=4, chunk=4, swd_n=0, fid=True, weights=str(weights), progress=False, ref_split="val")
    own = evaluate_run(str(run_dir), ref_n=6, cache_dir=str(tmp_path / "cache"), **kw)
    assert own["metrics"]["fid"] > 0 and own["extractor"].startswith(
        "torch-fidelity/inception-v3-compat/2048"
    )
    assert own["resize"] == "tf1-bilinear-299" and own["nfe"] == 3
    # the same reference as published statistics (mu, sigma of the same 6 images): the same FID
    from datamodules.webdataset import ShardDataModule

    dm = ShardDataModule(path=str(tmp_path / "data" / "dl16"), resolution=16, num_workers=0)
    ref = SetStats(InceptionFeatures(weights), spectra=False)
    dm.setup()
    x, _ = dm.images_at(subset_order(dm.val_manifest["count"], 0)[:6], split="val")  # the reference subset
    ref.update(x, torch.arange(6))
    npz = tmp_path / "ref_stats.npz"
    np.savez(npz, mu=ref.fid.mean().numpy(), sigma=ref.fid.cov().numpy(), n=6)
    published = evaluate_run(str(run_dir), ref=str(npz), out=str(tmp_path / "npz.json"), **kw)
    assert published["ref_cache"] == "npz" and set(published["metrics"]) == {"fid"}
    assert published["metrics"]["fid"] == pytest.approx(own["metrics"]["fid"], rel=1e-6)
