"""A real S3-protocol server for the tests: moto's standalone server, started as a process.

Credentials and the endpoint reach tracekit (and every child it starts) through the usual AWS
environment variables, exactly as on a real bucket; nothing here is tracekit-specific.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from proc import free_port

ACCESS_KEY = "tracekit-test-access-key-id"
SECRET_KEY = "tracekit-test-secret-" + uuid.uuid4().hex  # grep-able: must never land in a trace



@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """Start moto's server; yield the AWS_* environment that points at it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.2)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def aws_env(env: dict[str, str]) -> Iterator[None]:
    """Set the AWS_* variables in this process (children inherit them), restore them after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_bucket(name: str) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


def all_objects(bucket: str) -> list[tuple[str, bytes]]:
    import boto3

    s3 = boto3.client("s3")
    out: list[tuple[str, bytes]] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            out.append((o["Key"], s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()))
    return out


def keys(bucket: str, prefix: str = "") -> list[str]:
    import boto3

    s3 = boto3.client("s3")
    got: list[Any] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        got.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(got)
