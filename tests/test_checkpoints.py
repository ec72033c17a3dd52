"""Checkpoint loading below the modules (freqdiff/checkpoints.py): safe, with clear errors."""

from __future__ import annotations

import pytest
import torch

from freqdiff.checkpoints import CONFIG_KEY, CheckpointError, find_checkpoint, load_run, read_checkpoint


class Foreign:  # an arbitrary object: weights_only loading must refuse to build it
    pass


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        find_checkpoint(tmp_path)


def test_foreign_truncated_and_unsafe_files_are_clear_errors(tmp_path):
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(plain)
    no_cfg = tmp_path / "nocfg.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, no_cfg)
    with pytest.raises(CheckpointError, match=CONFIG_KEY):
        load_run(no_cfg)
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}, CONFIG_KEY: {"module": {}}}, full)
    data = full.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.ckpt: not a readable"):
        read_checkpoint(truncated)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, CONFIG_KEY: {}, "obj": Foreign()}, unsafe)
    with pytest.raises(CheckpointError, match="unsafe.ckpt"):
        read_checkpoint(unsafe)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.ckpt"):
        read_checkpoint(text)
