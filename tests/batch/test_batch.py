"""`python -m sonic batch` (sonic/batch/): jobs files, binding, and whole batches against real servers.

The live part starts two real ComfyUI servers (--cpu, tiny models; one 0.8.0, one 0.18.2), a real S3 server (rclone serve s3, which
checks signatures) and an HTTP file server, all on 127.0.0.1, and runs the batch command as a user would, in a
process where torch, numpy and ComfyUI cannot be imported (a submitting machine needs no GPU stack).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from servers import NEWEST, OLDEST, ROOT, ComfyUI, FileServer, S3Server, comfyui_dir

from sonic.jobs import comfy_api, jobsfile as jobs_mod
from sonic.jobs.manifest import Manifest

FAST = {"steps": 1, "min_resolution": 128, "duration": 1.0}
NO_GPU_STACK = ("torch", "numpy", "comfy", "folder_paths", "diffusers", "transformers", "cv2", "av", "PIL", "librosa")
BATCH = ("import sys\n"
         f"for name in {NO_GPU_STACK!r}: sys.modules[name] = None  # importing any of them now fails\n"
         "from sonic.cli import main\n"
         "sys.exit(main(['batch'] + sys.argv[1:]))\n")


# -- without servers: the jobs file and its binding ---------------------------------------------------------------
@pytest.fixture(scope="module")
def schema(comfy_env):
    """/object_info as ComfyUI builds it from the pack's INPUT_TYPES."""
    return {name: {"input": cls.INPUT_TYPES()} for name, cls in comfy_env["mappings"].items()}


@pytest.fixture()
def inputs(tmp_path, tiny_dir):
    shutil.copy(tiny_dir / "inputs" / "portrait.png", tmp_path / "portrait.png")
    shutil.copy(tiny_dir / "inputs" / "speech.wav", tmp_path / "speech.wav")
    return tmp_path


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_every_bad_row_is_reported_at_once(schema, inputs):
    workflow = jobs_mod.Workflow.load(None)
    (inputs / "notes.txt").write_text("not a picture")
    rows = [
        {"image": "portrait.png", "audio": "speech.wav", "seed": "abc"},                    # 1 bad value
        {"image": "missing.png", "audio": "speech.wav", "steps": 0},                         # 2 missing file, range
        {"id": "a", "image": "portrait.png", "audio": "speech.wav", "crop": "maybe"},        # 3 not a boolean
        {"id": "a", "image": "notes.txt", "audio": "ftp://host/x.wav"},                      # 4 dup id, type, scheme
        {"id": "../escape", "image": "portrait.png", "audio": "speech.wav", "wobble": 3},    # 5 id, unknown column
        {"audio": "s3://bucket-only"},                                                       # 6 no image, bad s3
    ]
    with pytest.raises(jobs_mod.JobsError) as err:
        jobs_mod.load_jobs(_write(inputs / "jobs.jsonl", rows), workflow, schema)
    problems = "\n".join(err.value.problems)
    seed_max = schema["SonicSampler"]["input"]["required"]["seed"][1]["max"]
    # named as the user edits them: a column of the jobs file, and what to write in it
    for expected in [(f"line 1 (id 1): column seed: 'abc' is not a whole number; write a whole number from 0 to "
                      f"{seed_max}, or leave the cell empty to keep the workflow's value (72589)"),
                     "line 2 (id 2): column image: file 'missing.png' not found",
                     ("line 2 (id 2): column steps: 0 is outside 1..200; write a whole number from 1 to 200, or leave "
                      "the cell empty to keep the workflow's value (25)"),
                     ("line 3 (id a): column crop: 'maybe' is not true or false; write true or false (yes/no, 1/0), or "
                      "leave the cell empty to keep the workflow's value (false)"),
                     "line 4 (id a): id 'a' is also used on line 3",
                     "line 4 (id a): column image: notes.txt is not a image file",
                     "line 4 (id a): column audio: ftp:// is not supported",
                     "line 5 (id ../escape): id must be",
                     "column 'wobble' is not an input of any node in sonic_batch_api.json",
                     "line 6 (id 6): column image: give a local path",
                     "line 6 (id 6): column audio: 's3://bucket-only' is not s3://bucket/key"]:
        assert expected in problems, problems
    assert len(err.value.problems) == 11


