"""Object storage that fails for a while: calls retry with backoff and the fit goes on; storage that
stays down stops the expert with an error naming the file, losing nothing already written.

The S3-compatible server is moto's, in a thread of this process on 127.0.0.1; an outage is the
server stopped, then started again on the same port (moto keeps its buckets in the process).
pyarrow's S3 client retries a refused connection for about 6 s by itself before our retries take
over, so the outage that must reach them lasts 10 s.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

from archipelago.experts import storage
from archipelago.experts.storage import StorageUnavailable
from archipelago.platform import manifest, sdk
from archipelago.platform.status import run_status

BUCKET = "outage"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
DOMAIN = {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}
OFFLINE = OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect to server")


class Server:
    """A moto S3 server that can be stopped and started again on its port."""

    def __init__(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self.server.start()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    server = Server()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{server.host}:{server.port}")
    boto3.client("s3", endpoint_url=f"http://{server.host}:{server.port}").create_bucket(Bucket=BUCKET)
    yield server
    server.stop()


def flaky(failures: int, error: OSError = OFFLINE):
    """A call that fails `failures` times, then answers; it counts its calls."""
    calls = []

    def call() -> str:
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise error
        return "answer"

    return call, calls


def test_transient_failures_are_retried_with_growing_delays(caplog):
    call, calls = flaky(3)
    assert storage.retried("s3://bucket/run/x.json", "writing", call) == "answer"
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert len(calls) == 4 and gaps[0] >= 0.25 and gaps[1] >= 0.5 and gaps[2] >= 1.0
    assert caplog.text.count("writing s3://bucket/run/x.json failed") == 3


def test_what_retrying_cannot_mend_is_raised_at_once(monkeypatch):
    for error in (FileNotFoundError("s3://bucket/run/x.json"), PermissionError("AWS Error ACCESS_DENIED"),
                  OSError("AWS Error NO_SUCH_BUCKET during GetObject operation")):
        call, calls = flaky(1, error)
        with pytest.raises(type(error)):
            storage.retried("s3://bucket/run/x.json", "reading", call)
        assert len(calls) == 1
    call, calls = flaky(1)
    with pytest.raises(OSError):  # local files are not retried
        storage.retried("/tmp/run/x.json", "reading", call)
    assert len(calls) == 1


def test_storage_down_past_the_window_is_an_error_naming_the_file(monkeypatch):
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    call, calls = flaky(100)
    with pytest.raises(StorageUnavailable, match=r"writing s3://bucket/run/x.json: the storage kept failing for"):
        storage.retried("s3://bucket/run/x.json", "writing", call)
    assert 2 <= len(calls) <= 4


def test_a_fit_goes_on_through_a_storage_outage(server, caplog):
    run_dir = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    settings = {"steps": 400, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 20, "progress": False}
    down = threading.Thread(target=_outage_after_first_checkpoint, args=(server, run_dir, 10.0), daemon=True)
    down.start()
    run = sdk.fit("sines:60", run_dir, experts=1, expert=settings, router={**settings, "steps": 10},
                  domain_config=DOMAIN)
    down.join()
    assert "failed (attempt 1" in caplog.text and "retrying in" in caplog.text  # the outage was met
    status = run_status(run.run_dir)
    assert [(e["step"], e["state"]) for e in status["experts"]] == [(400, "done")] and status["assembled"]
    assert manifest.read(run.run_dir, 0)["state"] == "done"


def test_storage_that_stays_down_stops_the_expert_and_loses_nothing(server, monkeypatch, caplog):
    run_dir = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    settings = {"steps": 400, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 20, "progress": False}
    monkeypatch.setenv(storage.RETRY_ENV, "1")
    down = threading.Thread(target=_outage_after_first_checkpoint, args=(server, run_dir, None), daemon=True)
    down.start()
    with pytest.raises(StorageUnavailable, match=rf"{run_dir}/experts/expert-0.*: the storage kept failing"):
        sdk.fit("sines:60", run_dir, experts=1, expert=settings, router={**settings, "steps": 10},
                domain_config=DOMAIN)
    server.start()  # the storage is back
    expert = run_status(run_dir)["experts"][0]
    assert expert["state"] in ("failed", "interrupted") and expert["step"] >= 20  # its checkpoints are intact
    monkeypatch.setenv(storage.RETRY_ENV, "60")
    run = sdk.fit("sines:60", run_dir, experts=1, expert=settings, router={**settings, "steps": 10},
                  domain_config=DOMAIN)
    assert f"resumed from checkpoint step {expert['step']}" in caplog.text
    assert run_status(run.run_dir)["experts"][0]["state"] == "done"


def _outage_after_first_checkpoint(server: Server, run_dir: str, seconds: float | None) -> None:
    """Stop the server once expert 0 has a checkpoint; start it again after `seconds` (None: never)."""
    latest = storage.join(run_dir, "experts", "expert-0", "LATEST")
    deadline = time.monotonic() + 120
    while not storage.exists(latest) and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()
    if seconds is not None:
        time.sleep(seconds)
        server.start()
