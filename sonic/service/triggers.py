"""Start on upload: objects landing under `--watch s3://bucket/incoming/` start jobs by themselves.

    incoming/<tenant>/<any folders>/<name>.json              a job description: {"image", "audio", "params",
                                                             "preset", "webhook_url"}; image/audio are keys in
                                                             the same bucket (relative to the file's folder) or
                                                             http(s) URLs
    incoming/<tenant>/<any folders>/<name>.png + <name>.wav  a photo and a recording with one name (any of the
                                                             image and audio types the service takes)

The tenant is the first folder (it must exist: `serve keys create --tenant`). Each object starts at most one
job, by key and ETag, across restarts (the `triggers` table, written in the job's own transaction); a changed
object (new ETag) starts a new one. A description that cannot start a job is recorded once with its reason and
logged. The watcher lists the prefix every SONIC_WATCH_INTERVAL seconds (10); S3 / MinIO event notifications
POSTed to /v1/events/s3 look at the named object's folder at once.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import threading
import urllib.parse

from .jobs import AUDIO_TYPES, IMAGE_TYPES, ServiceError

log = logging.getLogger("sonic.service")
IMAGE_SUFFIXES = set(IMAGE_TYPES.values()) | {".jpeg"}
AUDIO_SUFFIXES = set(AUDIO_TYPES.values())


class Watcher:
    def __init__(self, service, uri: str, s3_endpoint: str | None = None, s3_addressing: str = "auto"):
        from ..jobs.storage import S3, split_s3

        if not uri.startswith("s3://"):
            raise ValueError(f"--watch {uri!r}: give s3://bucket/prefix/ (tenants' folders are under it)")
        self.service = service
        self.bucket, prefix = split_s3(uri)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.s3 = S3(s3_endpoint, s3_addressing)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True, name="sonic-watch")
        self.lock = threading.Lock()
        service.watcher = self

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(10)

    def loop(self) -> None:
        interval = float(os.environ.get("SONIC_WATCH_INTERVAL", "10"))
        while True:
            try:
                self.scan(self.prefix)
            except Exception as exc:  # noqa: BLE001 (the store may be back at the next round)
                log.warning("--watch s3://%s/%s: %s", self.bucket, self.prefix, exc)
            if self.stop_event.wait(interval):
                return

    def listing(self, prefix: str) -> dict[str, str]:
        """key -> ETag of every object under prefix."""
        found = {}
        for page in self.s3.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = item["ETag"].strip('"')
        return found

    def scan(self, prefix: str) -> list[str]:
        """Start the jobs that objects under prefix describe -> the new jobs' ids."""
        with self.lock:  # the poller and an event may look at one folder at the same moment
            objects = self.listing(prefix)
            started = []
            for trigger, make in candidates(objects, self.prefix):
                if self.service.db.triggered(trigger["key"], trigger["etag"]):
                    continue
                job = self.start_one(trigger, make)
                if job:
                    started.append(job)
            return started

    def start_one(self, trigger: dict, make) -> str | None:
        from ..jobdb.db import AlreadyTriggered, public_job_id

        where = f"s3://{self.bucket}/{trigger['key']}"
        try:
            if not self.service.db.tenant_exists(trigger["tenant"]):
                raise ServiceError(422, f"no tenant {trigger['tenant']!r} (the first folder under the watched "
                                        "prefix names the tenant; python -m sonic serve keys create --tenant NAME)")
            image, audio, params, hook = make(self)
            row, _ = self.service.create(trigger["tenant"], image, audio, params, hook, trigger=trigger)
        except AlreadyTriggered:
            return None
        except ServiceError as exc:
            if self.service.db.trigger_refused(trigger, exc.error):
                log.error("%s started no job: %s", where, exc.error)
            return None
        job = public_job_id(row["batch_name"], row["name"])
        log.info("%s started job %s for %s", where, job, trigger["tenant"])
        return job

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def read_json(self, key: str) -> dict:
        data = self.s3.read(self.uri(key))
        if data is None:
            raise ServiceError(422, f"{key} is gone")
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ServiceError(422, f"{key}: not JSON; a job description is {{\"image\", \"audio\", \"params\"}}")
        if not isinstance(value, dict):
            raise ServiceError(422, f"{key}: a job description is a JSON object {{\"image\", \"audio\", \"params\"}}")
        return value


