"""Face detection and the optional square face crop (spec §3.1, §3.2).

Two detectors, same interface (`detect(rgb uint8 [H, W, 3]) -> list of (x, y, w, h, score)`):

* `YoloFaceDetector` - the official YOLOv5m-face TorchScript file `yoloface_v5m.pt`, with the official
  pre/post-processing, so boxes (and therefore masks and crops) match the official implementation;
* `DlibFaceDetector` - dlib's built-in HOG frontal-face detector (package `dlib-bin`, no model file), the
  offline fallback when `yoloface_v5m.pt` is absent.

When several faces are found the largest is used (the official `maxface` loop has a bug that can pick a
smaller one; see spec §3.2).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..hub import SONIC_URL

FaceBox = tuple[float, float, float, float]  # x, y, w, h in pixels


class NoFaceError(ValueError):
    """No face was found. `with_hint` lets each front end say how its user gives the box (a flag, a widget)."""

    def __init__(self, subject: str, width: int, height: int, detector: str,
                 hint: str = "give the face box yourself (x, y, w, h)"):
        self.subject, self.width, self.height, self.detector = subject, width, height, detector
        super().__init__(f"no face found in {subject} ({width}x{height}, detector {detector}); use a picture with a "
                         f"clearly visible frontal face, or {hint}")

    def with_hint(self, hint: str) -> "NoFaceError":
        return NoFaceError(self.subject, self.width, self.height, self.detector, hint)


class FaceDetector(Protocol):
    """What face detection asks of a detector (`YoloFaceDetector`, `DlibFaceDetector`)."""

    name: str  # part of the face-analysis cache key

    def detect(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """uint8 [H, W, 3] -> faces as (x, y, w, h, score) in pixels."""


class YoloFaceDetector:
    name = "yoloface_v5m"
    input_short_side = 416
    conf_threshold = 0.5
    nms_threshold = 0.45

    def __init__(self, path: str | Path, device: torch.device):
        path = Path(path)
        try:
            # The official detector is a TorchScript archive; jit.load runs no pickled Python code.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript deprecation: the file is what it is
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise ValueError(
                f"face detector {path} could not be loaded ({exc}); download yoloface_v5m.pt again from "
                f"{SONIC_URL} or delete it to use the built-in dlib detector"
            ) from exc
        self.device = device

    @torch.no_grad()
    def detect(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        import cv2
        from torchvision.ops import nms

        h0, w0 = rgb.shape[:2]
        r = self.input_short_side / min(h0, w0)
        h1 = int(h0 * r + 31) // 32 * 32
        w1 = int(w0 * r + 31) // 32 * 32
        resized = cv2.resize(rgb, (w1, h1), interpolation=cv2.INTER_LINEAR)
        image = torch.from_numpy(resized).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        grids = []
        for stride in (8, 16, 32):
            ys, xs = torch.meshgrid(torch.arange(h1 // stride), torch.arange(w1 // stride), indexing="ij")
            grids.append(torch.stack((xs, ys), 2)[None, None].float().to(self.device))
        pred = self.net(image, grids)[0]  # [N, 16]: cx, cy, w, h, obj, 10 landmark coords, cls
        pred = pred[pred[:, 4] > self.conf_threshold]
        scores = pred[:, 4] * pred[:, 15]
        keep = scores > self.conf_threshold
        pred, scores = pred[keep], scores[keep]
        if pred.shape[0] == 0:
            return []
        boxes = torch.cat((pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2), dim=1)
        keep = nms(boxes, scores, self.nms_threshold)
        sx, sy = w0 / w1, h0 / h1
        faces = []
        for i in keep.tolist():
            x1, y1, x2, y2 = boxes[i].tolist()
            faces.append((x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy, float(scores[i])))
        return faces


class DlibFaceDetector:
    name = "dlib-hog"
    # dlib's HOG boxes span brows to chin; YOLOv5-face (WIDER FACE) boxes include the forehead. Scaling about
    # the centre by this factor matched the official detector's box on the reference portrait (63 -> 76 px).
    box_scale = 1.2
    min_score = 0.3  # HOG margins below this were false positives on test photos

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise RuntimeError(
                "no face detector available: install dlib-bin (pip install dlib-bin), put yoloface_v5m.pt in "
                "the models folder, or pass a face box"
            ) from exc
        self.detector = dlib.get_frontal_face_detector()

    def detect(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        # Small portraits: upsample once so that faces of ~40 px are still found.
        upsample = 1 if min(rgb.shape[:2]) < 640 else 0
        rects, scores, _ = self.detector.run(np.ascontiguousarray(rgb), upsample, 0.0)
        h, w = rgb.shape[:2]
        faces = []
        for rect, score in zip(rects, scores):
            if score < self.min_score:
                continue
            cx, cy = (rect.left() + rect.right() + 1) / 2, (rect.top() + rect.bottom() + 1) / 2
            half_w = (rect.right() + 1 - rect.left()) * self.box_scale / 2
            half_h = (rect.bottom() + 1 - rect.top()) * self.box_scale / 2
            x1, y1 = max(cx - half_w, 0.0), max(cy - half_h, 0.0)
            x2, y2 = min(cx + half_w, float(w)), min(cy + half_h, float(h))
            if x2 > x1 and y2 > y1:
                faces.append((x1, y1, x2 - x1, y2 - y1, float(score)))
        return faces


def make_face_detector(kind: str, yolo_path: Path, device: torch.device) -> FaceDetector | None:
    """'auto' = the official YOLO file when present, else dlib; 'none' = caller always gives a face box."""
    if kind == "none":
        return None
    if kind == "yolo" or (kind == "auto" and Path(yolo_path).is_file()):
        if not Path(yolo_path).is_file():
            raise FileNotFoundError(f"face detector {yolo_path} not found; download it from {SONIC_URL}")
        return YoloFaceDetector(yolo_path, device)
    if kind in ("auto", "dlib"):
        return DlibFaceDetector()
    raise ValueError(f"face detector {kind!r} is not one of auto, yolo, dlib, none")


def largest_face(detector: FaceDetector, rgb: np.ndarray, subject: str = "the portrait") -> FaceBox:
    """The largest face's box; NoFaceError names what was searched (`subject`)."""
    faces = detector.detect(rgb)
    if not faces:
        raise NoFaceError(subject, rgb.shape[1], rgb.shape[0], detector.name)
    x, y, w, h, _ = max(faces, key=lambda f: f[2] * f[3])
    return (x, y, w, h)


