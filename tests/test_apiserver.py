"""The stand-in API server (pyebpflb.testing.apiserver) speaks what the official
`kubernetes` client expects: its typed lists and its own Watch helper work on it."""

from __future__ import annotations

import http.client
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from pyebpflb.testing.apiserver import ApiServer


@pytest.fixture
def api() -> Iterator[ApiServer]:
    with ApiServer(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
def core(api: ApiServer, tmp_path: pathlib.Path) -> Iterator[client.CoreV1Api]:
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=api.kubeconfig(tmp_path / "kubeconfig"), client_configuration=configuration
    )
    with client.ApiClient(configuration) as made:
        yield client.CoreV1Api(made)


def svc(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "labels": labels or {}},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
    }


def test_lists_are_paged_from_one_snapshot_and_typed_by_the_client(
    api: ApiServer, core: client.CoreV1Api
) -> None:
    api.apply(*(svc(f"s{i}") for i in range(5)))
    first = core.list_service_for_all_namespaces(limit=2)
    assert [s.metadata.name for s in first.items] == ["s0", "s1"]
    assert first.metadata.remaining_item_count == 3
    api.apply(svc("s9"))  # after the first page: not in this list
    rest = core.list_namespaced_service("shop", limit=10, _continue=first.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["s2", "s3", "s4"]
    assert rest.metadata.resource_version == first.metadata.resource_version
    assert core.read_namespaced_service("s9", "shop").spec.cluster_ip == "10.96.0.10"
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_service("nope", "shop")
    assert missing.value.status == 404


def test_the_clients_watch_gets_events_bookmarks_and_410(
    api: ApiServer, core: client.CoreV1Api
) -> None:
    version = api.apply(svc("a", {"app": "web"}))
    api.apply(svc("b"))
    api.apply(svc("a", {"app": "other"}))  # stops matching the selector: DELETED
    stream = watch.Watch().stream(
        core.list_service_for_all_namespaces,
        resource_version=str(version),
        label_selector="app=web",
        allow_watch_bookmarks=True,
        timeout_seconds=1,
    )
    seen = [(e["type"], e["raw_object"]["metadata"].get("name")) for e in stream]
    assert seen[0] == ("DELETED", "a") and ("BOOKMARK", None) in seen
    api.compact()
    with pytest.raises(ApiException) as gone:
        list(
            watch.Watch().stream(
                core.list_service_for_all_namespaces,
                resource_version=str(version),
                timeout_seconds=1,
            )
        )
    assert gone.value.status == 410


def test_requests_without_the_token_are_refused_and_watches_are_chunked(
    api: ApiServer,
) -> None:
    host, port = api.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    connection.request("GET", "/api/v1/services")
    refused = connection.getresponse()
    assert refused.status == 401 and json.loads(refused.read())["reason"] == "Unauthorized"
    connection.request(
        "GET",
        "/api/v1/services?watch=1&timeoutSeconds=1",
        headers={"Authorization": f"Bearer {api.token}"},
    )
    streamed = connection.getresponse()
    assert streamed.getheader("Transfer-Encoding") == "chunked"
    assert streamed.read() == b""  # nothing happened; the stream ended after 1 s


def test_the_api_server_address_given_wins_over_the_kubeconfigs(
    api: ApiServer, tmp_path: pathlib.Path
) -> None:
    """`agent --api-server` (Cilium's k8sServiceHost): the kubeconfig's credentials, this
    address. A kubeconfig pointing nowhere then still reaches the server."""
    from pyebpflb.k8s.watch import api_client

    path = api.kubeconfig(tmp_path / "kubeconfig")
    text = pathlib.Path(path).read_text().replace(api.url, "http://127.0.0.1:9")
    pathlib.Path(path).write_text(text)
    with api_client(path, api_server=api.url) as made:
        assert client.CoreV1Api(made).list_node().items == []
    with pytest.raises(ValueError, match=r"api_server must be a URL like https://10\.0\.0\.1:6443"):
        api_client(path, api_server="10.0.0.1:6443")
