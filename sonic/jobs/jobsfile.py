"""The jobs file of a batch and its binding to an API-format workflow.

A job is one row: `image` and `audio` (a local path, an http(s) URL or `s3://bucket/key`), an optional `id`
(default: the row number; it names the output) and any widget input of the workflow's nodes, bound by input name
to every node that has it (`seed` -> Sonic Sampler, `crf` -> Sonic Video Encode, `face_box` -> every node with a
face box). Values are checked against the servers' own node definitions (`/object_info`: type, min, max,
choices), so the rules are ComfyUI's, not a copy of them. Every bad row is reported at once, before anything runs.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..params import AUDIO_SUFFIXES, IMAGE_SUFFIXES

IMAGE_LOADER, AUDIO_LOADER, ENCODER = "SonicLoadImage", "SonicLoadAudio", "SonicVideoEncode"
LIPSYNC = "SonicLipSyncCalibrate"
INPUT_COLUMNS = {"image": (IMAGE_LOADER, IMAGE_SUFFIXES), "audio": (AUDIO_LOADER, AUDIO_SUFFIXES)}
RESERVED = {"filename_prefix": "the runner names outputs by job id", "path_or_url": "use the image and audio columns"}
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
DEFAULT_WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "api" / "sonic_batch_api.json"


class JobsError(ValueError):
    """Bad jobs: every problem found, one per line, so that a user fixes the whole file in one go."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Source:
    """Where an input comes from. kind: 'file' (absolute path, sha256 of its bytes), 'url' or 's3'."""

    kind: str
    location: str
    sha256: str | None = None

    @property
    def identity(self) -> str:
        return f"sha256:{self.sha256}" if self.kind == "file" else self.location

    @property
    def suffix(self) -> str:
        path = self.location.split("?", 1)[0]
        return Path(path).suffix.lower()


@dataclass
class Job:
    id: str
    line: int  # where the row is in the jobs file (1-based; the CSV header is line 1)
    image: Source
    audio: Source
    params: dict[str, object] = field(default_factory=dict)  # column -> value typed as the node wants it
    key: str = ""  # fingerprint of inputs, parameters and workflow: a changed job is a different job

    def describe(self) -> dict:
        """What the manifest records about the job's inputs."""
        return {"image": self.image.location, "audio": self.audio.location, "params": self.params, "key": self.key}

    def metadata(self, sha256: str, prompt_id: str) -> dict[str, str]:
        """Object metadata of the job's output (ASCII, as S3 requires)."""
        return {"sha256": sha256, "sonic-job-id": self.id, "sonic-job-key": self.key, "sonic-prompt-id": prompt_id,
                "sonic-params": json.dumps(self.params)}

    def to_message(self) -> dict:
        """The job as JSON (a queue message)."""
        return {"id": self.id, "line": self.line, "image": vars(self.image), "audio": vars(self.audio),
                "params": self.params, "key": self.key}

    @classmethod
    def from_message(cls, data: dict) -> "Job":
        return cls(data["id"], data.get("line", 0), Source(**data["image"]), Source(**data["audio"]),
                   dict(data.get("params", {})), data.get("key", ""))


