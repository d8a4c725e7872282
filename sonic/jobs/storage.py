"""Where a batch's outputs go (a local folder or s3://bucket/prefix), and s3:// objects read, copied and deleted
with the store's credentials.

S3 goes through boto3 (optional extra `sonic-portrait[s3]`, imported only when an s3:// location is used), so the
same code talks to AWS S3, Aliyun OSS, MinIO, Cloudflare R2 and Tencent COS (`--s3-endpoint`). Credentials come
from boto3's standard chain (AWS_* variables, profiles, STS session tokens), never from a jobs file. s3:// inputs
are downloaded here and uploaded to a server like local files: no presigned link (signature, access key id) ever
goes into a prompt, where ComfyUI's /history and the MP4's embedded prompt would keep it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path

from ..hashing import sha256_file

MAX_URL_EXPIRY_S = 7 * 24 * 3600  # SigV4's limit on a presigned link's lifetime (604800 s)
MULTIPART_THRESHOLD = 16 * 2**20
MISSING = ("404", "NoSuchKey", "NotFound")

log = logging.getLogger(__name__)
_session_token_warned = False


def check_url_expiry(expiry_s) -> int:
    """A presigned link's lifetime in whole seconds, 1 s .. 7 days (SigV4 signs nothing longer)."""
    seconds = int(expiry_s)
    if not 1 <= seconds <= MAX_URL_EXPIRY_S:
        raise ValueError(f"--url-expiry {expiry_s}: presigned links last 1 to {MAX_URL_EXPIRY_S} seconds (7 days, "
                         "the most an S3 SigV4 signature allows)")
    return seconds


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// location")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket (s3://bucket/prefix)")
    return bucket, key


class S3:
    """A boto3 client made the way every S3-compatible store accepts: SigV4 signatures (presigned links too)."""

    def __init__(self, endpoint_url: str | None = None, addressing: str = "auto"):
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise RuntimeError("s3:// locations need boto3: pip install 'sonic-portrait[s3]' (or pip install boto3)") from None
        config = Config(signature_version="s3v4", s3={"addressing_style": addressing},
                        retries={"max_attempts": 5, "mode": "standard"})
        self.session = boto3.session.Session()
        self.client = self.session.client("s3", endpoint_url=endpoint_url or None, config=config)
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)

    def presign(self, uri: str, expiry_s: int) -> str:
        """A GET link that works without credentials for `expiry_s` seconds (at most 7 days)."""
        seconds = check_url_expiry(expiry_s)
        self._warn_if_temporary_credentials()
        bucket, key = split_s3(uri)
        return self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                  ExpiresIn=seconds)

    def _warn_if_temporary_credentials(self) -> None:
        """A link signed with STS credentials dies with their session, whatever its X-Amz-Expires says."""
        global _session_token_warned
        if _session_token_warned:
            return
        credentials = self.session.get_credentials()
        if credentials is not None and credentials.get_frozen_credentials().token:
            _session_token_warned = True
            log.warning("the S3 credentials are temporary (they carry a session token, e.g. from STS or an "
                        "assumed role): presigned links stop working when that session expires, whatever "
                        "--url-expiry says; sign with long-term credentials for links that must last")

    def head(self, uri: str) -> dict | None:
        """Size and user metadata (lower-case keys) of an object, or None when there is none."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            reply = self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in MISSING:
                return None
            raise
        return {"bytes": reply["ContentLength"], "metadata": {k.lower(): v for k, v in reply.get("Metadata", {}).items()}}

    def upload(self, path: Path, uri: str, metadata: dict[str, str], content_type: str) -> None:
        bucket, key = split_s3(uri)
        self.client.upload_file(str(path), bucket, key, Config=self.transfer,
                                ExtraArgs={"Metadata": metadata, "ContentType": content_type})

    def download(self, uri: str, path: Path) -> tuple[str, int]:
        """The object to `path` (written under a temporary name beside it, then renamed); -> (sha256, bytes).
        FileNotFoundError when there is no such object."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        path = Path(path)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.client.download_file(bucket, key, str(temp), Config=self.transfer)
            digest = sha256_file(temp)
            os.replace(temp, path)
        except ClientError as exc:
            if _code(exc) in MISSING:
                raise FileNotFoundError(f"{uri} does not exist (no such object in bucket {bucket!r})") from None
            raise
        finally:
            temp.unlink(missing_ok=True)
        return digest

    def copy(self, src_uri: str, dst_uri: str) -> None:
        """Server-side copy (nothing passes through here) keeping the content type and user metadata; objects
        up to 5 GB (one CopyObject)."""
        from botocore.exceptions import ClientError

        src_bucket, src_key = split_s3(src_uri)
        bucket, key = split_s3(dst_uri)
        try:
            self.client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": src_bucket, "Key": src_key},
                                    MetadataDirective="COPY")
        except ClientError as exc:
            if _code(exc) in MISSING:
                raise FileNotFoundError(f"{src_uri} does not exist (no such object to copy)") from None
            raise

    def delete(self, uri: str) -> None:
        """Remove an object (no error when there is none, as S3 itself)."""
        bucket, key = split_s3(uri)
        self.client.delete_object(Bucket=bucket, Key=key)

    def read(self, uri: str) -> bytes | None:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _code(exc) in MISSING:
                return None
            raise

    def write(self, uri: str, data: bytes, content_type: str) -> None:
        bucket, key = split_s3(uri)
        self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def keys(self, uri: str) -> list[str]:
        """s3:// URIs of every object under a prefix."""
        bucket, prefix = split_s3(uri)
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", [])]
        return found

    def check_bucket(self, uri: str) -> None:
        """Fail early (before any job runs) when the bucket is missing or the credentials cannot reach it."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _ = split_s3(uri)
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise ValueError(f"{uri}: bucket {bucket!r} is not reachable with these credentials ({code or exc}); "
                             "check the bucket name, AWS_* credentials and --s3-endpoint") from None
        except BotoCoreError as exc:
            raise ValueError(f"{uri}: {exc}; check AWS_* credentials and --s3-endpoint") from None


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class LocalOutputs:
    """DEST is a folder: `<id>.mp4`, written under a temporary name in the same folder, then renamed."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).expanduser().resolve()
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--out {folder} is a file; give a folder or s3://bucket/prefix")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest_location = str(self.folder / "manifest.jsonl")

    def location(self, job_id: str) -> str:
        return str(self.folder / f"{job_id}.mp4")

    def temp_file(self, job_id: str) -> Path:
        return self.folder / f".{job_id}.{uuid.uuid4().hex[:8]}.part"

    def existing(self, job_id: str) -> dict | None:
        path = Path(self.location(job_id))
        if not path.is_file():
            return None
        sha, size = sha256_file(path)
        return {"sha256": sha, "bytes": size, "metadata": {}}

    def store(self, temp: Path, job_id: str, metadata: dict[str, str]) -> tuple[str, str | None]:
        target = self.location(job_id)
        os.replace(temp, target)
        return target, None