def test_csv_columns_are_typed_and_bound_by_node_type_and_input_name(schema, inputs):
    (inputs / "jobs.csv").write_text("id,image,audio,seed,crop,expand_ratio,face_box,lip_sync_offset,crf,watermark\n"
                                     "first,portrait.png,speech.wav,7,yes,0.75,\"10,20,30,40\",0.03,23,Studio X\n"
                                     ",https://example.com/p.jpg,s3://in/speech.mp3,,,,,,,\n")
    # the same workflow with other node ids: binding never depends on them
    workflow = jobs_mod.Workflow.load(None)
    renumbered = {str(int(k) + 100): v for k, v in workflow.prompt.items()}
    for node in renumbered.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                node["inputs"][name] = [str(int(value[0]) + 100), value[1]]
    workflow.prompt = renumbered
    first, second = jobs_mod.load_jobs(inputs / "jobs.csv", workflow, schema)
    assert first.params == {"seed": 7, "crop": True, "expand_ratio": 0.75, "face_box": "10,20,30,40",
                            "lip_sync_offset": 0.03, "crf": 23, "watermark": "Studio X"}
    assert (second.id, second.params, second.image.kind, second.audio.kind) == ("2", {}, "url", "s3")
    assert first.image.sha256 == hashlib.sha256((inputs / "portrait.png").read_bytes()).hexdigest()
    prompt = workflow.bind(first, ("sonic-batch/p.png", ""), ("", "https://x/a.wav"), "sonic-batch/first", schema)
    by_type = {}
    for node in prompt.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    assert by_type["SonicLoadImage"][0]["image"] == "sonic-batch/p.png" and by_type["SonicLoadImage"][0]["path_or_url"] == ""
    assert by_type["SonicLoadAudio"][0]["path_or_url"] == "https://x/a.wav"
    assert by_type["SonicSampler"][0]["seed"] == 7 and by_type["SonicPreData"][0]["crop"] is True
    assert [n["face_box"] for t in ("SonicPreData", "SonicLipSyncCalibrate", "SonicSmoothMotion")
            for n in by_type[t]] == ["10,20,30,40"] * 3
    assert by_type["SonicVideoEncode"][0] | {} == {**by_type["SonicVideoEncode"][0], "crf": 23, "watermark": "Studio X",
                                                   "filename_prefix": "sonic-batch/first"}
    assert workflow.prompt == renumbered  # the workflow itself is untouched
    # a job's key changes with anything that changes its output
    again = jobs_mod.load_jobs(inputs / "jobs.csv", workflow, schema)
    assert again[0].key == first.key
    (inputs / "portrait.png").write_bytes((inputs / "portrait.png").read_bytes() + b"\0")
    assert jobs_mod.load_jobs(inputs / "jobs.csv", workflow, schema)[0].key != first.key


def test_job_errors_name_the_jobs_file_column(schema, comfy_env):
    """The nodes word their errors for a ComfyUI user (widgets); a failed job of a batch says the column instead,
    and what to write there. The messages here are the real ones, raised by the pack's code."""
    import numpy as np

    from sonic.batch.runner import column_hints, value_problems
    from sonic.engine.pipeline import load_speech

    workflow = jobs_mod.Workflow.load(None)

    def node_error(node_type, exc):
        return comfy_api.describe_error({"node_id": "4", "node_type": node_type, "exception_type": type(exc).__name__,
                                         "exception_message": str(exc)})[0]

    with pytest.raises(ValueError) as too_long:
        load_speech((np.zeros((1, 16000), np.float32), 16000), duration=5.0)
    error = node_error("SonicPreData", too_long.value)
    assert column_hints(error, workflow, schema) == error + (
        "; in the jobs file write at most 1.00 in column duration (seconds), or 0 or an empty cell for the whole audio")
    with pytest.raises(ValueError) as bad_box:  # Sonic PreData reads the box before anything else
        comfy_env["mappings"]["SonicPreData"]().prepare(None, None, None, face_box="10,20")
    assert "Sonic PreData's face_box '10,20' must be four numbers" in str(bad_box.value)
    assert column_hints(node_error("SonicPreData", bad_box.value), workflow, schema) == (
        "SonicPreData (node 4): ValueError: column face_box '10,20' must be four numbers x,y,w,h in pixels, or empty "
        "to detect the face")
    rejected = comfy_api.describe_rejection({"error": {"message": "Prompt outputs failed validation"}, "node_errors": {
        "5": {"class_type": "SonicSampler", "errors": [{"message": "Value 0 smaller than min of 1", "details": "steps"}]},
        "4": {"class_type": "SonicPreData", "errors": [{"message": "Required input is missing", "details": "audio"}]}}})
    assert column_hints(rejected, workflow, schema) == ("Prompt outputs failed validation; SonicSampler (node 5): "
                                                        "Value 0 smaller than min of 1: column steps; SonicPreData "
                                                        "(node 4): Required input is missing: audio")  # a link, no column
    # a face box that is no box is caught with the other problems, before anything runs
    jobs = comfy_env["base"] / "input" / "boxes.csv"
    jobs.write_text('id,image,audio,face_box\nok,portrait.png,speech.wav,"10, 20, 30.5, 40"\n'
                    "half,portrait.png,speech.wav,10\nwords,portrait.png,speech.wav,the middle\n")
    assert value_problems(jobs, workflow, schema) == [
        f"boxes.csv line {line} (id {job}): column face_box: {value!r} is not four numbers; write x,y,w,h of the face "
        "in the photo's pixels (e.g. 120,80,200,240; in a CSV file inside double quotes), or leave the cell empty to "
        "detect the face" for line, job, value in ((3, "half", "10"), (4, "words", "the middle"))]


def test_workflow_must_be_api_format_with_one_encoder(tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(ValueError, match="UI workflow; batch runs need the API format"):
        jobs_mod.Workflow.load(ui)
    api = json.loads(jobs_mod.DEFAULT_WORKFLOW.read_text())
    api["99"] = copy.deepcopy(api["6"])
    (tmp_path / "two.json").write_text(json.dumps(api))
    with pytest.raises(ValueError, match="exactly one SonicVideoEncode node"):
        jobs_mod.Workflow.load(tmp_path / "two.json")


def test_execution_errors_are_told_apart():
    oom = {"node_id": "5", "node_type": "SonicSampler", "exception_type": "torch.OutOfMemoryError",
           "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB"}
    face = {"node_id": "4", "node_type": "SonicPreData", "exception_type": "ValueError",
            "exception_message": "no face found in the portrait; give face_box"}
    assert comfy_api.describe_error(oom) == ("SonicSampler (node 5): OutOfMemoryError: CUDA out of memory. "
                                             "Tried to allocate 2.00 GiB", True)
    assert comfy_api.describe_error(face)[1] is False


def test_manifest_survives_a_cut_last_line(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"id": "a", "status": "done"}) + "\n" + '{"id": "b", "sta')
    manifest = Manifest(str(path))
    assert list(manifest.latest) == ["a"]
    manifest.append({"id": "b", "status": "failed"})
    assert {r["id"]: r["status"] for r in map(json.loads, path.read_text().splitlines()[::2])} == {"a": "done", "b": "failed"}
    assert Manifest(str(path)).latest["b"]["status"] == "failed"


