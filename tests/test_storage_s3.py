"""Storage, checkpoints and a whole fit on s3:// against a local S3-compatible server (moto).

The server runs in a thread of this process on 127.0.0.1. Its endpoint reaches pyarrow in the two
ways a user can give it: in the URI's query (`s3://bucket/run?endpoint_override=host:port&scheme=http`,
kept at the end of every joined URI) or in the environment (`AWS_ENDPOINT_URL_S3`). Credentials and
the endpoint are set with monkeypatch, so no AWS variable outlives a test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from archipelago.experts import storage
from archipelago.experts.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

BUCKET = "archipelago-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
TINY = {"steps": 6, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 3, "progress": False}
DOMAIN = {"window": 8, "width": 16, "depth": 1, "heads": 2, "router_width": 16, "router_depth": 1}


def _client(endpoint: str):
    """A boto3 S3 client of the moto server at host:port."""
    return boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """host:port of a moto S3 server holding an empty bucket."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    _client(f"{host}:{port}").create_bucket(Bucket=BUCKET)
    yield f"{host}:{port}"
    server.stop()


def uri_maker(endpoint: str, form: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Set test credentials and return a builder of s3:// URIs under a fresh prefix, with the
    endpoint in the URI's query ("query") or in the environment ("env")."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    if form == "env":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://{endpoint}")
        return lambda path: f"{prefix}/{path}"
    return lambda path: f"{prefix}/{path}?endpoint_override={endpoint}&scheme=http"


@pytest.fixture(params=["query", "env"])
def s3_uri(request, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    return uri_maker(endpoint, request.param, monkeypatch)


def test_join_keeps_the_query_at_the_end() -> None:
    uri = "s3://b/run?endpoint_override=127.0.0.1:9000&scheme=http"
    assert (
        storage.join(uri, "experts", "expert-0")
        == "s3://b/run/experts/expert-0?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.base_name(storage.join(uri, "step-00000010")) == "step-00000010"
    assert storage.join("/tmp/a?b", "c") == "/tmp/a?b/c"  # a local path has no query


def test_bytes_and_json_round_trip(s3_uri: Callable[[str], str]) -> None:
    root = s3_uri("store")
    storage.write_bytes(storage.join(root, "a", "blob.bin"), b"\x00\x01first")
    storage.write_bytes(storage.join(root, "a", "blob.bin"), b"\x00\x01second")  # overwrite in one PUT
    storage.write_json(storage.join(root, "meta.json"), {"step": 3, "names": ["x"]})
    assert storage.read_bytes(storage.join(root, "a", "blob.bin")) == b"\x00\x01second"
    assert storage.read_json(storage.join(root, "meta.json")) == {"names": ["x"], "step": 3}
    assert storage.list_dir(root) == ["a", "meta.json"]
    assert storage.list_dir(storage.join(root, "a")) == ["blob.bin"]  # no temporary names left behind
    assert storage.exists(storage.join(root, "a")) and storage.exists(storage.join(root, "meta.json"))
    assert not storage.exists(storage.join(root, "missing.json"))
    assert storage.list_dir(storage.join(root, "nowhere")) == []
    with pytest.raises(FileNotFoundError, match="missing.json"):
        storage.read_bytes(storage.join(root, "missing.json"))
    storage.check_writable(root)
    assert storage.list_dir(root) == ["a", "meta.json"]  # the probe is gone
    storage.delete_dir(root)
    assert not storage.exists(storage.join(root, "meta.json")) and storage.list_dir(root) == []
    storage.delete_dir(root)  # deleting what is gone is a no-op


def test_checkpoints_save_load_and_latest(s3_uri: Callable[[str], str]) -> None:
    folder = s3_uri("experts/expert-0")
    assert latest_checkpoint(folder) is None
    weights = {"model.w": torch.arange(6.0).reshape(2, 3), "ema.w": torch.ones(2, 3)}
    state = {"rng.data": torch.Generator().manual_seed(1).get_state()}
    for step in (10, 20):
        save_checkpoint(folder, step, {k: v * step for k, v in weights.items()}, state, {"partition": 0})
    latest = latest_checkpoint(folder)
    assert storage.base_name(latest) == "step-00000020"
    checkpoint = load_checkpoint(latest)
    assert {k: v for k, v in checkpoint.meta.items() if k != "checksums"} == {"partition": 0, "step": 20}
    assert set(checkpoint.meta["checksums"]) == {"model.safetensors", "state.safetensors"}  # verified on load
    assert torch.equal(checkpoint.model["model.w"], weights["model.w"] * 20)
    assert torch.equal(checkpoint.state["rng.data"], state["rng.data"])
    assert load_checkpoint(latest, with_state=False).state == {}
    assert storage.list_dir(folder) == ["LATEST", "step-00000010", "step-00000020"]


def object_versions(endpoint: str, bucket: str, prefix: str) -> dict[str, list[str]]:
    """Every object under prefix in a versioned bucket with its version ids: a rewrite adds a version.
    Deleted objects (the write probe of each preflight) and pyarrow's empty directory markers are left out."""
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
    versions: dict[str, list[str]] = {}
    deleted = set()
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for version in page.get("Versions", []):
            versions.setdefault(version["Key"], []).append(version["VersionId"])
        deleted |= {marker["Key"] for marker in page.get("DeleteMarkers", []) if marker["IsLatest"]}
    return {key: sorted(ids) for key, ids in versions.items() if key not in deleted and not key.endswith("/")}


def test_a_whole_fit_on_s3_resumes_then_load_and_sample(endpoint: str, tmp_path, tmp_path_factory, monkeypatch) -> None:
    """The endpoint in the query: every URI the steps join and every path ensemble.json keeps must
    carry it (the environment form is covered by the tests above). A fit stopped after 3 steps and
    continued to 6 on S3 ends with the weights of an uninterrupted 6-step fit; a further fit of the
    finished run rewrites no checkpoint (the bucket is versioned, so any rewrite would show)."""
    from archipelago.platform import sdk

    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    versioned = "archipelago-versioned"
    client = _client(endpoint)
    client.create_bucket(Bucket=versioned)
    client.put_bucket_versioning(Bucket=versioned, VersioningConfiguration={"Status": "Enabled"})
    run_dir = uri_maker(endpoint, "query", monkeypatch)("runs/sines").replace(f"s3://{BUCKET}/", f"s3://{versioned}/")
    prefix = run_dir.split("?")[0].removeprefix(f"s3://{versioned}/")

    def fit(run_dir: str, steps: int):
        settings = {**TINY, "steps": steps}
        return sdk.fit("sines:60", run_dir, experts=2, expert=settings, router=settings, domain_config=DOMAIN)

    fit(run_dir, 3)  # as if stopped after the first checkpoint
    assert storage.list_dir(storage.join(run_dir, "experts", "expert-0")) == ["LATEST", "step-00000003"]
    fit(run_dir, 6)  # the same run with more steps: resumed from step 3
    assert storage.list_dir(run_dir) == [
        "data",
        "domain.json",
        "ensemble.json",
        "ensembles",
        "experts",
        "manifest",
        "partition.json",
        "records",
        "router",
        "run.json",
    ]
    assert storage.read_json(storage.join(run_dir, "ensemble.json"))["experts"] == [
        ["experts", "expert-0", "step-00000006"],
        ["experts", "expert-1", "step-00000006"],
    ]
    assert storage.list_dir(storage.join(run_dir, "router")) == ["LATEST", "step-00000003", "step-00000006"]

    reference = tmp_path_factory.mktemp("uninterrupted") / "sines"
    fit(str(reference), 6)
    for folder in ("experts/expert-0", "experts/expert-1", "router"):
        for name in ("model.safetensors", "state.safetensors"):
            resumed = storage.read_bytes(storage.join(run_dir, *folder.split("/"), "step-00000006", name))
            assert resumed == (reference / folder / "step-00000006" / name).read_bytes(), (folder, name)

    out = sdk.load(run_dir).sample(3, strategy="top1", solver="euler", steps=2)
    assert out.items.shape == (3, 8, 5)

    before = object_versions(endpoint, versioned, prefix)
    assert len(before[f"{prefix}/experts/expert-0/LATEST"]) == 2  # moved at step 3, then at 6: rewrites show
    fit(run_dir, 6)  # finds everything done
    after = object_versions(endpoint, versioned, prefix)
    assert sorted(after) == sorted(before)  # no new object: no new checkpoint
    rewritten = sorted(key.removeprefix(prefix + "/") for key in before if after[key] != before[key])
    assert set(rewritten) <= {"run.json", "ensemble.json"}, rewritten  # only the settings and the ensemble
    assert list(tmp_path.iterdir()) == []