@dataclass
class Workflow:
    """An API-format workflow (`Export (API)` in ComfyUI)."""

    path: Path
    prompt: dict[str, dict]
    digest: str

    @classmethod
    def load(cls, path: Path | None) -> "Workflow":
        path = Path(path) if path is not None else DEFAULT_WORKFLOW
        try:
            text = path.read_text(encoding="utf-8")
            prompt = json.loads(text)
        except FileNotFoundError:
            raise FileNotFoundError(f"--workflow: {path} does not exist") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"--workflow: {path} is not JSON ({exc})") from None
        if isinstance(prompt, dict) and isinstance(prompt.get("nodes"), list):
            raise ValueError(f"--workflow: {path} is a UI workflow; batch runs need the API format "
                             "(in ComfyUI: Workflow > Export (API))")
        if not isinstance(prompt, dict) or not prompt or not all(
                isinstance(node, dict) and isinstance(node.get("class_type"), str) and isinstance(node.get("inputs"), dict)
                for node in prompt.values()):
            raise ValueError(f"--workflow: {path} is not an API-format workflow (node id -> class_type + inputs)")
        workflow = cls(path, {str(k): v for k, v in prompt.items()}, hashlib.sha256(text.encode()).hexdigest())
        for class_type, column in ((IMAGE_LOADER, "image"), (AUDIO_LOADER, "audio")):
            if not workflow.nodes(class_type):
                raise ValueError(f"--workflow: {path} has no {class_type} node to take the jobs' {column}")
        encoders = workflow.nodes(ENCODER)
        if len(encoders) != 1:
            raise ValueError(f"--workflow: {path} must have exactly one {ENCODER} node (the job's MP4), "
                             f"it has {len(encoders)}")
        return workflow

    def nodes(self, class_type: str) -> list[str]:
        return [node_id for node_id, node in self.prompt.items() if node["class_type"] == class_type]

    @property
    def encoder(self) -> str:
        return self.nodes(ENCODER)[0]

    def video_entry(self, history: dict) -> dict:
        """The MP4 in a finished prompt's history (filename, subfolder, type for /view)."""
        outputs = history.get("outputs", {})
        entries = [e for e in (outputs.get(self.encoder) or {}).get("images", []) if str(e.get("filename", "")).endswith(".mp4")]
        if not entries:
            raise RuntimeError(f"{ENCODER} reported no MP4 in the prompt's history")
        return entries[0]

    def lipsync(self, history: dict) -> dict:
        """{offset, confidence} measured by the workflow's Lip-Sync Calibrate node, or {}."""
        for node_id in self.nodes(LIPSYNC):
            measured = (history.get("outputs", {}).get(node_id) or {}).get("lipsync") or []
            if measured:
                return {"offset": measured[0].get("offset_s"), "confidence": measured[0].get("confidence")}
        return {}

    def class_types(self) -> set[str]:
        return {node["class_type"] for node in self.prompt.values()}

    def takers(self, column: str, schema: dict) -> list[tuple[str, dict]]:
        """(node id, input spec) of every node whose widget input is named `column` (links are never replaced)."""
        found = []
        for node_id, node in self.prompt.items():
            spec = input_spec(schema, node["class_type"], column)
            if spec is not None and is_widget(spec) and not isinstance(node["inputs"].get(column), list):
                found.append((node_id, spec))
        return found

    def widget_inputs(self, schema: dict) -> list[str]:
        names = {name for node in self.prompt.values() for name in _inputs(schema, node["class_type"])
                 if self.takers(name, schema)}
        return sorted(names - set(RESERVED) - set(INPUT_COLUMNS))

    def bind(self, job: Job, image: tuple[str, str], audio: tuple[str, str], filename_prefix: str,
             schema: dict) -> dict:
        """The prompt for one job. image/audio: (upload name or "", URL or ""), as the loaders take them."""
        prompt = copy.deepcopy(self.prompt)
        for class_type, (upload_input, (name, url)) in ((IMAGE_LOADER, ("image", image)), (AUDIO_LOADER, ("audio", audio))):
            for node_id in self.nodes(class_type):
                inputs = prompt[node_id]["inputs"]
                if name:
                    inputs[upload_input] = name
                inputs["path_or_url"] = url
        for column, value in job.params.items():
            for node_id, _ in self.takers(column, schema):
                prompt[node_id]["inputs"][column] = value
        prompt[self.encoder]["inputs"]["filename_prefix"] = filename_prefix
        return prompt


def _inputs(schema: dict, class_type: str) -> dict[str, list]:
    info = schema.get(class_type, {}).get("input", {})
    return {**info.get("required", {}), **info.get("optional", {})}


def input_spec(schema: dict, class_type: str, name: str) -> list | None:
    return _inputs(schema, class_type).get(name)


def is_widget(spec: list) -> bool:
    """A value typed in the node (number, text, toggle, choice), not a socket fed by another node."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")) \
        and not opts.get("forceInput")


def coerce(value, spec: list):
    """A jobs-file value (text from CSV, or JSON) -> the node input's type, within its min/max or choices."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else opts.get("options", [])
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if kind == "BOOLEAN":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE | FALSE:
            return text in TRUE
        raise ValueError(f"{value!r} is not true or false")
    if kind == "INT":
        try:
            number = int(str(value).strip()) if not isinstance(value, (int, float)) or isinstance(value, bool) else value
            if isinstance(number, bool) or (isinstance(number, float) and not number.is_integer()):
                raise ValueError
            number = int(number)
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
    elif kind == "FLOAT":
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a number")
    elif kind == "STRING":
        if isinstance(value, (dict, list)):
            raise ValueError(f"{value!r} is not text")
        return str(value)
    else:
        raise ValueError(f"inputs of type {kind} cannot be set from a jobs file")
    low, high = opts.get("min"), opts.get("max")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{value!r} is outside {low}..{high}")
    return number