# -- against real servers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dir):
    """Two ComfyUI servers, an S3 server with an `inputs` and an `outputs` bucket, an HTTP server, the inputs."""
    comfyui_dir(), comfyui_dir(NEWEST)  # skip (or fail in CI) before starting anything
    top = tmp_path_factory.mktemp("batch")
    material = top / "material"
    material.mkdir()
    shutil.copy(tiny_dir / "inputs" / "portrait.png", material / "portrait.png")
    shutil.copy(tiny_dir / "inputs" / "speech.wav", material / "speech.wav")
    import imageio_ffmpeg
    from PIL import Image

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(material / "speech.wav"), "-b:a", "64k",
                    str(material / "speech.mp3")], check=True)
    gradient = (Image.linear_gradient("L").resize((144, 256)).convert("RGB"))
    gradient.save(material / "noface.png")  # a photo with no face in it
    # one server of each tested ComfyUI version behind the same batch
    servers = [ComfyUI(top / name, tiny_dir, threads=1, version=version).start()
               for name, version in (("a", OLDEST), ("b", NEWEST))]
    s3 = S3Server(top / "s3", ("inputs", "outputs"))
    files = FileServer(material)
    try:
        for server in servers:
            server.wait()
        client = s3.client()
        for name in ("portrait.png", "speech.wav", "speech.mp3"):
            client.upload_file(str(material / name), "inputs", f"speech-lab/{name}")
        yield {"servers": servers, "s3": s3, "files": files, "material": material, "top": top}
    finally:
        files.stop()
        s3.stop()
        for server in servers:
            server.stop()


def _env(world) -> dict:
    return {**os.environ, **world["s3"].env, "PYTHONPATH": str(ROOT)}


def run_batch(world, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BATCH, *args], env=_env(world), capture_output=True, text=True,
                          timeout=timeout, cwd=world["top"])


def start_batch(world, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BATCH, *args], env=_env(world), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=world["top"])


def follow_batch(world, args, when, act, timeout=300) -> tuple[int, list[dict], str]:
    """Run the batch, call act(event, process) on the first event for which when(event) holds, let it end.
    -> (exit status, every JSON event, stderr)."""
    process = start_batch(world, *args)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if when(json.loads(line)):
                act(json.loads(line), process)
                break
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, [json.loads(line) for line in lines + stdout.splitlines(keepends=True)], stderr


def _servers(world) -> list[str]:
    return [arg for server in world["servers"] for arg in ("--server", server.url)]


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _history_size(server) -> int:
    return len(_get(server.url + "/history"))


def _check_mp4(path: Path) -> dict:
    import av

    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video=0))
        info = {"frames": frames, "video_codec": video.codec_context.name, "audio_codec": audio.codec_context.name,
                "fps": float(video.average_rate), "audio_s": float(audio.duration * audio.time_base),
                "prompt": json.loads(container.metadata["prompt"])}
    return info


def _audio_lag_s(video: Path, source: Path, reach_s: float = 1.0) -> float:
    """How much later (s, negative: earlier) the sound in an MP4 is than in the audio file it was made from: where
    the video's decoded track matches the source best (normalized cross-correlation, to the sample at 16 kHz)."""
    import av
    import numpy as np

    def decode(path):
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        with av.open(str(path)) as container:
            frames = [out for frame in container.decode(audio=0) for out in resampler.resample(frame)]
        frames += resampler.resample(None)
        return np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames]).astype(np.float64)

    clip, whole = decode(video), decode(source)
    size = 1 << (len(clip) + len(whole)).bit_length()
    # correlation[k] = sum over t of clip[t] * whole[t + k]: the clip is the source `k` samples on (sound earlier)
    correlation = np.fft.irfft(np.conj(np.fft.rfft(clip, size)) * np.fft.rfft(whole, size), size)
    shifts = np.arange(-int(reach_s * 16000), int(reach_s * 16000) + 1)
    energy = np.r_[0.0, np.cumsum(whole ** 2)]
    overlap = energy[np.clip(shifts + len(clip), 0, len(whole))] - energy[np.clip(shifts, 0, len(whole))]
    score = correlation[shifts % size] / np.sqrt(overlap + 1e-12)
    return -float(shifts[int(np.argmax(score))]) / 16000


SECRETS = ("X-Amz", "Signature", "Credential", S3Server.KEY)  # what a presigned link would carry


def _secrets_in(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret.lower() in text.lower()]


def _sampler_seed(prompt: dict) -> int:
    return next(n["inputs"]["seed"] for n in prompt.values() if n["class_type"] == "SonicSampler")


