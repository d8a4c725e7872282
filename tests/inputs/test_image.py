"""Portrait preprocessing rules (spec §3.1, §3.3)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sonic.inputs.face import square_crop_box
from sonic.inputs.image import face_mask_image, load_image, output_size, prepare_portrait


@pytest.mark.parametrize(
    "size, min_res, expected",
    [
        ((144, 256), 128, (128, 256)),  # the reference portrait
        ((1000, 1000), 512, (512, 512)),  # square -> exactly min_resolution
        ((512, 800), 512, (512, 768)),  # 800/64 = 12.5 rounds half to even -> 12
        ((512, 864), 512, (512, 896)),  # 864/64 = 13.5 -> 14
        ((1920, 1080), 512, (896, 512)),  # 910.2/64 = 14.2 -> 14
    ],
)
def test_output_size_rounds_to_multiples_of_64(size, min_res, expected):
    assert output_size(*size, min_res) == expected


def test_face_mask_is_the_box_scaled_by_1_1_around_its_floor_centre():
    mask = face_mask_image(144, 256, (37.25, 37.0, 76.25, 76.25))
    rows = np.flatnonzero(mask[:, :, 0].any(axis=1))
    cols = np.flatnonzero(mask[:, :, 0].any(axis=0))
    # centre (75, 75) floor-divided; half size 83.875 // 2 = 41 -> [34, 116)
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (34, 116, 34, 116)
    assert set(np.unique(mask)) == {0, 255}


def test_face_mask_is_clipped_at_the_border():
    mask = face_mask_image(100, 100, (-10.0, 80.0, 40.0, 40.0))
    assert mask.shape == (100, 100, 3)
    assert mask[:, :, 0].any(axis=1)[99] and mask[:, :, 0].any(axis=0)[0]


def test_square_crop_when_the_expanded_box_is_already_square():
    assert square_crop_box((50, 100, 100, 100), 200, 400, 0.5) == (0, 50, 200, 250)


def test_square_crop_moves_towards_the_face_on_the_longer_side():
    # expanded box x 0..160, y 250..400 (clipped): width 160 > height 150, centre x 80 moves 5 px towards 60
    assert square_crop_box((10, 300, 100, 100), 200, 400, 0.5) == (0, 250, 150, 400)


def test_prepare_portrait_shapes_and_ranges():
    img = Image.fromarray((np.random.default_rng(0).random((300, 200, 3)) * 255).astype(np.uint8))
    tensors = prepare_portrait(img, (50, 60, 80, 90), 128)
    assert tensors.size == (128, 192)
    assert tensors.ref_image.shape == (3, 192, 128) and -1 <= tensors.ref_image.min() <= tensors.ref_image.max() <= 1
    assert tensors.face_mask.shape == (3, 192, 128) and 0 <= tensors.face_mask.min() and tensors.face_mask.max() <= 1
    assert tensors.clip_image.shape == (3, 224, 224) and 0 <= tensors.clip_image.min()


def test_load_image_applies_exif_rotation(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="could not be read"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
