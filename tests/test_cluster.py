"""diffusiond on a real Ray cluster (`make test-cluster`): a local multi-node cluster on the loopback address.

`ray.cluster_utils.Cluster` starts a head and nodes as real Ray processes (a GCS, a raylet per
node, worker processes), each node with one logical GPU; fast health checks make a lost node
dead in about 2 s. The slots are real detached actors running the daemon loop; a node is lost
by killing its raylet and workers (remove_node), or frozen with SIGSTOP and thawed.

The slots run the stand-in generator (`StandInFactory`) except in the real-diffusers test: the
subject here is who owns which file, and four torch processes do not fit on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from diffusiond.pipeline.standin import StandInFactory
from diffusiond.pipeline.testmodel import TestModelPaths
from tests.conftest import CEILING_S, REPO, Spool, figure, wait_for, write_config
from tests.spool_checks import check_spool

# Before Ray is imported (it reads it once): else Ray replaces 127.0.0.1 by the host's address
# (ray/_private/services.py, get_node_ip_address). The nodes and slots inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="the cluster extra (pip install 'diffusiond[cluster]')")
from ray.cluster_utils import Cluster  # noqa: E402

from diffusiond.daemon import cluster  # noqa: E402

pytestmark = pytest.mark.cluster

FAST_HEALTH = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 4,
}
"""A node that stops answering is dead after about 2 s (Ray's defaults: about 30 s)."""


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A head (no GPU) and two nodes with one GPU each, all on 127.0.0.1, and this process as a driver."""
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "_system_config": FAST_HEALTH})
    try:
        for _ in range(2):
            head.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=head.address, namespace=cluster.NAMESPACE, log_to_driver=False)
        head.wait_for_nodes()
        yield head
    finally:
        ray.shutdown()
        head.shutdown()


def spool_config(spool: Spool, test_models: TestModelPaths, tmp_path: Path, **overrides: Any) -> Path:
    settings: dict[str, Any] = {"cluster": {"state_dir": str(tmp_path / "node-state")}, "prefetch": 1} | overrides
    return write_config(spool.root, test_models, **settings)


def drop_jobs(spool: Spool, count: int, prefix: str = "job") -> dict[str, bytes]:
    dropped = {f"{prefix}{n:02d}.yaml": f"prompt: job {n}\nseed: {n}\n".encode() for n in range(count)}
    for name, data in dropped.items():
        spool.drop(name, data)
    return dropped


def answers(driver: cluster.Driver) -> dict[str, dict[str, Any]]:
    return {v.name: v.answer for v in driver.views() if v.answer is not None}


def node_of(head: Cluster, node_id: str) -> Any:
    [node] = [n for n in head.list_all_nodes() if n.node_id == node_id]
    return node


def holder(spool: Spool) -> str | None:
    for folder in sorted((spool.root / "work").glob("*/*/claim.json")):
        if "held" in folder.read_text():
            return folder.parent.parent.name
    return None


def node_processes(node: Any) -> list[Any]:
    """A node's raylet and everything it started (its workers: the slot's actor among them)."""
    import psutil

    [raylet] = node.all_processes["raylet"]
    root = psutil.Process(raylet.process.pid)
    return [root, *root.children(recursive=True)]


def settled(spool: Spool, jobs: int) -> bool:
    return len(spool.manifests()) >= jobs and not any((spool.root / "work").glob("*/*/claim.json"))


def test_24_jobs_and_a_node_killed_mid_job_each_published_once(
    ray_cluster: Cluster, spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    """Two slots share 24 jobs; the node running the held one is killed. Its slot comes back on a
    node that joins (Ray restarts it there), fences its work folder and resumes: 24 manifests,
    24 archived inputs, no duplicate, nothing left in work/."""
    gate = tmp_path / "gate"
    gate.mkdir()
    config = spool_config(spool, test_models, tmp_path, lease_timeout_s=600)  # the restart, not the lease
    driver = cluster.Driver(config, generator_factory=StandInFactory(0.05, "held", str(gate)))
    assert driver.reconcile() == ["gpu-00", "gpu-01"]
    dropped = drop_jobs(spool, 23)
    dropped["held.yaml"] = b"prompt: held\nseed: 99\n"
    spool.drop("held.yaml", dropped["held.yaml"])
    wait_for(lambda: list(gate.glob("held-*")), what="the held job")
    lost = holder(spool)
    assert lost in ("gpu-00", "gpu-01")
    before = answers(driver)[lost]
    ray_cluster.remove_node(node_of(ray_cluster, before["node_id"]), allow_graceful=False)
    (gate / "release").touch()
    ray_cluster.add_node(num_cpus=1, num_gpus=1)  # a node joins: the lost slot comes back there
    wait_for(lambda: settled(spool, 24), what="24 jobs published")
    again = wait_for(lambda: answers(driver).get(lost), what=f"{lost} answering again")
    assert again["restarted"] and again["node_id"] != before["node_id"], again
    manifests = check_spool(spool, dropped, jobs=24)
    [held] = [m for m in manifests if m["source"] == "held.yaml"]
    assert (held["instance"], held["attempt"]) == (lost, 2), "resumed by the restarted slot"
    by_slot = Counter(m["instance"] for m in manifests)
    figure(f"ray: 24 jobs, node of {lost} killed mid-job, slot back on a new node: 24 once ({dict(by_slot)})")


def test_a_frozen_node_past_its_death_thawed_publishes_nothing_twice(
    ray_cluster: Cluster, spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    """The node running the held job is frozen (SIGSTOP: raylet and workers) until Ray declares it dead
    and restarts its slot on a spare node; thawed, the old slot process finds another owner and
    publishes nothing: every job once."""
    gate = tmp_path / "gate"
    gate.mkdir()
    config = spool_config(spool, test_models, tmp_path, lease_timeout_s=600)
    driver = cluster.Driver(config, generator_factory=StandInFactory(0.05, "held", str(gate)))
    driver.reconcile()
    dropped = drop_jobs(spool, 11)
    dropped["held.yaml"] = b"prompt: held\nseed: 7\n"
    spool.drop("held.yaml", dropped["held.yaml"])
    wait_for(lambda: list(gate.glob("held-*")), what="the held job")
    lost = holder(spool)
    assert lost is not None
    before = answers(driver)[lost]
    ray_cluster.add_node(num_cpus=1, num_gpus=1)  # the spare the slot is restarted on
    frozen = node_processes(node_of(ray_cluster, before["node_id"]))
    for process in frozen:
        process.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        moved = wait_for(
            lambda: (a := answers(driver).get(lost)) and a["node_id"] != before["node_id"] and a,
            what=f"{lost} restarted on the spare node",
        )
        assert moved["restarted"]
        restarted_s = time.monotonic() - frozen_at
        (gate / "release").touch()  # the held job goes on: in the new slot now, in the zombie once thawed
        wait_for(lambda: settled(spool, 12), what="12 jobs published")
        published_s = time.monotonic() - frozen_at
    finally:
        for process in frozen:
            with contextlib.suppress(Exception):  # gone already
                process.send_signal(signal.SIGCONT)
    logs = Path(ray_cluster.head_node.get_session_dir_path()) / "logs"
    wait_for(lambda: _ended(before["pid"], logs), what="the thawed slot process gone or stepped down")
    manifests = check_spool(spool, dropped, jobs=12)
    assert Counter(m["job_id"] for m in manifests).most_common(1)[0][1] == 1
    figure(
        f"ray: a node frozen past its death and thawed: 12 jobs, each published once (slot answering on the "
        f"spare node {restarted_s:.0f} s after the freeze, all published at {published_s:.0f} s)"
    )


def _ended(pid: int, logs: Path) -> bool:
    """The old slot process is gone (its raylet, thawed, learnt it was declared dead) or it stepped down."""
    import psutil

    for log in logs.glob(f"worker-*-{pid}.err"):
        if "stepped down" in log.read_text(errors="replace"):
            return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_drain_puts_the_queued_claims_back_and_removes_the_slot(
    ray_cluster: Cluster, spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    config = spool_config(spool, test_models, tmp_path, lease_timeout_s=600, prefetch=3)
    driver = cluster.Driver(config, generator_factory=StandInFactory(0.05, "held", str(gate)))
    driver.reconcile()
    spool.drop("held.yaml", "prompt: held\nseed: 1\n")
    wait_for(lambda: list(gate.glob("held-*")), what="the held job")
    draining = holder(spool)
    assert draining is not None
    # ... more work queued behind it, on both slots
    dropped = drop_jobs(spool, 8)
    wait_for(
        lambda: answers(driver)[draining]["daemon"]["counters"]["claimed"] >= 3, what=f"claims queued on {draining}"
    )
    result: dict[str, Any] = {}
    drainer = threading.Thread(target=lambda: result.update(driver.drain(draining)))
    drainer.start()
    drainer.join(CEILING_S)
    assert not drainer.is_alive()
    assert result["serving"] is False and result["daemon"]["state"] == "stopped", result
    events = [json.loads(line) for line in (tmp_path / "node-state" / draining / "events.jsonl").open()]
    released = {e["source"] for e in events if e["event"] == "released"}
    assert len(released) >= 3 and "held.yaml" in released, events  # the running one and at least 2 queued
    assert draining not in driver.existing() and draining not in driver.wanted()
    assert driver.reconcile() == [], "a drained slot is not placed again"
    (gate / "release").touch()
    dropped["held.yaml"] = b"prompt: held\nseed: 1\n"
    wait_for(lambda: settled(spool, 9) and not any(spool.inbox.iterdir()), what="the other slot doing all")
    manifests = check_spool(spool, dropped, jobs=9)
    assert {m["instance"] for m in manifests if m["source"] in released} == {"gpu-00", "gpu-01"} - {draining}
    assert driver.undrain(draining) and driver.reconcile() == [draining]
    figure(f"ray: drain {draining}: {len(released)} claims back to the inbox, done by the other slot; 9 jobs once")


def cli(config: Path, address: str, *action: str) -> subprocess.CompletedProcess[str]:
    """`diffusiond cluster ... ACTION` as a real command, a second Ray driver."""
    command = [sys.executable, "-m", "diffusiond.daemon.cli", "cluster", "--config", str(config), "--address", address]
    return subprocess.run([*command, *action], capture_output=True, text=True, timeout=CEILING_S, cwd=REPO)


def test_a_node_that_joins_gets_a_slot_and_cluster_status_shows_them_all(
    ray_cluster: Cluster, spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    config = spool_config(spool, test_models, tmp_path)
    driver = cluster.Driver(config, generator_factory=StandInFactory(0.05))
    assert driver.reconcile() == ["gpu-00", "gpu-01"] and driver.reconcile() == []
    ray_cluster.add_node(num_cpus=1, num_gpus=1)
    wait_for(lambda: ray.cluster_resources().get("GPU") == 3, what="the new node's GPU")
    assert driver.reconcile() == ["gpu-02"]
    wait_for(lambda: [a["daemon"].get("state") for a in answers(driver).values()] == ["ready"] * 3, what="ready")
    assert len({a["node_id"] for a in answers(driver).values()}) == 3, "one slot per node's GPU"
    spool.inbox.mkdir(exist_ok=True)
    (spool.inbox / ".part").write_text("not a job yet")  # ignored, as by every daemon
    done = cli(config, ray_cluster.address, "status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["SLOT", "HOST", "STATE", "QUEUE", "JOB"]
    assert [line.split()[0] for line in lines[1:4]] == ["gpu-00", "gpu-01", "gpu-02"]
    assert all(line.split()[2:4] == ["ready", "0"] for line in lines[1:4]), done.stdout
    assert lines[-1] == "inbox: 0 files waiting to be claimed"
    drained = cli(config, ray_cluster.address, "drain", "gpu-02")
    assert drained.returncode == 0 and drained.stdout.startswith("gpu-02 drained on "), drained
    assert driver.existing() == ["gpu-00", "gpu-01"] and driver.reconcile() == []


def test_a_slot_makes_images_with_real_diffusers(
    ray_cluster: Cluster, spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    """The slot's daemon on the real generator (torch and the tiny model loaded in the actor)."""
    config = spool_config(spool, test_models, tmp_path, cluster={"state_dir": str(tmp_path / "s"), "slots": 1})
    driver = cluster.Driver(config)
    assert driver.reconcile() == ["gpu-00"]
    dropped = {"fox.yaml": b"prompt: a fox in the snow\nseed: 5\ncount: 2\n"}
    spool.drop("fox.yaml", dropped["fox.yaml"])
    wait_for(lambda: settled(spool, 1), what="the job published and its input archived")
    [manifest] = check_spool(spool, dropped, jobs=1)
    assert (manifest["instance"], manifest["seeds"], len(manifest["outputs"])) == ("gpu-00", [5, 6], 2)
    assert manifest["model"]["pipeline"].startswith("StableDiffusion"), manifest["model"]
    with Image.open(spool.outbox / manifest["outputs"][0]["file"]) as image:
        assert image.size == (64, 64) and "a fox in the snow" in image.info["parameters"]


def test_the_driver_command_stops_cleanly_on_sigterm(
    ray_cluster: Cluster, spool: Spool, test_models: TestModelPaths, tmp_path: Path
) -> None:
    """`diffusiond cluster` as systemd runs it: SIGTERM ends it with status 0 (ray.init's own handler
    exited 15, a failed unit). No slot: a resource no node has."""
    config = spool_config(spool, test_models, tmp_path, cluster={"state_dir": str(tmp_path / "s"), "resource": "none"})
    command = [sys.executable, "-m", "diffusiond.daemon.cli", "cluster", "--config", str(config)]
    command += ["--address", ray_cluster.address, "--log-level", "INFO"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        assert driver.stdout is not None
        said = ""
        while "driver: keeping the slots" not in said:
            line = driver.stdout.readline()
            assert line, f"the driver exited: {said}"
            said += line
        driver.send_signal(signal.SIGTERM)
        rest, _ = driver.communicate(timeout=CEILING_S)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, said + rest
    assert "driver stopped; the slots run on" in rest