def candidates(objects: dict[str, str], prefix: str):
    """(trigger record, how to make the job) for every description and every photo+recording pair."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in objects:
        rest = key[len(prefix):]
        if "/" not in rest or key.endswith("/"):
            continue  # a tenant's objects are in its folder
        folder, name = posixpath.split(key)
        stem, suffix = posixpath.splitext(name)
        groups.setdefault((folder, stem), {})[suffix.lower()] = key
    for (folder, stem), by_suffix in sorted(groups.items()):
        tenant = folder[len(prefix):].split("/", 1)[0]
        if ".json" in by_suffix:
            key = by_suffix[".json"]
            yield ({"key": key, "etag": objects[key], "tenant": tenant},
                   lambda watcher, key=key, folder=folder, tenant=tenant: _described(watcher, key, folder, tenant))
            continue
        images = [by_suffix[s] for s in sorted(by_suffix) if s in IMAGE_SUFFIXES]
        audios = [by_suffix[s] for s in sorted(by_suffix) if s in AUDIO_SUFFIXES]
        if images and audios:
            image, audio = images[0], audios[0]
            yield ({"key": image, "etag": f"{objects[image]}+{objects[audio]}", "tenant": tenant},
                   lambda watcher, image=image, audio=audio: (watcher.uri(image), watcher.uri(audio), {}, None))


def _described(watcher: Watcher, key: str, folder: str, tenant: str):
    spec = watcher.read_json(key)
    unknown = set(spec) - {"image", "audio", "params", "preset", "webhook_url"}
    if unknown:
        raise ServiceError(422, f"{key}: unknown field(s) {', '.join(sorted(unknown))} (image, audio, params, preset, "
                                "webhook_url)")
    sources = []
    for field in ("image", "audio"):
        value = spec.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ServiceError(422, f"{key}: {field}: give a key in this bucket or an http(s) URL")
        if value.startswith(("http://", "https://")):
            sources.append(watcher.service.source(value, field, tenant))
            continue
        path = posixpath.normpath(posixpath.join(folder, value) if not value.startswith("/") else value.lstrip("/"))
        if not path.startswith(f"{watcher.prefix}{tenant}/"):
            raise ServiceError(422, f"{key}: {field} {value!r} is outside {watcher.prefix}{tenant}/")
        sources.append(watcher.uri(path))
    try:
        params = watcher.service.params(spec.get("params"), spec.get("preset"))
        hook = watcher.service.webhook(spec.get("webhook_url"))
    except ServiceError as exc:
        raise ServiceError(422, f"{key}: {exc.error}") from None
    return sources[0], sources[1], params, hook


def handle_event(service, body) -> dict:
    """An S3 / MinIO event notification ({"Records": [...]}) -> the jobs it started."""
    watcher = getattr(service, "watcher", None)
    if watcher is None:
        raise ServiceError(409, "start the service with --watch s3://bucket/prefix/ to take S3 events", None)
    records = body.get("Records") if isinstance(body, dict) else None
    if not isinstance(records, list):
        raise ServiceError(422, "Records: give an S3 event notification ({\"Records\": [...]})", "Records")
    started, ignored = [], 0
    for record in records:
        try:
            bucket = record["s3"]["bucket"]["name"]
            key = urllib.parse.unquote_plus(record["s3"]["object"]["key"])
            created = str(record.get("eventName", "ObjectCreated")).startswith(("ObjectCreated", "s3:ObjectCreated"))
        except (KeyError, TypeError):
            raise ServiceError(422, "Records: each record needs s3.bucket.name and s3.object.key", "Records") from None
        if bucket != watcher.bucket or not key.startswith(watcher.prefix) or not created or "/" not in key:
            ignored += 1
            continue
        started += watcher.scan(posixpath.dirname(key) + "/")
    return {"started": started, "ignored": ignored}
