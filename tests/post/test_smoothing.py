"""Zero-phase motion smoothing on a synthetic jittered clip made from a real photo."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sonic.post.smoothing import estimate_trajectory, region_weights, shift_frames, smoothing_shifts, zero_phase_ema

FPS = 25.0


@pytest.fixture(scope="module")
def jittered_clip():
    from skimage import data

    photo = data.astronaut()
    t = np.arange(150)
    smooth = np.stack([6 * np.sin(2 * np.pi * t / PERIODS[0]), 3 * np.sin(2 * np.pi * t / PERIODS[1] + 1)], axis=1)
    # frame-to-frame jitter (alternating, as from a wobbly camera or frame-wise head noise); orthogonal to the
    # sway over whole cycles, so it does not bias the timing measurement below
    jitter = np.stack([1.2 * (-1.0) ** t, 0.8 * (-1.0) ** (t + 1)], axis=1)
    position = smooth + jitter
    frames = np.stack([cv2.warpAffine(photo, np.float32([[1, 0, dx], [0, 1, dy]]), (512, 512),
                                      flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)[128:384, 128:384]
                       for dx, dy in position])
    return frames, position, smooth  # frames, true position of their content, the underlying (jitter-free) motion


def _chunks(frames, size=16):
    return (frames[i : i + size] for i in range(0, len(frames), size))


PERIODS = (50, 75)  # frames per cycle of the synthetic sway in x and y (whole cycles in 150 frames)


EDGE = 15  # frames at each end where a finite-length filter cannot be symmetric (about 4 / alpha)


def _delay_ms(trajectory: np.ndarray, axis: int) -> float:
    """Delay of the sway in one axis, from a least-squares sinusoid fit at its known frequency (robust to jitter),
    over the clip's interior."""
    trajectory = trajectory[EDGE:-EDGE]
    t = np.arange(EDGE, EDGE + len(trajectory))
    omega = 2 * np.pi / PERIODS[axis]
    basis = np.stack([np.sin(omega * t), np.cos(omega * t), np.ones_like(t, dtype=float)], axis=1)
    (a, b, _), *_ = np.linalg.lstsq(basis, trajectory[:, axis], rcond=None)
    phase = np.arctan2(b, a)  # a*sin + b*cos = r*sin(omega*t + phase): delay = -phase / omega
    return float(-phase / omega * 1000 / FPS)


def test_smoothing_removes_jitter_without_delay(jittered_clip):
    frames, position, motion = jittered_clip
    weights = region_weights(256, 256, "frame")
    raw = estimate_trajectory(_chunks(frames), weights)
    shifts = smoothing_shifts(raw, alpha=0.25)
    smoothed = np.concatenate(list(shift_frames(_chunks(frames), shifts)))
    after = estimate_trajectory(_chunks(smoothed), weights)

    def jitter(traj):  # mean frame-to-frame acceleration, px
        return float(np.abs(np.diff(traj, n=2, axis=0)).mean())

    assert jitter(after) < jitter(raw) / 4  # measured on the output frames themselves (about 11x here)
    # Timing: where the content of each output frame really is (its known position plus the applied shift),
    # against the underlying motion. (Re-measuring the output would add ~0.14 px of phase-correlation bias, and
    # the jittered input is itself no clean reference: its jitter leaks ~1.5 ms into a sinusoid fit.)
    moved = position + shifts
    for axis in (0, 1):  # measured: 0.01 ms and 0.65 ms
        assert abs(_delay_ms(moved, axis) - _delay_ms(motion, axis)) < 1.0
    # Control: the same alpha as a one-sided EMA delays the motion by about three frames (> 40 ms).
    one_sided = raw.copy()
    for i in range(1, len(raw)):
        one_sided[i] = 0.25 * raw[i] + 0.75 * one_sided[i - 1]
    assert _delay_ms(position + one_sided - raw, 0) - _delay_ms(motion, 0) > 40


def test_trajectory_is_measured_to_a_fraction_of_a_pixel(jittered_clip):
    frames, position, _ = jittered_clip
    raw = estimate_trajectory(_chunks(frames), region_weights(256, 256, "frame"))
    assert np.abs(raw - (position - position[0])).mean() < 0.2  # measured 0.09 px


def test_zero_phase_ema_is_symmetric_and_keeps_constants():
    impulse = np.zeros((401, 1))
    impulse[200] = 1
    response = zero_phase_ema(impulse, 0.3)[:, 0]
    np.testing.assert_allclose(response[170:200][::-1], response[201:231], atol=1e-12)  # zero phase
    assert abs(np.dot(np.arange(-200, 201), response)) < 1e-9  # centre of mass on the impulse: no delay
    np.testing.assert_allclose(zero_phase_ema(np.full((10, 2), 3.0), 0.2), 3.0)
    with pytest.raises(ValueError, match="alpha"):
        zero_phase_ema(impulse, 0)


def test_regions():
    face = (40, 30, 100, 120)
    w = region_weights(200, 200, "face without mouth", face)
    assert w[:30].sum() == 0 and w[30 + 72 :].sum() == 0 and w[40:90, 50:130].sum() > 0
    assert region_weights(200, 200, "face", face)[130:150, 50:130].sum() > 0
    with pytest.raises(ValueError, match="needs a face box"):
        region_weights(200, 200, "face")


def test_smoothing_keeps_lip_sync(espeak):
    """A talking clip (picture 60 ms late) with frame-to-frame head jitter: smoothing removes the jitter and the
    lip-sync offset measured before and after moves by less than 1 ms."""
    from sonic.post import lipsync
    from sonic.post.smoothing import smooth_video

    speech = espeak.synthesize(espeak.SENTENCES[1])
    clip = espeak.talking_clip(speech, FPS, 0.06, sway_px=2.0, seed=21)
    rng = np.random.default_rng(21)
    jitter = rng.normal(0.0, 1.0, (len(clip), 2))
    jittered = np.stack([cv2.warpAffine(frame, np.float32([[1, 0, dx], [0, 1, dy]]), (256, 256),
                                        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
                         for frame, (dx, dy) in zip(clip, jitter)])
    smoothed = np.concatenate(list(smooth_video(lambda: _chunks(jittered), 256, 256, alpha=0.3,
                                                region="face without mouth", face_box=espeak.FACE_BOX)))

    def offset(frames):
        return lipsync.measure(_chunks(frames), FPS, speech.samples, speech.sample_rate, espeak.FACE_BOX)

    before, after = offset(jittered), offset(smoothed)
    weights = region_weights(256, 256, "face without mouth", espeak.FACE_BOX)

    def jitter_px(frames):
        return float(np.abs(np.diff(estimate_trajectory(_chunks(frames), weights), n=2, axis=0)).mean())

    assert jitter_px(smoothed) < jitter_px(jittered) / 2
    assert before.offset_s == pytest.approx(0.06, abs=0.01) and after.confidence > lipsync.DEFAULT_MIN_CONFIDENCE
    assert abs(after.offset_s - before.offset_s) < 0.001, (before.offset_s, after.offset_s)