class S3Outputs:
    """DEST is s3://bucket/prefix: `<prefix>/<id>.mp4` with the job's parameters, prompt id and sha256 as object
    metadata, shared through a presigned GET link that expires after `url_expiry_s`."""

    def __init__(self, s3: S3, uri: str, url_expiry_s: int, check: bool = True):
        bucket, prefix = split_s3(uri)
        self.s3, self.url_expiry_s = s3, check_url_expiry(url_expiry_s)  # before any job runs
        self.base = f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
        self.manifest_location = f"{self.base}/manifest.jsonl"
        if check:
            s3.check_bucket(uri)

    def location(self, job_id: str) -> str:
        return f"{self.base}/{job_id}.mp4"

    def temp_file(self, job_id: str) -> Path:
        fd, name = tempfile.mkstemp(prefix=f"sonic-batch-{job_id}-", suffix=".mp4")
        os.close(fd)
        return Path(name)

    def existing(self, job_id: str) -> dict | None:
        head = self.s3.head(self.location(job_id))
        if head is None:
            return None
        return {"sha256": head["metadata"].get("sha256"), "bytes": head["bytes"], "metadata": head["metadata"]}

    def store(self, temp: Path, job_id: str, metadata: dict[str, str]) -> tuple[str, str | None]:
        target = self.location(job_id)
        try:
            self.s3.upload(temp, target, metadata, "video/mp4")
        finally:
            temp.unlink(missing_ok=True)
        return target, self.s3.presign(target, self.url_expiry_s)


