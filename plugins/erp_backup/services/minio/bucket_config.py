"""A MinIO bucket's configuration: policy, versioning, lifecycle and tags, captured into a set and restored.

`capture_bucket_config` records each part, or `{"present": false}` when the bucket has none
(`"unsupported"` when the server does not implement it). `restore_bucket_config` applies a
captured configuration to another bucket, rewriting the policy's ARNs to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from erp_backup.services.minio.endpoint import Endpoint, error_code

_ABSENT_CONFIG = {
    "policy": "NoSuchBucketPolicy",
    "lifecycle": "NoSuchLifecycleConfiguration",
    "tags": "NoSuchTagSet",
}


def capture_bucket_config(endpoint: Endpoint, bucket: str) -> dict[str, Any]:
    """Policy, versioning, lifecycle and tags; an absent one is recorded as `{"present": false}`."""
    from botocore.exceptions import ClientError

    client = endpoint.client

    def read(name: str, call: Callable[[], dict[str, Any]], pick: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        with endpoint.errors(f"reading the {name} of bucket {bucket}"):
            try:
                return {"present": True, **pick(call())}
            except ClientError as exc:
                code = error_code(exc)
                if code == _ABSENT_CONFIG.get(name):
                    return {"present": False}
                if code in ("NotImplemented", "XNotImplemented"):
                    return {"present": False, "unsupported": code}
                raise

    versioning = read("versioning", lambda: client.get_bucket_versioning(Bucket=bucket),
                      lambda r: {"status": r.get("Status", "Unversioned"), "mfa_delete": r.get("MFADelete")})
    return {
        "bucket": bucket,
        "policy": read("policy", lambda: client.get_bucket_policy(Bucket=bucket),
                       lambda r: {"policy": json.loads(r["Policy"])}),
        "versioning": versioning,
        "lifecycle": read("lifecycle", lambda: client.get_bucket_lifecycle_configuration(Bucket=bucket),
                          lambda r: {"rules": r.get("Rules", [])}),
        "tags": read("tags", lambda: client.get_bucket_tagging(Bucket=bucket),
                     lambda r: {"tags": {tag["Key"]: tag["Value"] for tag in r.get("TagSet", [])}}),
    }


def config_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "policy": config["policy"]["present"],
        "versioning": config["versioning"].get("status", "Unversioned") if config["versioning"]["present"] else None,
        "lifecycle": config["lifecycle"]["present"],
        "tags": config["tags"]["present"],
    }


def restore_bucket_config(endpoint: Endpoint, config: Mapping[str, Any], bucket: str) -> list[str]:
    """Apply a captured configuration to `bucket`; the policy's ARNs are rewritten to it. Returns what was set."""
    client, source = endpoint.client, config["bucket"]
    applied = []
    with endpoint.errors(f"restoring the configuration of bucket {bucket}"):
        status = config["versioning"].get("status") if config["versioning"]["present"] else None
        if status in ("Enabled", "Suspended"):
            client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": status})
            applied.append("versioning")
        if config["lifecycle"]["present"]:
            client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": config["lifecycle"]["rules"]})
            applied.append("lifecycle")
        if config["tags"]["present"]:
            tag_set = [{"Key": k, "Value": v} for k, v in sorted(config["tags"]["tags"].items())]
            client.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_set})
            applied.append("tags")
        if config["policy"]["present"]:
            policy = json.dumps(config["policy"]["policy"]).replace(f"arn:aws:s3:::{source}", f"arn:aws:s3:::{bucket}")
            client.put_bucket_policy(Bucket=bucket, Policy=policy)
            applied.append("policy")
    return applied


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n").encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
