"""``make spectra`` (experiments/spectra.py): the figures of an experiment and of a trained run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from freqdiff.config import instantiate, load


def _nonblank(path: Path) -> bool:
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    return img.shape[0] > 100 and img.std() > 5  # a drawn figure, not an empty canvas


def _small(tmp_path: Path) -> list[str]:
    return [
        f"run.root={tmp_path / 'runs'}",
        f"data.path={tmp_path / 'data'}",
        "data.resolution=16",
        "data.synthetic.n_train=64",
        "data.synthetic.n_val=64",
        "data.num_workers=0",
    ]


def test_spectra_of_an_experiment(tmp_path, capsys):
    from experiments.spectra import main

    assert main(["quickstart", *_small(tmp_path), "--n", "48"]) == 0
    out = tmp_path / "runs" / "quickstart" / "spectra"
    for name in ("data_spectra", "snr", "chromatography"):
        assert _nonblank(out / f"{name}.png"), name
        assert f"{name}.png" in capsys.readouterr().out or (out / f"{name}.png").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))  # the same figures for TensorBoard


def test_spectra_bad_input_is_one_line_with_exit_2(tmp_path, capsys):
    from experiments.spectra import main

    assert main(["quickstart", *_small(tmp_path), "module.nosuchkey=1"]) == 2
    assert "config error" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--run"]) == 2  # no checkpoint there
    assert str(tmp_path / "empty") in capsys.readouterr().err
    assert main(["quickstart", *_small(tmp_path), "--n", "100000"]) == 2  # more than the val split holds
    assert "--n 100000" in capsys.readouterr().err


def test_spectra_of_a_trained_run(tmp_path):
    from experiments.spectra import main

    cfg = load("quickstart", [*_small(tmp_path), "module.sample_steps=6"])
    module = instantiate(cfg.module, "module")
    with torch.no_grad():  # a module whose x0_hat depends on x_t, so the chromatography has changes
        for p in module.ema.net.out_conv.parameters():
            p.normal_(0, 0.05)
    d = tmp_path / "runs" / "quickstart" / "default"
    (d / "checkpoints").mkdir(parents=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    torch.save(
        {"state_dict": module.state_dict(), "freqdiff_config": container, "global_step": 3},
        d / "checkpoints" / "last.ckpt",
    )
    assert main([str(d), "--run", "--n", "16"]) == 0
    for name in ("data_spectra", "snr", "chromatography", "sample_spectra", "chromatography_empirical"):
        assert _nonblank(d / "spectra" / f"{name}.png"), name


def test_spectra_logger_during_training(tmp_path):
    """The callback logs the spectral distance, the power ratio per octave band, SWD per pyramid level
    and the RAPS figure to the run's TensorBoard at its interval and at the end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks.spectra import band_ratios, octave_bands
    from experiments.runner import run

    assert octave_bands(8) == [(1, 2), (2, 4), (4, 8), (8, 9)]
    f = torch.arange(9, dtype=torch.float64)
    r = band_ratios(f, torch.full((9,), 2.0), torch.ones(9))
    assert r == {"1": 2.0, "2-3": 2.0, "4-7": 2.0, "8": 2.0}
    o = [
        *_small(tmp_path),
        "data.batch_size=8",
        "module.sample_steps=2",
        "+module.net.channel_mult=[1,2]",
        "trainer.max_steps=2",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.final=false",
        "callbacks.strips.every_n_steps=0",
        "callbacks.eval.every_n_steps=0",
        "callbacks.eval.n=4",
        "callbacks.eval.ref_n=4",
        "callbacks.eval.swd_n=4",
        "callbacks.eval.swd_min_res=8",
        "callbacks.eval.fid=false",
        "callbacks.eval.panel=0",
        "+callbacks.spectra._target_=callbacks.spectra.SpectraLogger",
        "+callbacks.spectra.every_n_steps=1",
        "+callbacks.spectra.n=8",
        "+callbacks.spectra.ref_n=16",
    ]
    run(load("quickstart", o))
    acc = EventAccumulator(
        str(tmp_path / "runs" / "quickstart" / "default"), size_guidance={"images": 0}
    ).Reload()
    tags = acc.Tags()
    for tag in (
        "spectra/distance",
        "spectra/swd/16",
        "spectra/swd/8",
        "spectra/power_ratio/1",
        "spectra/power_ratio/4-7",
    ):
        assert tag in tags["scalars"], (tag, tags["scalars"])
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
    assert all(e.value > 0 for e in acc.Scalars("spectra/distance"))
    assert "spectra/raps" in tags["images"]


def test_training_fits_the_spectrum_weighted_time_sampler(tmp_path):
    """At the start of training the module gives the sampler the first training images and the data's
    checksum; the fitted spectrum is cached, and the run trains on its times."""
    from omegaconf import open_dict

    from experiments.runner import run

    o = [*_small(tmp_path), "data.batch_size=8", "trainer.max_steps=2", "trainer.precision=32-true"]
    o += [
        "+module.net.channel_mult=[1,2]",
        "trainer.enable_progress_bar=false",
        "callbacks.eval.every_n_steps=0",
    ]
    cfg = load("quickstart", o)
    with open_dict(cfg):
        for name in ("samples", "strips", "eval"):
            cfg.callbacks[name] = None
        cfg.module.time_sampler = {
            "_target_": "freqdiff.spectral_time.SpectrumWeightedTime",
            "resolution": 16,
            "reference_resolution": 16,
            "n_images": 32,
            "cache_dir": str(tmp_path / "cache"),
        }
    run(cfg)
    cached = list((tmp_path / "cache").glob("spectrum_time-*-16.npz"))
    assert len(cached) == 1
    with np.load(cached[0]) as z:
        assert z["ratio"].shape == (8,) and np.isclose(z["ratio"].mean(), 1.0)
