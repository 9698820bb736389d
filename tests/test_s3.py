"""A store written to s3:// on a local S3-compatible server (moto, on loopback) reads back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from microscope.activations.dump import dump
from microscope.activations.reader import open_store
from test_store_fixtures import make_model_dir, make_prompts

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")


@pytest.fixture
def s3_endpoint(monkeypatch):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="stores")
    yield endpoint
    server.stop()


def test_dump_to_s3_reads_back_exactly(tmp_path, s3_endpoint):
    model_dir = make_model_dir(tmp_path / "model")
    prompts = make_prompts(tmp_path / "p.jsonl", 6)
    hooks = "blocks.*.hook_resid_post,blocks.0.attn.hook_pattern"
    options = {"endpoint_url": s3_endpoint, "asynchronous": True}
    dump(str(model_dir), str(prompts), hooks, "s3://stores/run.zarr", chunk_rows=16, dtype="bf16",
         storage_options=options)
    dump(str(model_dir), str(prompts), hooks, str(tmp_path / "local.zarr"), chunk_rows=16, dtype="bf16")
    remote = open_store("s3://stores/run.zarr", storage_options=options)
    local = open_store(str(tmp_path / "local.zarr"))
    assert remote.is_complete and remote.hooks == local.hooks
    for name in local.hooks:
        assert np.array_equal(remote[name].read(0, remote[name].n_rows), local[name].read(0, local[name].n_rows))
    assert remote.tokens(3) == local.tokens(3)
