"""The cluster sandbox (pyebpflb.testing.cluster): an external client, a router and
nodes with their own pods, wired as a flat cluster network, with no load balancer
yet: the ground the north-south paths are tested on."""

from __future__ import annotations

import os
import subprocess
import sys

import namespaces
import pytest

from pyebpflb.testing.cluster import Cluster
from pyebpflb.testing.sandbox import BACKEND_PORT, http_get

pytestmark = pytest.mark.kernel  # network namespaces: root


def test_the_client_and_every_pod_reach_every_pod_and_it_all_goes_away() -> None:
    with Cluster(nodes=2, pods=2) as cluster:
        assert [p.name for p in cluster.pods] == [
            "node-1-pod-1",
            "node-1-pod-2",
            "node-2-pod-1",
            "node-2-pod-2",
        ]
        for family in (4, 6):
            for pod in cluster.pods:
                assert cluster.http_get(pod.address(family), BACKEND_PORT) == pod.name
        # Pod to pod across nodes, and a node to a pod of the other node.
        first, last = cluster.nodes[0].pods[0], cluster.nodes[1].pods[-1]
        assert http_get(first, last.ipv4, BACKEND_PORT) == last.name
        assert http_get(first, last.ipv6, BACKEND_PORT) == last.name
        ping = subprocess.run(
            ["ip", "netns", "exec", cluster.nodes[1].netns, sys.executable, "-c",
             f"import socket; socket.create_connection(('{first.ipv4}', {BACKEND_PORT}), 2)"],
            capture_output=True,
            text=True,
        )  # fmt: skip
        assert ping.returncode == 0, ping.stderr
        made = cluster.namespaces
        assert len(made) == 2 + 2 * (1 + 2)  # client, router, and each node with its pods
    left = [ns for ns in namespaces.netns.listnetns() if ns in made]
    assert not left
    assert str(os.getpid()) in made[0]


def test_bad_sizes_are_refused_before_anything_is_made() -> None:
    with pytest.raises(ValueError, match="nodes must be an integer from 1 to 8, got 9"):
        Cluster(nodes=9)
    with pytest.raises(ValueError, match="pods must be an integer from 1 to 14, got 0"):
        Cluster(pods=0)
