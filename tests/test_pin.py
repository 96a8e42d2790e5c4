"""Pinning maps and reusing them from another process."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from pyebpflb import objects
from pyebpflb._bpf import Map

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

SECOND_PROCESS = textwrap.dedent(
    """
    import json, sys
    from pyebpflb import objects
    with objects.open_object("counter", pin_dir=sys.argv[1]).load() as obj:
        counters = obj.map("iface_counters")
        seen = [v.packets for v in counters[{"ifindex": 1, "hook": 1}]]
        counters[{"ifindex": 2, "hook": 2}] = {"packets": 42, "bytes": 4200}
        print(json.dumps({"map_id": counters.id, "seen": seen}))
    """
)


def test_second_process_reuses_the_pinned_maps(pin_dir: pathlib.Path) -> None:
    with objects.open_object("counter", pin_dir=pin_dir).load() as obj:
        counters = obj.map("iface_counters")
        assert sorted(p.name for p in pin_dir.iterdir()) == [
            "counter_config",
            "counter_events",
            "iface_counters",
        ]
        counters[{"ifindex": 1, "hook": 1}] = {"packets": 7, "bytes": 700}
        out = subprocess.run(
            [sys.executable, "-c", SECOND_PROCESS, str(pin_dir)],
            capture_output=True,
            text=True,
            check=True,
        )
        other = json.loads(out.stdout)
        assert other["map_id"] == counters.id
        assert set(other["seen"]) == {7}
        written = counters[{"ifindex": 2, "hook": 2}]
        assert {v.packets for v in written} == {42}


def test_pinned_map_outlives_its_object_and_opens_by_path(pin_dir: pathlib.Path) -> None:
    with objects.open_object("counter", pin_dir=pin_dir).load() as obj:
        obj.map("counter_config")[0] = {"emit_events": 1}
        map_id = obj.map("counter_config").id
    with Map.from_pinned(
        pin_dir / "counter_config", key_type="__u32", value_type="struct pyebpflb_counter_config"
    ) as config:
        assert config.id == map_id
        assert config[0].emit_events == 1


def test_explicit_pin_of_a_created_map(pin_dir: pathlib.Path) -> None:
    from pyebpflb._bpf import MapType

    with Map.create(
        MapType.ARRAY,
        key_size=4,
        value_size=4,
        max_entries=1,
        name="explicit",
        key_type="__u32",
        value_type="__u32",
    ) as created:
        created[0] = 99
        created.pin(pin_dir / "explicit")
    with Map.from_pinned(pin_dir / "explicit", key_type="__u32", value_type="__u32") as again:
        assert again[0] == 99
        assert again.name == "explicit"


def test_reuse_map_before_load_shares_state(pin_dir: pathlib.Path) -> None:
    with objects.open_object("counter").load() as first, objects.open_object("counter") as second:
        second.reuse_map("counter_config", first.map("counter_config"))
        with second.load() as loaded:
            first.map("counter_config")[0] = {"emit_events": 5}
            assert loaded.map("counter_config")[0].emit_events == 5


def test_opening_a_missing_pin_names_the_path(pin_dir: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        Map.from_pinned(pin_dir / "nothing-here")


def test_unpin_maps_removes_the_pins_and_the_folder(pin_dir: pathlib.Path) -> None:
    folder = pin_dir / "datapath"
    with objects.open_object("counter", pin_dir=folder).load() as obj:
        assert len(list(folder.iterdir())) == 3
        obj.unpin_maps()
        assert not folder.exists()
        obj.map("counter_config")[0] = {"emit_events": 1}  # the maps live on while open


def test_unpin_refuses_a_pin_that_holds_another_map(pin_dir: pathlib.Path) -> None:
    from pyebpflb._bpf import MapType

    def small() -> Map:
        return Map.create(MapType.ARRAY, key_size=4, value_size=4, max_entries=1)

    with small() as first, small() as second:
        first.pin(pin_dir / "first")
        with pytest.raises(ValueError, match=r"holds object id \d+, not map"):
            second.unpin(pin_dir / "first")
        assert (pin_dir / "first").exists()
        first.unpin(pin_dir / "first")
        assert not (pin_dir / "first").exists()


def test_program_pin_keeps_the_program_after_its_object_closes(pin_dir: pathlib.Path) -> None:
    with objects.open_object("counter").load() as obj:
        prog = obj.program("count_xdp")
        prog_id = prog.id
        prog.pin(pin_dir / "prog")
    shown = subprocess.run(
        ["bpftool", "prog", "show", "pinned", str(pin_dir / "prog")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.startswith(f"{prog_id}: xdp")
    (pin_dir / "prog").unlink()


BPFFS_IN_NETNS = textwrap.dedent(
    """
    from pyebpflb._bpf import fs
    before = fs.fs_type("/sys/fs/bpf")
    fs.ensure_bpffs()
    print(before, fs.fs_type("/sys/fs/bpf"))
    """
)


def test_ensure_bpffs_mounts_one_under_ip_netns_exec() -> None:
    import namespaces

    name = namespaces.new_name("fs")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # `ip netns exec` gives the command a fresh /sys without a bpffs.
        out = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", BPFFS_IN_NETNS],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert out == ["sysfs", "bpf"]


def test_an_incompatible_pinned_map_fails_the_load_and_is_kept(pin_dir: pathlib.Path) -> None:
    from pyebpflb import LoadError, VerifierError

    with objects.open_object("counter", pin_dir=pin_dir) as opened:
        opened.set_max_entries("iface_counters", 10)
        first = opened.load()
        with (
            first,
            objects.open_object("counter", pin_dir=pin_dir) as second,
            pytest.raises(LoadError) as info,
        ):
            second.load()
        assert not isinstance(info.value, VerifierError)
        assert "iface_counters" in info.value.log
        with Map.from_pinned(pin_dir / "iface_counters") as kept:
            assert kept.max_entries == 10


def test_a_change_to_a_datapath_pinned_off_bpffs_is_refused_before_it_is_made(
    tmp_path: pathlib.Path,
) -> None:
    """A new datapath pins its maps at its first change: when the pin root is no bpffs,
    that change is refused whole (it used to be made, and then raise)."""
    import pyebpflb as lb

    with lb.Datapath(f"t{os.getpid()}-offfs", pin_root=tmp_path) as dp:
        with pytest.raises(ValueError, match=f"pin path '{tmp_path}' is not on a bpffs"):
            dp.upsert(lb.Service("10.96.0.1", 80, name="shop/web"))
        assert dp.services == []
