"""Shared fixtures: a real S3 endpoint on localhost (moto server) and the tiny demo model and data."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server speaking real HTTP on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Environment pointing boto3 at the moto server, and a fresh bucket; yields 's3://<bucket>'."""
    import uuid

    import boto3

    from fulltune import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage.s3_client.cache_clear()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    storage.s3_client.cache_clear()


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """The demo's tiny tokenizer, base model and datasets, built once per test session."""
    from fulltune.demo.assets import build_demo_assets

    cache = os.environ.get("FULLTUNE_TEST_ASSETS")
    root = Path(cache) if cache else tmp_path_factory.mktemp("demo-assets")
    return build_demo_assets(root)
