"""Fixtures shared by the suite.

Tests marked ``kernel`` load BPF programs into the real kernel and need root;
without it they are skipped, with the reason printed. The others (the model,
policy semantics and compiler, the planner, Kubernetes translation, Maglev,
the alias tables) are pure and pass as any user: ``pytest -m "not kernel"``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Iterator

import namespaces
import pytest
from pyroute2 import netns as pyroute2_netns

from pyebpflb import objects
from pyebpflb._bpf import MapType, Object, ProgramType, features
from pyebpflb.errors import NotSupported

PIN_ROOT = pathlib.Path("/sys/fs/bpf/pyebpflb-test")
DEFAULT_PIN_ROOT = pathlib.Path("/sys/fs/bpf/pyebpflb")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        reason = "needs root (CAP_BPF, CAP_NET_ADMIN) to load BPF programs: run `make test` as root"
        for item in items:
            if item.get_closest_marker("kernel") is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """After the whole suite: no namespace, pin or datapath of this run remains."""
    yield
    if os.geteuid() != 0:
        return
    pid = str(os.getpid())
    left = [
        name
        for name in pyroute2_netns.listnetns()
        if name.startswith("pyebpflb") and (pid in name or name.startswith("pyebpflb-demo-"))
    ]
    pins = sorted(str(p) for p in PIN_ROOT.rglob("*")) if PIN_ROOT.exists() else []
    demo_pins = sorted(
        str(p) for p in DEFAULT_PIN_ROOT.glob("*") if p.name.startswith(("demo-", "bench"))
    )
    locks = sorted(str(p) for p in pathlib.Path("/run/pyebpflb").glob(f"t{pid}-*.lock"))
    assert not left, f"network namespaces left behind: {left}"
    assert not pins, f"pins left behind: {pins}"
    assert not locks, f"writer lock files left behind: {locks}"
    assert not demo_pins, f"demo datapaths left behind: {demo_pins}"


def require(feature: ProgramType | MapType) -> None:
    """Skip (with the reason) where the kernel lacks ``feature``."""
    try:
        if isinstance(feature, ProgramType):
            features.require_program_type(feature)
        else:
            features.require_map_type(feature)
    except NotSupported as exc:
        pytest.skip(str(exc))


@pytest.fixture
def counter() -> Iterator[Object]:
    """The shipped counter object, loaded (it needs XDP, cgroup_skb and ring buffers)."""
    for feature in (ProgramType.XDP, ProgramType.CGROUP_SKB, MapType.RINGBUF):
        require(feature)
    with objects.open_object("counter").load() as obj:
        yield obj


@pytest.fixture
def veth() -> Iterator[namespaces.VethPair]:
    with namespaces.veth_pair() as pair:
        yield pair


@pytest.fixture
def pin_dir(request: pytest.FixtureRequest) -> Iterator[pathlib.Path]:
    """An empty folder on the bpffs, removed with everything pinned in it."""
    from pyebpflb._bpf import fs

    fs.ensure_bpffs()
    path = PIN_ROOT / f"{os.getpid()}-{request.node.name}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        if path.exists():  # a Datapath using it as pin_root removes it when empty
            shutil.rmtree(path)
        if PIN_ROOT.exists() and not any(PIN_ROOT.iterdir()):
            PIN_ROOT.rmdir()