def test_mixed_batch_over_two_servers_then_resume(world):
    material, files = world["material"], world["files"]
    rows = [
        {"id": "local-wav", "image": "portrait.png", "audio": "speech.wav", "seed": 11, **FAST},
        {"id": "url-mp3", "image": f"{files.url}/portrait.png", "audio": "speech.mp3", "seed": 12, **FAST},
        {"id": "s3-both", "image": "s3://inputs/speech-lab/portrait.png", "audio": "s3://inputs/speech-lab/speech.mp3",
         "seed": 13, **FAST},
        {"id": "no-face", "image": "noface.png", "audio": "speech.wav", "seed": 14, **FAST},
        {"id": "url-wav", "image": "portrait.png", "audio": f"{files.url}/speech.wav", "seed": 15, **FAST,
         "lip_sync_offset": 0.05},  # a manual lip-sync correction: applied whatever the measurement says
        {"id": "s3-missing", "image": "s3://inputs/speech-lab/nobody.png", "audio": "speech.wav", "seed": 16, **FAST},
        {"id": "too-long", "image": "portrait.png", "audio": "speech.wav", "seed": 17, **FAST, "duration": 600},
    ]
    jobs = _write(material / "mixed.jsonl", rows)
    out = world["top"] / "out-mixed"
    args = [str(jobs), *_servers(world), "--out", str(out), "--json", "--backoff", "0.2"]
    done = run_batch(world, *args)
    assert done.returncode == 1, done.stderr  # two jobs failed
    events = _events(done.stdout)
    assert events[0]["event"] == "plan" and events[0]["to_run"] == len(rows)
    records = {r["id"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    assert sorted(records) == sorted(r["id"] for r in rows)
    for row in rows:
        record = records[row["id"]]
        if row["id"] == "no-face":
            assert record["status"] == "failed" and record["attempts"] == 1, record  # bad input: never retried
            assert record["error"].startswith("SonicPreData (node 4): NoFaceError: no face") and "face box" in record["error"]
            # said as the batch user fixes it: the column of the jobs file, not Sonic PreData's widget
            assert "type the face box into column face_box of the jobs file as x,y,w,h" in record["error"], record
            assert "widget" not in record["error"] and record["lipsync_applied"] is None
            assert not (out / "no-face.mp4").exists()
            continue
        if row["id"] == "too-long":  # the real audio's length, from the node's own message
            assert record["status"] == "failed" and record["attempts"] == 1, record
            audio_s = re.search(r"longer than the audio \(([\d.]+) s\)", record["error"])[1]
            assert 0.5 < float(audio_s) < 5 and record["error"].endswith(
                f"in the jobs file write at most {audio_s} in column duration (seconds), or 0 or an empty cell for the "
                "whole audio"), record["error"]
            continue
        if row["id"] == "s3-missing":  # the job's own bad input, found before anything is queued: never retried
            assert record["status"] == "failed" and record["attempts"] == 1, record
            assert "s3://inputs/speech-lab/nobody.png does not exist" in record["error"], record
            continue
        assert record["status"] == "done", record
        video = out / f"{row['id']}.mp4"
        assert record["output"] == str(video) and record["bytes"] == video.stat().st_size
        assert record["sha256"] == hashlib.sha256(video.read_bytes()).hexdigest()
        info = _check_mp4(video)
        assert (info["video_codec"], info["audio_codec"], info["frames"], info["fps"]) == ("h264", "aac", 23, 25.0)
        assert abs(info["audio_s"] - 23 / 25) < 0.05  # the sound is as long as the picture (1 s asked, 0.92 s made)
        assert _sampler_seed(info["prompt"]) == row["seed"]  # each job's own seed reached the sampler
        if row["id"] == "s3-both":  # s3:// inputs were downloaded by the runner and uploaded like local files
            loaders = [n["inputs"] for n in info["prompt"].values()
                       if n["class_type"] in ("SonicLoadImage", "SonicLoadAudio")]
            assert [(n["path_or_url"], n.get("image", n.get("audio", ""))[:12]) for n in loaders] == \
                [("", "sonic-batch/")] * 2, loaders
            import av

            with av.open(str(video)) as container:
                embedded = json.dumps([container.metadata, *(stream.metadata for stream in container.streams)])
            assert "prompt" in embedded and not _secrets_in(embedded), _secrets_in(embedded)
        local = material / row["image"]
        assert record["image"] == (str(local) if local.is_file() else row["image"])  # inputs as found
        assert record["params"]["seed"] == row["seed"]
        assert isinstance(record["offset"], float) and isinstance(record["confidence"], float)
        # what Lip-Sync Calibrate did with its measurement, in its own words
        assert isinstance(record["lipsync_applied"], bool) and isinstance(record["lipsync_warning"], bool)
        delayed_ms = float(re.search(r"audio delayed by ([+-][\d.]+) ms$", record["lipsync_message"])[1])
        assert abs(delayed_ms - record["lipsync_applied_s"] * 1000) < 0.11, record
        # ... and what it did to the sound: where speech.wav is in the MP4's audio track (the mp3 decodes in step)
        lag = _audio_lag_s(video, material / "speech.wav")
        assert abs(lag - record["lipsync_applied_s"]) < 0.001, (lag, record)
        assert record["lipsync_applied"] == (abs(lag) > 0.001), (lag, record)
        if row["id"] == "url-wav":  # the job's lip_sync_offset column reached the node and moved the audio
            assert record["lipsync_applied"] is True and "manual offset +50.0 ms" in record["lipsync_message"]
            measured = record["lipsync_applied_s"] - 0.05  # what the measurement added, when it was trusted
            assert abs(measured) < 1e-3 or (abs(measured - record["offset"]) < 1e-3 and not record["lipsync_warning"])
            # the sound moved 50 ms later than the measurement alone would have put it (when one was applied)
            assert abs(lag - 0.05) < 0.01 or (abs(lag - record["offset"] - 0.05) < 0.01
                                              and not record["lipsync_warning"]), (lag, record)
        else:
            assert "manual offset" not in record["lipsync_message"]
    assert {r["server"] for r in records.values()} == {s.url for s in world["servers"]}  # both servers worked
    for server in world["servers"]:  # no signed link, nor the store's key id, was ever given to a server
        history = urllib.request.urlopen(server.url + "/history", timeout=30).read().decode()
        assert "s3-both" in history or records["s3-both"]["server"] != server.url
        assert not _secrets_in(history), (server.url, _secrets_in(history))
    assert [e["event"] for e in events].count("queued") == 6 and any(e["event"] == "progress" for e in events)
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]
    # the same local file went to each server once, whatever the number of jobs using it
    for server in world["servers"]:
        uploaded = list((server.base / "input" / "sonic-batch").iterdir())
        assert len({p.read_bytes() for p in uploaded}) == len(uploaded)

    # run again: nothing new is submitted, finished jobs stay as they are
    sizes = [_history_size(s) for s in world["servers"]]
    again = run_batch(world, *args)
    assert again.returncode == 1  # the failed job is still failed
    assert [e["event"] for e in _events(again.stdout) if e["event"] in ("queued", "done", "failed")] == []
    assert sorted(e["id"] for e in _events(again.stdout) if e["event"] == "skipped") == sorted(r["id"] for r in rows)
    order = [e["event"] for e in _events(again.stdout)]  # the plan first, then what it skips
    assert order == ["plan"] + ["skipped"] * len(rows) + ["summary"], order
    assert [_history_size(s) for s in world["servers"]] == sizes
    # a deleted output is made again; the failed job reruns only when asked
    (out / "url-wav.mp4").unlink()
    third = run_batch(world, *args, "--retry-failed")
    ran = [e["id"] for e in _events(third.stdout) if e["event"] in ("done", "failed")]
    assert sorted(ran) == ["no-face", "s3-missing", "too-long", "url-wav"] and third.returncode == 1
    assert (out / "url-wav.mp4").is_file()


def test_bad_rows_rejected_before_anything_is_submitted(world):
    material = world["material"]
    jobs = _write(material / "bad.jsonl", [
        {"image": "portrait.png", "audio": "speech.wav", "seed": -1},
        {"image": "nope.png", "audio": "speech.wav"},
        {"id": "x", "image": "portrait.png", "audio": "speech.wav", "colour": "red"},
        {"id": "x", "image": "portrait.png", "audio": "speech.wav"},
        {"id": "box", "image": "portrait.png", "audio": "speech.wav", "face_box": "10,20"},
    ])
    sizes = [_history_size(s) for s in world["servers"]]
    result = run_batch(world, str(jobs), *_servers(world), "--out", str(world["top"] / "out-bad"))
    assert result.returncode == 2
    for expected in ("column seed: -1 is outside 0..", "column image: file 'nope.png' not found",
                     "column 'colour' is not an input", "id 'x' is also used on line 3",
                     "line 5 (id box): column face_box: '10,20' is not four numbers; write x,y,w,h",
                     "5 problem(s); nothing was submitted"):
        assert expected in result.stderr, result.stderr
    assert [_history_size(s) for s in world["servers"]] == sizes
    assert "Traceback" not in result.stderr
    nowhere = run_batch(world, str(jobs), "--server", "http://127.0.0.1:9", "--out", str(world["top"] / "out-bad"))
    assert nowhere.returncode == 2 and "no --server can run the workflow" in nowhere.stderr


def test_check_says_what_it_checked(world):
    material, client = world["material"], world["s3"].client()
    jobs = _write(material / "check.jsonl", [{"id": f"c{n}", "image": "portrait.png", "audio": "speech.wav", **FAST}
                                              for n in range(3)])
    sizes = [_history_size(s) for s in world["servers"]]
    result = run_batch(world, str(jobs), *_servers(world), "--server", "http://127.0.0.1:9", "--out",
                       "s3://outputs/checked", "--check")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    digest = hashlib.sha256(jobs_mod.DEFAULT_WORKFLOW.read_bytes()).hexdigest()
    assert lines[0].startswith(f"jobs: 3 in {jobs} (every row checked") and lines[0].endswith(
        "3 to run, 0 done before, 0 failed before"), lines
    assert lines[1] == f"workflow: {jobs_mod.DEFAULT_WORKFLOW} sha256 {digest} (8 nodes)", lines
    for server, line in zip(world["servers"], lines[2:4]):
        version = _get(server.url + "/system_stats")["system"]["comfyui_version"]
        assert line == (f"server {server.url} (ComfyUI {version}): answers, has the workflow's 8 node types; "
                        "model Sonic/unet.pth present in models/sonic"), line
    assert lines[4].startswith("server http://127.0.0.1:9: NOT answering"), lines
    assert lines[5:] == ["output: s3://outputs/checked writable (lock object .sonic-batch.lock written and read back)",
                         "manifest: s3://outputs/checked/manifest.jsonl (0 job(s) recorded)",
                         "check passed; nothing was submitted"], lines
    assert client.list_objects_v2(Bucket="outputs", Prefix="checked/").get("Contents", []) == []  # its lock let go
    assert [_history_size(s) for s in world["servers"]] == sizes
    # a destination that cannot be written: the check says so and fails, it never calls it writable
    (material / "a-file").write_text("not a folder")
    for out, said in (("s3://missing-bucket/x", r"error: s3://missing-bucket/x: bucket 'missing-bucket' is not "
                       r"reachable with these credentials \((NoSuchBucket|404)\); check the bucket name, AWS_\* "
                       r"credentials and --s3-endpoint"),
                      (str(material / "a-file"), re.escape(f"error: --out {material / 'a-file'} is a file; give a "
                                                           "folder or s3://bucket/prefix"))):
        result = run_batch(world, str(jobs), *_servers(world), "--out", out, "--check")
        assert result.returncode == 2 and re.fullmatch(said, result.stderr.strip()), (out, result)
        assert "writable" not in result.stdout and "check passed" not in result.stdout, (out, result.stdout)
    assert [_history_size(s) for s in world["servers"]] == sizes
    # the same as one JSON event
    result = run_batch(world, str(jobs), *_servers(world), "--out", str(world["top"] / "out-check"), "--check", "--json")
    events = _events(result.stdout)
    assert result.returncode == 0 and [e["event"] for e in events] == ["plan", "check"], result
    check = events[1]
    assert (check["jobs"], check["to_run"], check["workflow"]["sha256"]) == (3, 3, digest)
    assert [(s["url"], s["answers"], s["used"], s["missing_nodes"], [(m["name"], m["present"]) for m in s["models"]])
            for s in check["servers"]] == [(s.url, True, True, [], [("Sonic/unet.pth", True)]) for s in world["servers"]]
    assert check["output"]["writable"] and check["manifest"]["records"] == 0
    # a workflow naming a model file no server has: no server can run it, each says what it lacks
    workflow = json.loads(jobs_mod.DEFAULT_WORKFLOW.read_text())
    workflow["3"]["inputs"]["sonic_unet"] = "Sonic/unet-v2.pth"
    (material / "v2.json").write_text(json.dumps(workflow))
    result = run_batch(world, str(jobs), *_servers(world), "--workflow", str(material / "v2.json"), "--out",
                       str(world["top"] / "out-check"), "--check")
    assert result.returncode == 2 and "no --server can run the workflow" in result.stderr, result.stderr
    for server in world["servers"]:
        assert (f"{server.url}: lacks model Sonic/unet-v2.pth in models/sonic (the workflow's SonicModelLoader "
                "(node 3) sonic_unet)") in result.stderr, result.stderr


def test_s3_lock_names_its_owner_is_renewed_and_taken_over_once_expired(world, monkeypatch):
    from sonic.batch.runner import S3Lock
    from sonic.jobs.storage import S3

    for name, value in world["s3"].env.items():  # the store's endpoint and credentials, for boto3 in this process
        monkeypatch.setenv(name, value)
    store, uri = S3(world["s3"].endpoint), "s3://outputs/locked/.sonic-batch.lock"
    first = S3Lock(store, uri, ttl_s=2, settle_s=0.2)
    assert first.acquire() is None
    held = json.loads(world["s3"].client().get_object(Bucket="outputs", Key="locked/.sonic-batch.lock")["Body"].read())
    assert (held["host"], held["pid"], held["id"], held["ttl_s"]) == (socket.gethostname(), os.getpid(),
                                                                     first.owner["id"], 2)
    second = S3Lock(store, uri, ttl_s=2, settle_s=0.2)
    for pause in (2.5, 0):  # refused, and still refused after the first lifetime: the first renews it
        with pytest.raises(ValueError) as refused:
            second.acquire()
        assert f"pid {os.getpid()}, run {first.owner['id'][:12]}" in str(refused.value)
        assert re.search(r"expires at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in [0-3] s", str(refused.value))
        time.sleep(pause)
    first._stop.set()  # the first batch dies: nobody renews its lock
    first._thread.join()
    time.sleep(2.5)
    assert f"run {first.owner['id'][:12]}" in second.acquire()  # expired: taken over, naming whom from
    first.renew()
    assert first.lost and second.owner["id"][:12] in first.lost  # a batch that comes back learns it lost the lock
    first.release()  # not its own any more: left alone
    assert not second.lost
    second.release()
    assert store.read(uri) is None


def test_s3_manifest_pieces_read_back_once(world, monkeypatch):
    """Each line a piece of its own; a crash between the rewrite and the deletes leaves lines twice: counted once."""
    from sonic.jobs import manifest as manifest_mod
    from sonic.jobs.storage import S3

    for name, value in world["s3"].env.items():
        monkeypatch.setenv(name, value)
    store, client = S3(world["s3"].endpoint), world["s3"].client()

    def keys(prefix):
        return sorted(i["Key"] for i in client.list_objects_v2(Bucket="outputs", Prefix=prefix).get("Contents", []))

    first = Manifest("s3://outputs/pieces/manifest.jsonl", store)
    for n in range(3):
        first.append({"id": f"j{n}", "status": "done", "n": n})
    assert keys("pieces/") == [f"pieces/manifest.d/{first.run}-{n:08d}-j{n}.jsonl" for n in range(3)]
    first.append({"id": "j0", "status": "failed"})  # the last line of an id is its state
    # an earlier rewrite holds the first two lines only; every line is still a piece, the last two only there
    whole = "".join(line + "\n" for line in first.lines[:2])
    client.put_object(Bucket="outputs", Key="pieces/manifest.jsonl", Body=whole.encode())  # rewritten, then killed
    again = Manifest("s3://outputs/pieces/manifest.jsonl", store)
    assert again.lines == first.lines and again.latest["j0"]["status"] == "failed"  # j0 done, j1, j2, j0 failed
    assert [json.loads(line)["id"] for line in again.lines] == ["j0", "j1", "j2", "j0"]  # each line once
    assert keys("pieces/") == ["pieces/manifest.jsonl"]  # the leftover pieces folded in at once
    assert store.read("s3://outputs/pieces/manifest.jsonl").decode().splitlines() == first.lines  # and written
    monkeypatch.setattr(manifest_mod, "CONSOLIDATE_S", 0.0)  # rewritten while running once pieces are a tenth
    again.append({"id": "j3", "status": "done"})
    assert keys("pieces/") == ["pieces/manifest.jsonl"] and len(manifest_mod.parse_lines(
        store.read("s3://outputs/pieces/manifest.jsonl").decode())) == 5


def test_s3_outputs_with_metadata_and_signed_links(world):
    """Also: the s3:// manifest is written as one piece per job while the batch runs, made whole at its end, and a
    batch killed in between resumes from the pieces and the outputs' metadata; the prefix is locked meanwhile."""
    material, s3 = world["material"], world["s3"]
    rows = [{"id": f"s3-{n}", "image": "portrait.png", "audio": "speech.wav", "seed": 100 + n, **FAST} for n in range(3)]
    jobs = _write(material / "to-s3.jsonl", rows)
    args = [str(jobs), *_servers(world), "--out", "s3://outputs/run1", "--json", "--url-expiry", "600"]
    client = s3.client()

    def listing(prefix: str) -> list[str]:
        return [item["Key"] for item in client.list_objects_v2(Bucket="outputs", Prefix=prefix).get("Contents", [])]

    done, killed = [], []

    def two_done(event) -> bool:
        done.extend([event["id"]] if event["event"] == "done" else [])
        return len(done) == 2

    status, _, _ = follow_batch(world, args, two_done, lambda e, process: (killed.append(process.pid), process.kill()))
    assert status == -signal.SIGKILL
    pieces = listing("run1/manifest.d/")
    assert "run1/manifest.jsonl" not in listing("run1/")  # not rewritten per job: each job's line is a piece
    recorded = {}
    for key in pieces:
        lines = client.get_object(Bucket="outputs", Key=key)["Body"].read().decode().splitlines()
        assert len(lines) == 1 and key.endswith(f"-{json.loads(lines[0])['id']}.jsonl"), (key, lines)
        recorded[json.loads(lines[0])["id"]] = key
    assert set(done) <= set(recorded) and all(json.loads(client.get_object(Bucket="outputs", Key=key)["Body"].read())
                                              ["status"] == "done" for key in recorded.values())
    stored = {key[len("run1/"):-len(".mp4")] for key in listing("run1/") if key.endswith(".mp4")}
    # the killed batch's lock is still live: a second batch on the prefix is refused, told whose lock it is
    lock = json.loads(client.get_object(Bucket="outputs", Key="run1/.sonic-batch.lock")["Body"].read())
    assert (lock["host"], lock["pid"]) == (socket.gethostname(), killed[0])
    refused = run_batch(world, *args)
    assert refused.returncode == 2 and refused.stdout == "", refused
    assert f"another batch is writing to s3://outputs/run1 (host {socket.gethostname()}, pid {killed[0]}, " \
           f"run {lock['id'][:12]}" in refused.stderr and "expires at" in refused.stderr, refused.stderr
    assert "delete the lock object to take over now" in refused.stderr
    # as it advises (that batch is gone); and one stored job lost its line (killed between the upload and the piece)
    client.delete_object(Bucket="outputs", Key="run1/.sonic-batch.lock")
    unrecorded = done[1]
    client.delete_object(Bucket="outputs", Key=recorded.pop(unrecorded))
    resumed = run_batch(world, *args)
    assert resumed.returncode == 0, resumed.stderr
    events = _events(resumed.stdout)
    skipped = {e["id"]: e for e in events if e["event"] == "skipped"}
    assert set(skipped) == stored and {i for i, e in skipped.items() if e.get("recovered")} == stored - set(recorded)
    assert unrecorded in stored - set(recorded)
    assert sorted(e["id"] for e in events if e["event"] == "queued") == sorted({r["id"] for r in rows} - stored)
    assert listing("run1/manifest.d/") == [] and "run1/.sonic-batch.lock" not in listing("run1/")

    manifest = client.get_object(Bucket="outputs", Key="run1/manifest.jsonl")["Body"].read().decode()
    records = {r["id"]: r for r in map(json.loads, manifest.splitlines())}
    assert len(manifest.splitlines()) == len(rows) == len(records)  # each job once
    assert records[unrecorded]["recovered"] is True
    for row in rows:
        record = records[row["id"]]
        assert record["status"] == "done" and record["output"] == f"s3://outputs/run1/{row['id']}.mp4"
        head = client.head_object(Bucket="outputs", Key=f"run1/{row['id']}.mp4")
        meta = {k.lower(): v for k, v in head["Metadata"].items()}
        assert meta["sha256"] == record["sha256"] and meta["sonic-prompt-id"] == record["prompt_id"]
        assert json.loads(meta["sonic-params"])["seed"] == row["seed"] and head["ContentType"] == "video/mp4"
        assert "X-Amz-Signature=" in record["url"] and "X-Amz-Expires=600" in record["url"]
        data = urllib.request.urlopen(record["url"], timeout=30).read()  # the link alone downloads the video
        assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["bytes"]
        tampered = record["url"].replace("X-Amz-Signature=", "X-Amz-Signature=0")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(tampered, timeout=30)
        assert refused.value.code == 403
    # resumable from the store alone; a lock whose lifetime is over (its batch gone) is taken over, saying whose
    client.put_object(Bucket="outputs", Key="run1/.sonic-batch.lock", Body=json.dumps(
        {"host": "gone-host", "pid": 4321, "id": "f" * 32, "since": "2026-01-01T00:00:00Z", "ttl_s": 0}).encode())
    again = run_batch(world, *args)
    assert again.returncode == 0 and not [e for e in _events(again.stdout) if e["event"] == "queued"], again
    notes = [e["message"] for e in _events(again.stdout) if e["event"] == "note"]
    assert any(n.startswith("took over the expired lock of host gone-host, pid 4321, run ffffffffffff") for n in notes)
    assert "run1/.sonic-batch.lock" not in listing("run1/")


def _wait_until(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen in {seconds} s")


def test_ctrl_c_takes_only_our_prompts_out_of_the_queues(world):
    material, first = world["material"], world["servers"][0]
    rows = [{"id": f"slow-{n}", "image": "portrait.png", "audio": "speech.wav", "seed": 200 + n, **FAST, "steps": 60}
            for n in range(6)]
    jobs = _write(material / "slow.jsonl", rows)
    out = world["top"] / "out-cancel"
    ours = set()

    def enough_started(event) -> bool:
        ours.add(event.get("prompt_id")) if event["event"] == "queued" else None
        return event["event"] == "progress" and len(ours) >= 3

    def foreign_prompt_then_ctrl_c(_, process):
        # another user's prompt waits on the first server behind ours
        foreign = json.loads((ROOT / "workflows" / "api" / "sonic_quick_512.json").read_text())
        for node in foreign.values():
            if node["class_type"] == "SonicPreData":
                node["inputs"].update(min_resolution=128, duration=1.0)
            if node["class_type"] == "SonicSampler":
                node["inputs"].update(steps=1, seed=9999)
            if node["class_type"] in ("SonicLoadImage", "SonicLoadAudio"):
                name = "portrait.png" if node["class_type"] == "SonicLoadImage" else "speech.wav"
                node["inputs"]["path_or_url"] = f"{world['files'].url}/{name}"
        body = json.dumps({"prompt": foreign, "prompt_id": foreign_id}).encode()
        urllib.request.urlopen(urllib.request.Request(first.url + "/prompt", body, {"Content-Type": "application/json"}),
                               timeout=30).read()
        process.send_signal(signal.SIGINT)

    foreign_id = uuid.uuid4().hex
    status, events, stderr = follow_batch(world, [str(jobs), *_servers(world), "--out", str(out), "--json"],
                                          enough_started, foreign_prompt_then_ctrl_c, timeout=120)
    assert status == 130, stderr
    assert "Traceback" not in stderr
    ours |= {e["prompt_id"] for e in events if e["event"] == "queued"}
    for server in world["servers"]:  # on exit, nothing of ours is queued or running anywhere
        queue = _get(server.url + "/queue")
        left = {item[1] for item in queue["queue_running"] + queue["queue_pending"]}
        assert not (left & ours), (server.url, left & ours)
    _wait_until(lambda: _get(f"{first.url}/history/{foreign_id}").get(foreign_id, {}).get("status", {}).get("status_str")
                == "success", 120, "the other user's prompt finishing")
    assert "cancelled" in [e["event"] for e in events]
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


def test_a_server_killed_mid_batch_loses_no_job(world):
    """Last: it kills one of the servers."""
    material = world["material"]
    rows = [{"id": f"k{n}", "image": "portrait.png", "audio": "speech.wav", "seed": 300 + n, **FAST, "steps": 3}
            for n in range(6)]
    jobs = _write(material / "kill.jsonl", rows)
    out = world["top"] / "out-kill"
    victim = world["servers"][1]
    status, events, stderr = follow_batch(
        world, [str(jobs), *_servers(world), "--out", str(out), "--json", "--backoff", "0.2"],
        lambda e: e["event"] == "progress" and e["server"] == victim.url,
        lambda e, process: victim.kill())  # mid-job: one prompt running there, one waiting
    assert status == 0, stderr
    assert "server_down" in [e["event"] for e in events]
    retried = {e["id"] for e in events if e["event"] == "retry"}
    assert retried, "the killed server's jobs were not moved"
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)  # each job exactly once
    for record in records:
        assert record["status"] == "done" and (out / f"{record['id']}.mp4").is_file()
        if record["id"] in retried:
            assert record["server"] == world["servers"][0].url and record["attempts"] == 2
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(f"{r['id']}.mp4" for r in rows)


def test_every_server_gone_stops_with_a_resumable_manifest(world):
    """After the previous test only the first server is left; it dies too, once a job has finished. The same command
    run again when it is back skips the finished jobs and runs the others."""
    material, last = world["material"], world["servers"][0]
    rows = [{"id": f"g{n}", "image": "portrait.png", "audio": "speech.wav", "seed": 400 + n, **FAST} for n in range(3)]
    jobs = _write(material / "gone.jsonl", rows)
    out = world["top"] / "out-gone"
    args = [str(jobs), "--server", last.url, "--out", str(out), "--json", "--backoff", "0.2"]
    status, _, stderr = follow_batch(world, [*args, "--give-up-after", "3"], lambda e: e["event"] == "done",
                                     lambda e, process: last.kill(), timeout=120)
    assert status == 1
    assert "every server has stopped answering" in stderr and "Run the same command again to resume" in stderr
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    finished = {r["id"] for r in records}
    assert records and len(records) < len(rows), records  # the job done before the kill, not the others
    assert all(r["status"] == "done" for r in records)  # jobs that did not run are not recorded as failed
    kept = {i: (out / f"{i}.mp4").stat().st_mtime_ns for i in finished}

    last.start().wait()  # the same URL again
    again = run_batch(world, *args)
    assert again.returncode == 0, again.stderr
    events = _events(again.stdout)
    assert sorted(e["id"] for e in events if e["event"] == "skipped") == sorted(finished)
    assert sorted(e["id"] for e in events if e["event"] == "queued") == sorted({r["id"] for r in rows} - finished)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)  # each job recorded once
    assert all(r["status"] == "done" and (out / f"{r['id']}.mp4").is_file() for r in records)
    assert {i: (out / f"{i}.mp4").stat().st_mtime_ns for i in finished} == kept  # not made again
