"""Bucket hygiene for the service's store (`python -m sonic storage setup`): versioning, a lifecycle and a public
access block on the inputs and outputs buckets, applied through the store's S3 API where it supports them.

Each setting is one step, tried on its own and read back before it counts as applied: some S3-compatible stores
answer calls they do not support with a success or with another call's answer (`rclone serve s3` takes a PUT of a
lifecycle for a bucket creation). Nothing here imports torch or ComfyUI; boto3 comes in through `sonic.jobs.storage`.
"""

from __future__ import annotations

from typing import NamedTuple

from ..jobs.storage import S3, split_s3

# Inputs are read once, when their job runs; older ones are kept cheaply. AWS S3 itself refuses STANDARD_IA before
# 30 days (its API reference: Transition.Days): there give --infrequent-after 30 --archive-after 60 (or more).
INPUTS_INFREQUENT_AFTER_DAYS = 7
INPUTS_ARCHIVE_AFTER_DAYS = 30
ABORT_UPLOADS_AFTER_DAYS = 1
INPUTS_RULE, OUTPUTS_RULE = "sonic-inputs", "sonic-outputs"  # other rules already on a bucket are kept
# outputs are shared only through presigned links, inputs never: nothing in either bucket is public
PUBLIC_ACCESS_BLOCK = {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                       "RestrictPublicBuckets": True}


class Step(NamedTuple):
    bucket: str
    what: str
    ok: bool
    detail: str  # "applied", or the store's reason


def plan(inputs_uri: str, outputs_uri: str, infrequent_after: int = INPUTS_INFREQUENT_AFTER_DAYS,
         archive_after: int = INPUTS_ARCHIVE_AFTER_DAYS) -> dict[str, dict]:
    """bucket -> the documents to apply there, keyed by boto3's parameter names (VersioningConfiguration,
    LifecycleConfiguration, PublicAccessBlockConfiguration). One bucket for both is fine when the inputs have a
    folder of their own (otherwise their tiering would archive the outputs and break their links)."""
    if not 1 <= infrequent_after < archive_after:
        raise ValueError(f"--infrequent-after {infrequent_after} and --archive-after {archive_after}: give days, the "
                         "first at least 1 and smaller than the second")
    inputs_bucket, inputs_prefix = _bucket_and_folder(inputs_uri)
    outputs_bucket, outputs_prefix = _bucket_and_folder(outputs_uri)
    if inputs_bucket == outputs_bucket and outputs_prefix.startswith(inputs_prefix):
        raise ValueError(f"outputs {outputs_uri} lie inside inputs {inputs_uri}: the inputs' move to archive storage "
                         f"would take the outputs too; give the inputs a folder of their own "
                         f"(e.g. s3://{inputs_bucket}/inputs)")
    abort = {"AbortIncompleteMultipartUpload": {"DaysAfterInitiation": ABORT_UPLOADS_AFTER_DAYS}}
    # outputs' folder around the inputs' (the service's layout): its rule removes their unfinished uploads too, and
    # no two rules of one bucket share an action on overlapping prefixes (which some stores refuse)
    inputs_covered = inputs_bucket == outputs_bucket and inputs_prefix.startswith(outputs_prefix)
    inputs_rule = {"ID": INPUTS_RULE, "Filter": {"Prefix": inputs_prefix}, "Status": "Enabled",
                   "Transitions": [{"Days": infrequent_after, "StorageClass": "STANDARD_IA"},
                                   {"Days": archive_after, "StorageClass": "GLACIER"}],
                   **({} if inputs_covered else abort)}
    outputs_rule = {"ID": OUTPUTS_RULE, "Filter": {"Prefix": outputs_prefix}, "Status": "Enabled", **abort}
    documents = {}
    for bucket, rule in ((inputs_bucket, inputs_rule), (outputs_bucket, outputs_rule)):
        bucket_documents = documents.setdefault(bucket, {
            "VersioningConfiguration": {"Status": "Enabled"},
            "LifecycleConfiguration": {"Rules": []},
            "PublicAccessBlockConfiguration": dict(PUBLIC_ACCESS_BLOCK)})
        bucket_documents["LifecycleConfiguration"]["Rules"].append(rule)
    return documents