def value_hint(spec: list, current=None) -> str:
    """What to write in a jobs-file cell for a node input: its type and range, and that an empty cell keeps the
    workflow's value."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    low, high = opts.get("min"), opts.get("max")
    span = (f" from {low} to {high}" if low is not None and high is not None else
            f" of at least {low}" if low is not None else f" of at most {high}" if high is not None else "")
    if isinstance(kind, list) or kind == "COMBO":
        what = "one of those choices, spelled the same"
    elif kind == "BOOLEAN":
        what = "true or false (yes/no, 1/0)"
    elif kind == "INT":
        what = f"a whole number{span}"
    elif kind == "FLOAT":
        what = f"a number{span}"
    else:
        what = "text"
    keep = f" ({json.dumps(current)})" if isinstance(current, (str, int, float, bool)) else ""
    return f"write {what}, or leave the cell empty to keep the workflow's value{keep}"


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, raw row) for every non-empty row of a .csv (with a header row) or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"JOBS must be a .csv (with a header row) or .jsonl file, got {path.name}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"jobs file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"jobs file {path} is not UTF-8 text") from None
    rows = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise ValueError(f"jobs file {path} is empty; its first line names the columns (image,audio,...)")
        for row in reader:
            extra = row.pop(None, None)
            cells = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if extra:
                cells["(extra cells)"] = ",".join(extra)
            if any(cells.values()):
                rows.append((reader.line_num, {k: v for k, v in cells.items() if v != ""}))
    else:
        problems = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name} line {number}: not JSON ({exc.msg})")
                continue
            except RecursionError:
                problems.append(f"{path.name} line {number}: nested too deeply to be a job")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path.name} line {number}: a job must be a JSON object, got {type(row).__name__}")
                continue
            rows.append((number, {str(k).strip(): v for k, v in row.items() if v is not None and v != ""}))
        if problems:
            raise JobsError(problems)
    if not rows:
        raise ValueError(f"jobs file {path} has no jobs")
    return rows


def parse_source(value, column: str, base: Path, digests: dict[Path, str]) -> Source:
    """A local path (relative to the jobs file), an http(s) URL or s3://bucket/key."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"column {column}: give a local path, an http(s) URL or s3://bucket/key")
    text = value.strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    suffixes = INPUT_COLUMNS[column][1]
    if scheme in ("http", "https"):
        return Source("url", text)
    if scheme == "s3":
        bucket, _, key = text[5:].partition("/")
        if not bucket or not key:
            raise ValueError(f"column {column}: {text!r} is not s3://bucket/key")
        return Source("s3", text)
    if scheme:
        raise ValueError(f"column {column}: {scheme}:// is not supported; use a local path, http(s):// or s3://")
    path = (base / Path(text).expanduser()).resolve()
    if not path.is_file():
        raise ValueError(f"column {column}: file {text!r} not found" + (f" (looked at {path})" if str(path) != text else ""))
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"column {column}: {path.name} is not a {column} file ({', '.join(suffixes)})")
    if path not in digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        digests[path] = digest.hexdigest()
    return Source("file", str(path), digests[path])


def load_jobs(path: Path, workflow: Workflow, schema: dict) -> list[Job]:
    """Read and check every row; JobsError lists every problem of every row."""
    path = Path(path)
    rows = read_rows(path)
    name, problems = path.name, []
    columns = {column for _, row in rows for column in row} - {"id", *INPUT_COLUMNS}
    for column in sorted(columns):
        if column in RESERVED:
            problems.append(f"{name}: column {column!r} cannot be set per job ({RESERVED[column]})")
        elif not workflow.takers(column, schema):
            problems.append(f"{name}: column {column!r} is not an input of any node in {workflow.path.name} "
                            f"(per-job inputs it has: {', '.join(workflow.widget_inputs(schema))})")
    jobs, seen, digests = [], {}, {}
    for number, (line, row) in enumerate(rows, 1):
        job_id = str(row.get("id", number)).strip()
        where = f"{name} line {line} (id {job_id})"
        row_problems = []
        if not ID_PATTERN.fullmatch(job_id):
            row_problems.append("id must be 1-100 letters, digits, '.', '_' or '-' (it names the output file)")
        elif job_id in seen:
            row_problems.append(f"id {job_id!r} is also used on line {seen[job_id]}; ids must be unique")
        else:
            seen[job_id] = line
        sources = {}
        for column in INPUT_COLUMNS:
            try:
                sources[column] = parse_source(row.get(column), column, path.parent, digests)
            except ValueError as exc:
                row_problems.append(str(exc))
        params = {}
        for column in sorted(set(row) & columns):
            takers = workflow.takers(column, schema)
            if not takers or column in RESERVED:
                continue  # reported once for the whole file above
            try:
                params[column] = coerce(row[column], takers[0][1])
            except ValueError as exc:  # named as the user sees it: a column of the jobs file, and what to write
                current = workflow.prompt[takers[0][0]]["inputs"].get(column)
                row_problems.append(f"column {column}: {exc}; {value_hint(takers[0][1], current)}")
        problems.extend(f"{where}: {p}" for p in row_problems)
        if not row_problems:
            job = Job(job_id, line, sources["image"], sources["audio"], params)
            identity = {"image": job.image.identity, "audio": job.audio.identity, "params": params,
                        "workflow": workflow.digest}
            job.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
            jobs.append(job)
    if problems:
        raise JobsError(problems)
    return jobs
