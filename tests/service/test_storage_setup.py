"""`python -m sonic storage setup` (sonic/service/buckets.py, sonic/cli/storage.py) against a real `rclone serve s3`,
which supports none of versioning, lifecycle and public access blocks: every setting is reported NOT applied with the
store's reason, exit status 1. The documents themselves are checked through --dry-run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from servers import ROOT, S3Server

NOT_APPLIED = re.compile(r"^s3://(\w+): (.+): NOT applied: (\S.*) \(HTTP [45]\d\d\)$")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("buckets") / "s3", ("inputs", "outputs", "studio"))
    try:
        yield server
    finally:
        server.stop()


def setup(*args, env=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SONIC_S3"))}
    return subprocess.run([sys.executable, "-m", "sonic", "storage", "setup", *args], check=False,
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**clean, "PYTHONPATH": str(ROOT), **(env or {})})


def assert_no_credentials(done):
    for secret in (S3Server.KEY, S3Server.SECRET):
        assert secret not in done.stdout + done.stderr


def test_every_setting_is_reported_not_applied_with_the_stores_reason(store):
    done = setup("s3://inputs/renders/inputs", "s3://outputs/renders", env=store.env)
    assert done.returncode == 1, done.stderr
    *lines, summary = done.stdout.splitlines()
    steps = [NOT_APPLIED.match(line) for line in lines]
    assert all(steps), done.stdout
    assert [(m[1], m[2].split(" (")[0]) for m in steps] == [
        (bucket, what) for bucket in ("inputs", "outputs")
        for what in ("versioning", "lifecycle", "public access block")]
    assert steps[0][3] == "NotImplemented"  # rclone's answer to versioning (scale-notes)
    assert "renders/inputs/: STANDARD_IA after 7 d, GLACIER after 30 d" in steps[1][2]
    assert summary.startswith("6 of 6 settings could NOT be applied") and "console" in summary
    assert done.stderr == ""
    assert_no_credentials(done)
    assert sorted(p.name for p in store.root.iterdir()) == ["inputs", "outputs", "studio"]


def test_one_bucket_for_both_is_set_up_once(store):
    done = setup("s3://studio/p/inputs", "s3://studio/p", env=store.env)
    assert done.returncode == 1
    *lines, summary = done.stdout.splitlines()
    assert [NOT_APPLIED.match(line)[1] for line in lines] == ["studio"] * 3
    assert ("p/inputs/: STANDARD_IA after 7 d, GLACIER after 30 d; p/: unfinished uploads removed after 1 d"
            in lines[1])
    assert summary.startswith("3 of 3 settings could NOT be applied")


def test_a_missing_bucket_is_one_error_line_naming_it_and_nothing_is_tried(store):
    done = setup("s3://inputs/in", "s3://no-such-bucket/out", env=store.env)
    assert done.returncode == 2
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and "'no-such-bucket'" in line
    assert not (store.root / "no-such-bucket").exists()  # rclone makes a bucket of a PUT it does not know
    assert_no_credentials(done)


def test_credentials_the_store_refuses_are_one_error_line(store):
    done = setup("s3://inputs/in", "s3://outputs", env={**store.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert "'inputs'" in line and "credentials" in line and "not-the-secret" not in line
    assert_no_credentials(done)


def test_dry_run_prints_the_documents_without_a_store():
    done = setup("s3://inputs/renders/inputs/", "s3://outputs/renders", "--dry-run")
    assert done.returncode == 0, done.stderr
    documents = json.loads(done.stdout)
    assert set(documents) == {"inputs", "outputs"}
    for bucket in documents.values():
        assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
        assert bucket["PublicAccessBlockConfiguration"] == {"BlockPublicAcls": True, "IgnorePublicAcls": True,
                                                            "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    [inputs_rule] = documents["inputs"]["LifecycleConfiguration"]["Rules"]
    assert inputs_rule["Filter"] == {"Prefix": "renders/inputs/"} and inputs_rule["Status"] == "Enabled"
    assert inputs_rule["Transitions"] == [{"Days": 7, "StorageClass": "STANDARD_IA"},
                                          {"Days": 30, "StorageClass": "GLACIER"}]
    assert inputs_rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    [outputs_rule] = documents["outputs"]["LifecycleConfiguration"]["Rules"]
    assert outputs_rule["Filter"] == {"Prefix": "renders/"} and "Transitions" not in outputs_rule
    assert outputs_rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}


def test_dry_run_of_one_bucket_never_archives_outputs():
    done = setup("s3://studio/p/inputs", "s3://studio/p", "--dry-run")
    assert done.returncode == 0, done.stderr
    inputs_rule, outputs_rule = json.loads(done.stdout)["studio"]["LifecycleConfiguration"]["Rules"]
    assert inputs_rule["Filter"] == {"Prefix": "p/inputs/"} and len(inputs_rule["Transitions"]) == 2
    assert "AbortIncompleteMultipartUpload" not in inputs_rule  # the outputs' rule (p/) covers p/inputs/ already
    assert outputs_rule["Filter"] == {"Prefix": "p/"} and "Transitions" not in outputs_rule
    assert outputs_rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}

    for inputs, outputs in (("s3://studio", "s3://studio/p"), ("s3://studio/in", "s3://studio/in/out")):
        refused = setup(inputs, outputs, "--dry-run")
        assert refused.returncode == 2 and refused.stdout == ""
        assert "lie inside inputs" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_the_tiering_days_are_flags_for_stores_with_other_minimums():
    done = setup("s3://inputs/in", "s3://outputs", "--dry-run", "--infrequent-after", "30", "--archive-after", "90")
    assert done.returncode == 0, done.stderr
    [rule] = json.loads(done.stdout)["inputs"]["LifecycleConfiguration"]["Rules"]
    assert rule["Transitions"] == [{"Days": 30, "StorageClass": "STANDARD_IA"}, {"Days": 90, "StorageClass": "GLACIER"}]
    refused = setup("s3://inputs/in", "s3://outputs", "--dry-run", "--infrequent-after", "40", "--archive-after", "30")
    assert refused.returncode == 2 and "--infrequent-after 40" in refused.stderr