class FolderStore:
    """The service's embedded store: a local folder that answers like `S3` (the same methods), so the fleet's
    worker code runs on it unchanged. Objects are named `s3://local/<key>` and live at `<folder>/<key>`; their
    content type and metadata in `<folder>/.meta/<key>.json`. Writes go to a temporary file renamed into place (a
    reader never sees half an object). Links are the service's own `/v1/files/<key>` signed with `link_secret`."""

    BUCKET = "local"

    def __init__(self, folder: Path, link_secret: bytes = b""):
        self.folder = Path(folder).expanduser().resolve()
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"--store {folder} is a file; give a folder or s3://bucket/prefix")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.link_secret = link_secret
        self.uri = f"s3://{self.BUCKET}"

    def path(self, uri: str) -> Path:
        bucket, key = split_s3(uri)
        parts = key.split("/")
        if bucket != self.BUCKET or not key or any(part in ("", ".", "..") for part in parts) or parts[0] == ".meta":
            raise ValueError(f"{uri!r} is not an object of the service's folder store (s3://{self.BUCKET}/<key>)")
        return self.folder.joinpath(*parts)

    def _meta(self, uri: str) -> Path:
        return self.folder / ".meta" / (split_s3(uri)[1] + ".json")

    def _write(self, target: Path, source: Path | None, data: bytes | None, uri: str, meta: dict) -> None:
        import json

        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            if source is not None:
                import shutil

                shutil.copyfile(source, temp)
            else:
                temp.write_bytes(data or b"")
            meta_path = self._meta(uri)
            meta_path.parent.mkdir(parents=True, exist_ok=True)
            meta_temp = meta_path.with_name(f".{meta_path.name}.{uuid.uuid4().hex[:8]}.part")
            meta_temp.write_text(json.dumps(meta))
            os.replace(meta_temp, meta_path)
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)

    def presign(self, uri: str, expiry_s: int, base: str = "") -> str:
        import hashlib
        import hmac
        import time
        import urllib.parse

        check_url_expiry(expiry_s)
        key = split_s3(uri)[1]
        expires = int(time.time()) + int(expiry_s)
        signature = hmac.new(self.link_secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()
        return f"{base}/v1/files/{urllib.parse.quote(key)}?expires={expires}&signature={signature}"

    def link_ok(self, key: str, expires: int, signature: str) -> bool:
        import hashlib
        import hmac
        import time

        wanted = hmac.new(self.link_secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(wanted, signature) and expires >= time.time()

    def sign_post(self, policy: dict) -> dict[str, str]:
        """The form fields of a browser upload (like S3's presigned POST): the policy (key, content type, size
        limit, expiry) and its signature."""
        import base64
        import hashlib
        import hmac
        import json

        text = base64.b64encode(json.dumps(policy, sort_keys=True).encode()).decode()
        return {"key": policy["key"], "Content-Type": policy["content_type"], "policy": text,
                "signature": hmac.new(self.link_secret, text.encode(), hashlib.sha256).hexdigest()}

    def check_post(self, fields: dict[str, str]) -> dict | None:
        """The policy of a signed upload form, or None when its signature is wrong, it expired, or the form's
        key or type differ from what was signed."""
        import base64
        import hashlib
        import hmac
        import json
        import time

        text, signature = fields.get("policy", ""), fields.get("signature", "")
        wanted = hmac.new(self.link_secret, text.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(wanted, signature):
            return None
        policy = json.loads(base64.b64decode(text))
        if policy["expires"] < time.time() or fields.get("key") != policy["key"] or \
                fields.get("Content-Type") != policy["content_type"]:
            return None
        return policy

    def head(self, uri: str) -> dict | None:
        import json

        path = self.path(uri)
        if not path.is_file():
            return None
        meta_path = self._meta(uri)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return {"bytes": path.stat().st_size, "metadata": meta.get("metadata", {}),
                "content_type": meta.get("content_type", "application/octet-stream")}

    def upload(self, path: Path, uri: str, metadata: dict[str, str], content_type: str) -> None:
        self._write(self.path(uri), Path(path), None, uri,
                    {"metadata": {k.lower(): v for k, v in metadata.items()}, "content_type": content_type})

    def download(self, uri: str, path: Path) -> tuple[str, int]:
        import shutil

        source = self.path(uri)
        if not source.is_file():
            raise FileNotFoundError(f"{uri} does not exist (no such object in the service's store)")
        path = Path(path)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            shutil.copyfile(source, temp)
            digest = sha256_file(temp)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return digest

    def copy(self, src_uri: str, dst_uri: str) -> None:
        head = self.head(src_uri)
        if head is None:
            raise FileNotFoundError(f"{src_uri} does not exist (no such object to copy)")
        self._write(self.path(dst_uri), self.path(src_uri), None, dst_uri,
                    {"metadata": head["metadata"], "content_type": head["content_type"]})

    def delete(self, uri: str) -> None:
        self.path(uri).unlink(missing_ok=True)
        self._meta(uri).unlink(missing_ok=True)

    def read(self, uri: str) -> bytes | None:
        path = self.path(uri)
        return path.read_bytes() if path.is_file() else None

    def write(self, uri: str, data: bytes, content_type: str) -> None:
        self._write(self.path(uri), None, data, uri, {"metadata": {}, "content_type": content_type})

    def keys(self, uri: str) -> list[str]:
        bucket, prefix = split_s3(uri)
        found = []
        for path in sorted(self.folder.rglob("*")):
            key = path.relative_to(self.folder).as_posix()
            if path.is_file() and not key.startswith(".meta/") and not path.name.endswith(".part") \
                    and key.startswith(prefix):
                found.append(f"s3://{self.BUCKET}/{key}")
        return found

    def check_bucket(self, uri: str) -> None:
        if split_s3(uri)[0] != self.BUCKET or not self.folder.is_dir():
            raise ValueError(f"{uri}: not the service's folder store {self.folder}")
