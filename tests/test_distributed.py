"""Indexing on a real Ray cluster: a head and a second node on 127.0.0.1 (1 CPU each), started here and stopped
after. A library built through the cluster must be the library a local run builds: same rows in the same
order, same vectors, same recorded errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from clipsearch.indexer.distributed import LOST_REASON, ClusterPlan, plan_cluster
from conftest import clipsearch_command
from hostile import jpeg_bytes, make_hostile_corpus, photo_like, restore_permissions, write
from test_crash_safety import _wait_for_committed_rows

from clipsearch.library import Library

PHOTOS = 80
FP16_TOLERANCE = 1e-3  # what a GPU worker's fp16 encoder may differ by; on these CPUs the vectors are equal
# Runs whose vectors are compared use torch: an int8 backend's depend (within its fidelity) on the batch's photos.
TORCH = ("--backend", "torch")


@dataclass(frozen=True)
class RayCluster:
    address: str  # host:port, for a driver on a node of the cluster
    client_address: str  # ray://host:port, for a driver connected through Ray Client


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A two-node cluster on this machine, with a Ray Client server on its head."""
    ray = str(Path(sys.executable).with_name("ray"))
    port, client_port = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--node-ip-address=127.0.0.1",
              "--disable-usage-stats"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                        f"--ray-client-server-port={client_port}", *common], check=True, capture_output=True, env=env,
                       timeout=120)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common], check=True, capture_output=True,
                       env=env, timeout=120)
        yield RayCluster(f"127.0.0.1:{port}", f"ray://127.0.0.1:{client_port}")
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def library_rows(library_dir: Path) -> tuple[list[dict], np.ndarray, dict[str, str]]:
    """(image rows in id order without their timestamps, their vectors, path -> recorded error)."""
    library = Library.open(library_dir)
    try:
        ids = library.store.all_ids()
        rows = library.store.images_by_ids(ids.tolist())
        ordered = [{k: v for k, v in rows[i].items() if k != "indexed_at"} for i in ids.tolist()]
        errors = {e["path"]: e["reason"] for e in library.store.errors()}
        return ordered, library.vectors().get(ids), errors
    finally:
        library.close()


def test_a_library_built_on_the_cluster_is_the_one_a_local_run_builds(tmp_path, ray_cluster, random_model, run_cli):
    corpus = tmp_path / "corpus"
    make_hostile_corpus(corpus)  # bad files, odd names (not UTF-8 among them), long paths
    for n in range(24):
        write(corpus / "photos" / f"{n:02d}.jpg", jpeg_bytes(photo_like(160, 120, seed=n)))
    local, clustered = tmp_path / "local", tmp_path / "clustered"
    try:
        run_cli("index", str(corpus), "--library", str(local), "--batch-size", "8", *TORCH, model=random_model)
        result = run_cli("index", str(corpus), "--library", str(clustered), "--batch-size", "8", "--json", *TORCH,
                         "--workers", "2", "--ray", ray_cluster.address, model=random_model, timeout=600)
    finally:
        restore_permissions(corpus)

    report = json.loads(result.stdout)
    assert report["decode_pool"] == "ray: 2 actors x 1 CPU" and report["workers"] == 2 * 2
    expected_rows, expected_vectors, expected_errors = library_rows(local)
    rows, vectors, errors = library_rows(clustered)
    assert rows == expected_rows and len(rows) >= 24  # same paths, metadata and ids, in the same order
    np.testing.assert_allclose(vectors, expected_vectors, atol=FP16_TOLERANCE)
    assert errors == expected_errors and len(errors) >= 5
    assert report["encoded"] == len(rows) and len(report["errors"]) == len(errors)

    again = run_cli("index", str(corpus), "--library", str(clustered), "--ray", ray_cluster.address, model=random_model)
    assert f"0 encoded (0 new, 0 changed), 0 moved, 0 removed, {len(rows)} unchanged" in again.stdout


