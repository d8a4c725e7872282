"""sonic/jobs/storage.py's S3 against a real S3 server (`rclone serve s3`, which checks signatures)."""

from __future__ import annotations

import hashlib
import logging

import pytest
from servers import S3Server

from sonic.jobs import storage


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("storage") / "s3", ("store",))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def s3(s3_server, monkeypatch):
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return storage.S3(s3_server.endpoint, "path")


def test_download_copy_delete(s3, s3_server, tmp_path):
    data = b"\x89PNG not really" * 1000
    (tmp_path / "src.png").write_bytes(data)
    s3.upload(tmp_path / "src.png", "s3://store/a/src.png", {"sha256": "abc", "sonic-job-id": "j1"}, "image/png")

    target = tmp_path / "down" / "copy.png"
    target.parent.mkdir()
    assert s3.download("s3://store/a/src.png", target) == (hashlib.sha256(data).hexdigest(), len(data))
    assert target.read_bytes() == data and [p.name for p in target.parent.iterdir()] == ["copy.png"]
    with pytest.raises(FileNotFoundError, match="s3://store/a/missing.png"):
        s3.download("s3://store/a/missing.png", tmp_path / "down" / "missing.png")
    assert [p.name for p in target.parent.iterdir()] == ["copy.png"]  # no temporary file left behind

    sent = []
    s3.client.meta.events.register("provide-client-params.s3.CopyObject", lambda params, **_: sent.append(params))
    s3.copy("s3://store/a/src.png", "s3://store/b/dst.png")  # server-side, user metadata and type kept
    # rclone keeps the metadata even when told REPLACE; AWS would drop it, so the request itself must say COPY
    assert sent[0]["MetadataDirective"] == "COPY" and sent[0]["CopySource"] == "store/a/src.png"
    head = s3_server.client().head_object(Bucket="store", Key="b/dst.png")
    metadata = {k.lower(): v for k, v in head["Metadata"].items() if k.lower() != "mtime"}  # rclone's, of the copy
    assert metadata == s3.head("s3://store/a/src.png")["metadata"] == {"sha256": "abc", "sonic-job-id": "j1"}
    assert head["ContentType"] == "image/png" and head["ContentLength"] == len(data)
    assert s3.read("s3://store/b/dst.png") == data
    with pytest.raises(FileNotFoundError, match="s3://store/a/missing.png"):
        s3.copy("s3://store/a/missing.png", "s3://store/b/other.png")

    s3.delete("s3://store/a/src.png")
    assert s3.head("s3://store/a/src.png") is None and s3.head("s3://store/b/dst.png") is not None
    s3.delete("s3://store/a/src.png")  # already gone: no error


def test_presign_expiry_is_capped_at_seven_days(s3):
    assert "X-Amz-Expires=604800" in s3.presign("s3://store/x.mp4", 604800)
    for bad in (604801, 30 * 86400, 0):
        with pytest.raises(ValueError, match="--url-expiry"):
            s3.presign("s3://store/x.mp4", bad)
    with pytest.raises(ValueError, match="--url-expiry 1209600: .*604800 seconds"):
        storage.S3Outputs(s3, "s3://store/out", 14 * 86400, check=False)  # refused before any job runs


def test_temporary_credentials_warn_once(s3, monkeypatch, caplog):
    monkeypatch.setattr(storage, "_session_token_warned", False)
    with caplog.at_level(logging.WARNING, logger=storage.__name__):
        s3.presign("s3://store/x.mp4", 600)  # long-term credentials: nothing to say
        assert caplog.records == []
        monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLE")
        for _ in range(3):  # once per process, however many S3 objects sign links
            temporary = storage.S3(None, "path")
            for _ in range(2):
                assert "X-Amz-Security-Token=" in temporary.presign("s3://store/x.mp4", 600)
    assert len(caplog.records) == 1, caplog.records
    assert "session expires, whatever --url-expiry says" in caplog.records[0].getMessage()
