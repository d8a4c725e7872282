"""`python -m sonic lipsync`: a video's lip-sync offset, as one JSON line."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from ..exits import EXIT_OK
from . import DefaultsShown, face_box_arg


def add_parsers(sub) -> None:
    sync = sub.add_parser("lipsync", help="measure a video's lip-sync offset; prints one JSON line",
                          formatter_class=DefaultsShown)
    sync.add_argument("--video", required=True, type=Path, help="the talking-head video (MP4, MOV, MKV, WebM)")
    sync.add_argument("--audio", type=Path, help="sound track to measure against (default: the video's own)")
    sync.add_argument("--face-box", type=face_box_arg, help="X,Y,W,H of the face in video pixels (default: detected "
                      "on the first frame with dlib)")
    sync.add_argument("--search-range", type=float, default=0.4, help="largest offset searched, seconds either way")
    sync.add_argument("--no-track", action="store_true", help="do not follow head motion (fixed mouth region)")

    sync.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(lipsync(args)))
    return EXIT_OK


def lipsync(args: argparse.Namespace) -> dict:
    """offset_s > 0: the mouth moves after the sound (delay the audio by offset_s to fix it)."""
    from ..inputs.audio import read_audio
    from ..post import lipsync as sync
    from ..post.video_io import audio_start_time, read_video

    fps, chunks, video_start = read_video(args.video)
    audio_path = args.audio or args.video
    audio_start = audio_start_time(audio_path) if args.audio is None else 0.0
    if audio_start is None:
        chunks.close()
        raise ValueError(f"{args.video} has no sound track; give one with --audio")
    waveform, rate = read_audio(audio_path)
    box = args.face_box
    if box is None:
        from ..inputs.face import DlibFaceDetector, NoFaceError, largest_face

        first = next(chunks)
        try:
            box = largest_face(DlibFaceDetector(), first[0], "the video's first frame")[:4]
        except NoFaceError as exc:
            raise exc.with_hint("give the face box with --face-box X,Y,W,H (video pixels)") from None
        chunks = itertools.chain([first], chunks)
    estimate = sync.measure(chunks, fps, sync.mono(waveform), rate, box, args.search_range, track=not args.no_track)
    # a sound track that starts later than the picture is already delayed by the difference
    offset = estimate.offset_s - (audio_start - video_start)
    return {"offset_s": round(offset, 4) + 0.0, "confidence": round(estimate.confidence, 4),
            "reliable": bool(estimate.confidence >= sync.DEFAULT_MIN_CONFIDENCE and not estimate.at_edge),
            "fps": fps, "face_box": [round(float(v), 1) for v in box]}