def apply(s3: S3, documents: dict[str, dict]) -> list[Step]:
    """Every step of `plan`'s documents; a missing or unreachable bucket stops everything first (ValueError)."""
    from botocore.exceptions import BotoCoreError, ClientError

    for bucket in documents:
        s3.check_bucket(f"s3://{bucket}")
    credentials = s3.session.get_credentials()
    secrets = [credentials.access_key, credentials.secret_key] if credentials else []
    steps = []
    for bucket, bucket_documents in documents.items():
        for what, put in (("versioning", _versioning), (_describe(bucket_documents), _lifecycle),
                          ("public access block (all four flags)", _public_access_block)):
            try:
                problem = put(s3.client, bucket, bucket_documents)
            except (ClientError, BotoCoreError) as exc:
                problem = _reason(exc)
            detail = "applied" if problem is None else _redact(problem, secrets)
            steps.append(Step(bucket, what, problem is None, detail))
    return steps


def setup(inputs_uri: str, outputs_uri: str, endpoint_url: str | None = None, addressing: str = "auto",
          infrequent_after: int = INPUTS_INFREQUENT_AFTER_DAYS, archive_after: int = INPUTS_ARCHIVE_AFTER_DAYS
          ) -> list[Step]:
    """`plan`, then `apply` with the standard credential chain (AWS_* variables, profiles)."""
    documents = plan(inputs_uri, outputs_uri, infrequent_after, archive_after)
    return apply(S3(endpoint_url, addressing), documents)


def _versioning(client, bucket: str, documents: dict) -> str | None:
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration=documents["VersioningConfiguration"])
    status = client.get_bucket_versioning(Bucket=bucket).get("Status")
    return None if status == "Enabled" else f"the store accepted it, but reads back status {status!r}"


def _lifecycle(client, bucket: str, documents: dict) -> str | None:
    """Our rules replace their earlier versions; the bucket's other rules stay (a PUT replaces the whole
    configuration, so they are read first)."""
    from botocore.exceptions import ClientError

    rules = documents["LifecycleConfiguration"]["Rules"]
    ours = {rule["ID"] for rule in rules}
    try:
        current = client.get_bucket_lifecycle_configuration(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise
        current = {}
    kept = [rule for rule in current.get("Rules", []) if rule.get("ID") not in ours]
    extra = {key: current[key] for key in ("TransitionDefaultMinimumObjectSize",) if key in current}
    client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": kept + rules}, **extra)
    found = {rule.get("ID") for rule in client.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])}
    missing = sorted(ours - found)
    return f"the store accepted it, but reads back no rule {', '.join(missing)}" if missing else None


def _public_access_block(client, bucket: str, documents: dict) -> str | None:
    wanted = documents["PublicAccessBlockConfiguration"]
    client.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=wanted)
    found = client.get_public_access_block(Bucket=bucket).get("PublicAccessBlockConfiguration", {})
    return None if found == wanted else f"the store accepted it, but reads back {found}"


def _describe(documents: dict) -> str:
    """'lifecycle (inputs/: STANDARD_IA after 7 d, GLACIER after 30 d, unfinished uploads removed after 1 d)'."""
    parts = []
    for rule in documents["LifecycleConfiguration"]["Rules"]:
        actions = [f"{move['StorageClass']} after {move['Days']} d" for move in rule.get("Transitions", [])]
        if "AbortIncompleteMultipartUpload" in rule:
            days = rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"]
            actions.append(f"unfinished uploads removed after {days} d")
        parts.append(f"{rule['Filter']['Prefix'] or 'all'}: {', '.join(actions)}")
    return f"lifecycle ({'; '.join(parts)})"


def _bucket_and_folder(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ('bucket', 'a/b/'): a folder, so 'inputs' does not also match 'inputs-old/'."""
    bucket, key = split_s3(uri)
    key = key.strip("/")
    return bucket, f"{key}/" if key else ""


def _reason(exc) -> str:
    """The store's error code and message, short: 'NotImplemented (HTTP 501)'."""
    response = getattr(exc, "response", None)
    if response is None:  # no answer from the store (BotoCoreError)
        return " ".join(str(exc).split())[:200]
    error = response.get("Error", {})
    code, message = str(error.get("Code", "")), " ".join(str(error.get("Message", "")).split())
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    text = code if message in ("", code) else f"{code}: {message}"
    return f"{text[:200]} (HTTP {status})" if status else text[:200]


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