def test_a_killed_driver_resumes_and_a_killed_worker_is_replaced(tmp_path, ray_cluster, random_model, run_cli):
    corpus = tmp_path / "corpus"
    for n in range(PHOTOS):  # enough batches that work is left when the driver is killed after its first
        write(corpus / f"{n:02d}.jpg", jpeg_bytes(photo_like(160, 120, seed=n)))
    killed = tmp_path / "killed"
    driver = _start_index(killed, corpus, random_model, ray_cluster.address)
    assert _wait_for_committed_rows(killed, driver, timeout=300) < PHOTOS
    driver.send_signal(signal.SIGKILL)
    driver.communicate()

    resumed = _start_index(killed, corpus, random_model, ray_cluster.address)
    os.kill(_working_actor(resumed), signal.SIGKILL)  # Ray restarts the actor and runs its batch again
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "0 errors" in out

    reference = tmp_path / "reference"
    run_cli("index", str(corpus), "--library", str(reference), "--batch-size", "4", *TORCH, model=random_model)
    rows, vectors, errors = library_rows(killed)
    expected_rows, expected_vectors, _ = library_rows(reference)
    by_path = {row["path"]: vector for row, vector in zip(rows, vectors, strict=True)}
    assert sorted(by_path) == sorted(row["path"] for row in expected_rows) and len(by_path) == PHOTOS
    for row, vector in zip(expected_rows, expected_vectors, strict=True):
        np.testing.assert_allclose(by_path[row["path"]], vector, atol=FP16_TOLERANCE)
    assert errors == {}


def _start_index(library: Path, corpus: Path, model: str, address: str) -> subprocess.Popen[str]:
    env = {**os.environ, "CLIPSEARCH_LIBRARY": str(library), "CLIPSEARCH_MODEL": model}
    return subprocess.Popen([*clipsearch_command(), "index", str(corpus), "--batch-size", "4", *TORCH, "--ray",
                             address], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _working_actor(driver: subprocess.Popen[str], timeout: float = 300) -> int:
    """The pid of an encoding actor that has started on a batch (Ray names the process after its task)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            pid, _, title = line.strip().partition(" ")
            if "MapBatches(_EncodeActor)).submit" in title:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no encoding actor started working: {driver.communicate()[1][-2000:]}")


def test_a_driver_connected_through_ray_client_builds_the_same_library(tmp_path, ray_cluster, random_model,
                                                                       run_cli, shapes_folder):
    local, clustered = tmp_path / "local", tmp_path / "clustered"
    run_cli("index", str(shapes_folder), "--library", str(local), "--batch-size", "4", *TORCH, model=random_model)
    run_cli("index", str(shapes_folder), "--library", str(clustered), "--batch-size", "4", *TORCH,
            "--ray", ray_cluster.client_address, model=random_model, timeout=600)
    expected_rows, expected_vectors, _ = library_rows(local)
    rows, vectors, _ = library_rows(clustered)
    assert rows == expected_rows and len(rows) == 18
    np.testing.assert_allclose(vectors, expected_vectors, atol=FP16_TOLERANCE)


def test_without_ray_installed_the_option_says_how_to_get_it(tmp_path, run_cli, shapes_folder, random_model):
    hide = tmp_path / "no-ray"
    (hide / "ray").mkdir(parents=True)
    (hide / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    pythonpath = os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])
    result = run_cli("index", str(shapes_folder), "--ray", "auto", model=random_model, check=False,
                     env={"PYTHONPATH": pythonpath})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: Indexing on Ray needs the ray extra: pip install 'clipsearch[ray]'.")
    assert "Traceback" not in result.stderr


def test_an_address_where_no_cluster_answers_is_one_sentence(run_cli, shapes_folder, random_model, library_dir):
    started = time.monotonic()
    result = run_cli("index", str(shapes_folder), "--ray", f"127.0.0.1:{_free_port()}", model=random_model,
                     check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "No Ray cluster answers at '127.0.0.1:" in result.stderr
    assert time.monotonic() - started < 60  # Ray's own retries would take minutes
    assert Library.open(library_dir).store.count_images() == 0  # refused before anything was written


def test_the_cluster_plan_uses_every_gpu_or_else_every_node() -> None:
    gpus = plan_cluster({"CPU": 32.0, "GPU": 4.0}, [16, 16], device=None)
    assert gpus == ClusterPlan(actors=4, cpus_per_actor=8, gpus_per_actor=1, device="cuda", decode_workers=7)
    cpus = plan_cluster({"CPU": 12.0}, [8, 4], device=None)
    assert cpus == ClusterPlan(actors=2, cpus_per_actor=4, gpus_per_actor=0, device="cpu", decode_workers=4)
    forced = plan_cluster({"CPU": 32.0, "GPU": 4.0}, [16, 16], device="cpu")
    assert forced.device == "cpu" and forced.actors == 2


def test_a_batch_lost_on_the_cluster_is_recorded_with_its_reason() -> None:
    from clipsearch.indexer.crawl import FoundFile
    from clipsearch.indexer.distributed import _lost_batch

    batch = _lost_batch([FoundFile("/photos/a.jpg", 10, 20)])
    assert [(item.path, item.record, item.reason) for item in batch.items] == [("/photos/a.jpg", None, LOST_REASON)]
