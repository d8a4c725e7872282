"""The on-disk frame store used for long videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sonic.post.frames import FrameStore


def test_frames_round_trip_in_chunks(tmp_path):
    store = FrameStore(4, 6, capacity=10, fps=25, folder=tmp_path)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (10, 4, 6, 3), dtype=np.uint8)
    store.append(frames[:3])
    store.append(frames[3:])
    assert len(store) == 10 and store.shape == (10, 4, 6, 3)
    np.testing.assert_array_equal(np.concatenate(list(store.chunks(4))), frames)
    images = store.images(2, 5)
    assert images.shape == (3, 4, 6, 3) and images.dtype == torch.float32
    # exactly the uint8 values over 255 (so 255 -> 1.0, 0 -> 0.0), the IMAGE convention
    np.testing.assert_array_equal(images.numpy(), frames[2:5].astype(np.float32) / np.float32(255))
    with pytest.raises(ValueError, match="full"):
        store.append(frames[:1])
    path = store.path
    assert path.exists()
    store.close()
    assert not path.exists()


def test_wrong_frames_are_rejected(tmp_path):
    store = FrameStore(4, 6, capacity=2, fps=25, folder=tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        store.append(np.zeros((1, 4, 6, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        store.append(np.zeros((1, 5, 6, 3), np.uint8))
    del store
    assert not list(tmp_path.iterdir())


def test_frames_file_policy():
    from sonic.post.frames import MAX_IMAGE_BATCH_BYTES, as_image_batch

    frames_at_limit = MAX_IMAGE_BATCH_BYTES // (512 * 512 * 3 * 4)  # 4 GB of float32 512x512 frames: 1365
    assert as_image_batch("auto", frames_at_limit, 512, 512) is True
    assert as_image_batch("auto", frames_at_limit + 1, 512, 512) is False
    assert as_image_batch("images", 10**6, 512, 512) is True and as_image_batch("frames file", 1, 8, 8) is False
    with pytest.raises(ValueError, match="output 'video' is not one of auto, images, frames file"):
        as_image_batch("video", 1, 8, 8)
