"""A real S3 server for the object-store tests: moto's, on 127.0.0.1 at a free port.

The clients (s3fs in the workers, boto3 in the tests) speak HTTP to it, so the whole client
stack runs; only the server is moto's. Credentials are dummies; loopback only.
"""

from __future__ import annotations

import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}


class S3Server:
    """A started moto server: ``endpoint``, a boto3 ``client``, fresh buckets on demand."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        import boto3

        self.client: Any = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                        aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    @contextmanager
    def authentication(self) -> Iterator[None]:
        """Make the server check credentials (moto's reset-auth switch), then stop again."""
        self._post("/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            self._post("/moto-api/reset-auth", b"inf")

    def _post(self, path: str, body: bytes) -> None:
        request = urllib.request.Request(self.endpoint + path, data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            answer.read()

    def stop(self) -> None:
        self._server.stop()


@contextmanager
def s3_environment(endpoint: str) -> Iterator[None]:
    """Dummy credentials and ``AWS_ENDPOINT_URL`` in ``os.environ`` (workers inherit them)."""
    saved = {k: os.environ.get(k) for k in [*DUMMY_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(DUMMY_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module", name="s3")
def s3_fixture() -> Iterator[S3Server]:
    """A moto server for the module, with dummy credentials and its endpoint in the env."""
    server = S3Server()
    try:
        with s3_environment(server.endpoint):
            yield server
    finally:
        server.stop()