def validate_face_box(box: FaceBox, width: int, height: int) -> FaceBox:
    x, y, w, h = (float(v) for v in box)
    if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
        raise ValueError(f"face box {box} is invalid: give x, y, w, h with positive width and height")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise ValueError(f"face box {box} lies outside the {width}x{height} image")
    return (x, y, w, h)


def square_crop_box(face: FaceBox, width: int, height: int, expand_ratio: float) -> tuple[int, int, int, int]:
    """The official demo's square crop around a face: (x1, y1, x2, y2) in integer pixels (spec §3.1)."""
    x, y, w, h = face
    x1, y1, x2, y2 = x, y, x + w, y + h
    ex1, ey1 = max(x1 - expand_ratio * w, 0), max(y1 - expand_ratio * h, 0)
    ex2, ey2 = min(x2 + expand_ratio * w, width), min(y2 + expand_ratio * h, height)
    ew, eh = ex2 - ex1, ey2 - ey1
    half = min(ew, eh) / 2
    cx, cy = (ex1 + ex2) / 2, (ey1 + ey2) / 2
    fx, fy = (x1 + x2) / 2, (y1 + y2) / 2
    # Along the longer side, move the square towards the face centre (no further than the slack).
    if eh > ew:
        cy += np.sign(fy - cy) * min(abs(eh - ew) / 2, abs(fy - cy))
    elif ew > eh:
        cx += np.sign(fx - cx) * min(abs(eh - ew) / 2, abs(fx - cx))
    return tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))


def parse_face_box(text: str) -> FaceBox | None:
    """'x,y,w,h' in pixels (spaces allowed) -> a tuple; '' -> None; anything else -> ValueError."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ValueError(f"expected four numbers x,y,w,h in pixels, got {text!r}")
    return values


class FaceCache:
    """The last `size` face analyses (face box, crop box) by what they depend on: the image's pixels and the
    crop settings and detector. The same portrait with new audio is not analysed again."""

    def __init__(self, size: int = 32):
        from collections import OrderedDict

        self.size, self._items = size, OrderedDict()

    @staticmethod
    def key(image, *settings) -> tuple:
        """`image`: a PIL image; `settings`: whatever else changes the result (crop, margin, box, detector)."""
        import hashlib

        return (hashlib.sha256(image.tobytes()).hexdigest(), image.size, *settings)

    def get(self, key, compute):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = compute()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)
