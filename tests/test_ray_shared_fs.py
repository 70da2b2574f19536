"""A Ray cluster on loopback with one node that does not mount the run's folders: the node is a
real `ray start` worker in its own mount namespace, where an empty tmpfs hides the folder that
holds the data and out_dir (as on a node without the shared file system). The job stops before
its first step with one line naming the rank and the folder it cannot see."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import ray

from longtrain.data.prepare import prepare
from tests.test_ray import _cfg


def _can_hide_folders() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not _can_hide_folders(),
                                reason="needs `unshare -m` (root, or user namespaces) to hide a folder from one node")


def _alive_nodes() -> int:
    return sum(n["Alive"] for n in ray.nodes())


@pytest.fixture
def cluster_with_a_blind_node(tmp_path):
    """(the folder the blind node cannot see, the cluster): a head without CPUs, a node of 2 CPUs
    that sees everything and one of 2 CPUs that sees an empty `tmp_path`."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=2)
    blind = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{tmp_path}" && exec ray start --address={c.address} '
         "--num-cpus=2 --block"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ray.init(address=c.address)
        deadline = time.monotonic() + 60
        while _alive_nodes() < 3:
            assert blind.poll() is None and time.monotonic() < deadline, "the blind node did not join"
            time.sleep(0.5)
        yield tmp_path, c
    finally:
        ray.shutdown()
        os.killpg(blind.pid, signal.SIGTERM)
        try:
            blind.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(blind.pid, signal.SIGKILL)
        c.shutdown()


def test_a_node_without_the_shared_folders_stops_the_job_before_training(cluster_with_a_blind_node):
    from longtrain.launch.ray_launcher import launch

    root, _ = cluster_with_a_blind_node
    data = root / "data"
    prepare(["stdlib"], str(data), limit_bytes=150_000)
    cfg = _cfg(str(data), root / "run", 4, {"dp": 2, "cp_ring": 2})  # PACK: two ranks on each worker node
    with pytest.raises(RuntimeError) as e:
        launch(cfg, placement_wait_s=30)
    msg = str(e.value)
    assert len(msg.strip().splitlines()) == 1, msg
    assert "on node " in msg and ("cannot see out_dir" in msg or "cannot see the data" in msg), msg
    assert "every node mounts at the same path" in msg and str(root) in msg, msg
    assert not (root / "run" / "metrics.jsonl").exists()  # stopped before the first step
