"""Face detectors: the offline dlib fallback on a real photo, and the official YOLO post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sonic.inputs.face import DlibFaceDetector, NoFaceError, YoloFaceDetector, largest_face, validate_face_box


def test_dlib_finds_the_astronaut_face():
    from skimage import data

    x, y, w, h = largest_face(DlibFaceDetector(), data.astronaut())
    cx, cy = x + w / 2, y + h / 2
    # Eileen Collins' face in the 512x512 test photo spans roughly x 170-270, y 60-200
    assert 180 < cx < 260 and 80 < cy < 180
    assert 60 < w < 160 and 60 < h < 160


def test_no_face_is_a_clear_error():
    with pytest.raises(NoFaceError, match="no face found"):
        largest_face(DlibFaceDetector(), np.full((256, 256, 3), 128, np.uint8))
    assert issubclass(NoFaceError, ValueError)


@pytest.mark.parametrize("box", [(0, 0, 0, 10), (500, 0, 10, 10), (float("nan"), 0, 10, 10)])
def test_invalid_face_boxes_are_rejected(box):
    with pytest.raises(ValueError, match="face box"):
        validate_face_box(box, 100, 100)


class _FakeYolo(torch.nn.Module):
    """Stands in for yoloface_v5m.pt: returns fixed predictions in resized-image pixels."""

    def __init__(self, pred: torch.Tensor):
        super().__init__()
        self.register_buffer("pred", pred)

    def forward(self, image: torch.Tensor, grids: list[torch.Tensor]) -> torch.Tensor:
        return self.pred[None]


def test_yolo_postprocessing_thresholds_nms_and_rescale(tmp_path):
    # Input 200x100 (w x h): r = 4.16 -> resized 832x416. Three candidates (cx, cy, w, h, obj, 10 lm, cls):
    rows = [
        [400, 200, 100, 120, 0.9] + [0] * 10 + [0.9],  # kept
        [405, 205, 100, 120, 0.8] + [0] * 10 + [0.9],  # overlaps the first -> removed by NMS
        [100, 100, 50, 50, 0.4] + [0] * 10 + [0.9],  # objectness below 0.5 -> dropped
    ]
    scripted = torch.jit.script(_FakeYolo(torch.tensor(rows, dtype=torch.float32)))
    path = tmp_path / "yoloface_v5m.pt"
    scripted.save(str(path))
    detector = YoloFaceDetector(path, torch.device("cpu"))
    faces = detector.detect(np.zeros((100, 200, 3), np.uint8))
    assert len(faces) == 1
    x, y, w, h, score = faces[0]
    sx, sy = 200 / 832, 100 / 416
    assert (x, y, w, h) == pytest.approx((350 * sx, 140 * sy, 100 * sx, 120 * sy))
    assert score == pytest.approx(0.81)


def test_broken_yolo_file_names_the_file(tmp_path):
    path = tmp_path / "yoloface_v5m.pt"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="yoloface_v5m.pt"):
        YoloFaceDetector(path, torch.device("cpu"))


def test_face_cache_keeps_the_last_analyses_by_pixels_and_settings():
    from PIL import Image

    from sonic.inputs.face import FaceCache

    cache, computed = FaceCache(size=2), []
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")

    def analyse(name):
        return lambda: computed.append(name) or name

    assert cache.get(FaceCache.key(red, False), analyse("red")) == "red"
    assert cache.get(FaceCache.key(red.copy(), False), analyse("again")) == "red"  # same pixels: not analysed again
    cache.get(FaceCache.key(red, True), analyse("red cropped"))  # other settings: analysed
    cache.get(FaceCache.key(blue, False), analyse("blue"))  # a third entry pushes out the least recently used
    cache.get(FaceCache.key(red, False), analyse("red again"))
    assert computed == ["red", "red cropped", "blue", "red again"] and len(cache) == 2
