"""A real S3 API server for the tests: moto in server mode on 127.0.0.1, one per test process.

`s3_server` starts it once per session (a free port, its own process so the trainer subprocesses the
tests start reach it too) and points this process's environment at it: `S3_ENDPOINT_URL`, dummy AWS
credentials and region, which subprocesses inherit. `s3_bucket` is a fresh, empty bucket per test.
"""

import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

_buckets = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto server exited with status {server.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server at {url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a running moto S3 server, with this process's environment set to use it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    environment = {
        "S3_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environment.items():
            patch.setenv(key, value)
        try:
            _wait_until_up(url, server)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """`s3://<name>`: a new, empty bucket on the test server."""
    import boto3

    name = f"test-{os.getpid()}-{next(_buckets)}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"
