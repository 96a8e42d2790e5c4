"""Programming policies through the Datapath API: read-back, all or nothing,
bad input that changes nothing, adoption by another Datapath."""

from __future__ import annotations

import os
from typing import Any

import attrs
import pytest
from lbtest import TC_ACT_OK, TC_ACT_SHOT, datapath, run
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

import pyebpflb as lb
from pyebpflb.model import Policy, Rule

pytestmark = pytest.mark.kernel  # loads BPF programs: root and a real kernel

WEB = lb.Service("10.96.0.10", 80, name="web", backends=[lb.Backend("10.0.1.1", 8080)])
SOURCE_RANGES = Policy(
    "web-sources",
    [Rule("allow", "10.1.0.0/16", service="web"), Rule("deny", "10.1.9.0/24", service="web")],
    default="deny",
)


def syn(src: str, dst: str = "10.96.0.10", dport: int = 80) -> Any:
    return Ether() / IP(src=src, dst=dst) / TCP(sport=40000, dport=dport, flags="S")


def policy_maps(dp: lb.Datapath) -> dict[str, int]:
    return {
        name: len(list(dp._object.map(name)))
        for name in ("lb_policy", "lb_pol_cidrs", "lb_pol_ports", "lb_pol_rules", "lb_pol_names")
    }


def test_policies_read_back_and_are_enforced() -> None:
    egress = Policy("out", [Rule("deny", "fd00::/8", "udp", (1, 1023))], direction="egress")
    with datapath("pol-readback") as dp:
        dp.sync([WEB], [SOURCE_RANGES, egress])
        assert dp.policies == [SOURCE_RANGES, egress]
        assert run(dp, "lb_ingress", syn("10.1.2.3"))[0] == TC_ACT_OK
        assert run(dp, "lb_ingress", syn("10.1.9.3"))[0] == TC_ACT_SHOT
        assert run(dp, "lb_ingress", syn("10.2.0.1"))[0] == TC_ACT_SHOT
        # sync without policies= keeps them.
        dp.sync([WEB])
        assert dp.policies == [SOURCE_RANGES, egress]
        assert dp.remove_policy("out") is True
        assert dp.remove_policy(egress) is False
        assert dp.policies == [SOURCE_RANGES]
        dp.sync([WEB], [])
        assert dp.policies == []
        assert policy_maps(dp) == dict.fromkeys(policy_maps(dp), 0)
        assert run(dp, "lb_ingress", syn("10.2.0.1"))[0] == TC_ACT_OK


def test_one_generation_remains_after_changes() -> None:
    with datapath("pol-gens") as dp:
        dp.sync([WEB], [SOURCE_RANGES])
        first = policy_maps(dp)
        changed = Policy("web-sources", [*SOURCE_RANGES.rules, Rule("allow", "10.3.0.0/16")])
        dp.upsert_policy(changed)
        dp.upsert_policy(SOURCE_RANGES)
        assert policy_maps(dp) == first


def test_a_policy_naming_an_unknown_service_writes_nothing() -> None:
    with datapath("pol-unknown") as dp:
        dp.sync([WEB])
        before = policy_maps(dp)
        typo = Policy("p", [Rule("allow", "10.0.0.0/8", service="wbe")])
        with pytest.raises(ValueError) as error:
            dp.sync([WEB], [typo])
        assert "names service 'wbe', which is not installed" in str(error.value)
        assert "'web'" in str(error.value)
        with pytest.raises(ValueError, match="'wbe'"):
            dp.upsert_policy(typo)
        assert policy_maps(dp) == before
        assert dp.policies == []


def test_a_service_a_policy_names_cannot_go_alone() -> None:
    with datapath("pol-keep-svc") as dp:
        dp.sync([WEB], [SOURCE_RANGES])
        with pytest.raises(ValueError, match="names service 'web'"):
            dp.remove(WEB)
        with pytest.raises(ValueError, match="names service 'web'"):
            dp.sync([])
        assert dp.services == [WEB]
        # Together they can: the service and the policy naming it, in one change.
        dp.sync([], [])
        assert (dp.services, dp.policies) == ([], [])


def test_service_rules_follow_the_service_name() -> None:
    with datapath("pol-rename") as dp:
        other = lb.Service("10.96.0.11", 80, name="api", backends=[lb.Backend("10.0.1.2", 8080)])
        dp.sync([WEB, other], [SOURCE_RANGES])
        assert run(dp, "lb_ingress", syn("10.2.0.1", "10.96.0.11"))[0] == TC_ACT_SHOT
        # "api" becomes "web" too: the rules naming web now cover it.
        dp.upsert(lb.Service("10.96.0.11", 80, name="web", backends=other.backends), replace=True)
        dp.flush_conntrack()
        assert run(dp, "lb_ingress", syn("10.1.2.3", "10.96.0.11"))[0] == TC_ACT_OK


def test_backend_changes_leave_the_policies_alone() -> None:
    with datapath("pol-backends") as dp:
        dp.sync([WEB], [SOURCE_RANGES])
        head = dp._object.map("lb_policy")
        before = int(head[0].gen)
        dp.upsert(WEB.with_backends([lb.Backend("10.0.1.9", 8080)]))
        assert int(head[0].gen) == before  # not compiled again
        # A second service of the name is covered at once (compiled again).
        dp.upsert(lb.Service("10.96.0.12", 80, name="web", backends=WEB.backends))
        assert int(head[0].gen) != before
        assert run(dp, "lb_ingress", syn("10.2.0.1", "10.96.0.12"))[0] == TC_ACT_SHOT
        assert run(dp, "lb_ingress", syn("10.1.2.3", "10.96.0.12"))[0] == TC_ACT_OK


def test_full_maps_change_nothing() -> None:
    with datapath("pol-full", max_policy_entries=64) as dp:
        dp.sync([WEB], [SOURCE_RANGES])
        before = policy_maps(dp)
        many = Policy("many", [Rule("allow", f"10.{i}.0.0/16", "tcp", 8080) for i in range(100)])
        with pytest.raises(lb.MapFull) as error:
            dp.sync([WEB], [SOURCE_RANGES, many])
        assert "max_policy_entries" in str(error.value)
        assert "nothing was changed" in str(error.value)
        assert policy_maps(dp) == before
        assert dp.policies == [SOURCE_RANGES]
        assert run(dp, "lb_ingress", syn("10.2.0.1"))[0] == TC_ACT_SHOT
        assert run(dp, "lb_ingress", syn("10.1.2.3"))[0] == TC_ACT_OK


def test_a_patch_that_does_not_fit_changes_nothing_and_the_next_one_works() -> None:
    """A change of policies with subjects only patches the active generation in place;
    when its new rule set does not fit, the patch is undone (the endpoints keep the rule
    sets they had) and a later patch still works from the same state."""
    pod = Policy(
        "ns/web", [Rule("allow", "10.1.0.0/16", origin="ingress rule 0")], "deny",
        subjects=["10.0.1.1"],
    )  # fmt: skip
    other = Policy("ns/db", [], "deny", subjects=["10.0.1.2"])
    with datapath("pol-patch-full", max_policy_entries=32) as dp:
        dp.sync([WEB], [pod, other])
        gen = dp._state.policy.gen
        before = policy_maps(dp)
        big = attrs.evolve(
            pod, rules=[Rule("allow", f"10.{i}.0.0/16", "tcp", 8080 + i) for i in range(40)]
        )
        with pytest.raises(lb.MapFull, match="nothing was changed"):
            dp.set_policies([big, other])
        assert policy_maps(dp) == before and dp.policies == [pod, other]
        assert run(dp, "lb_ingress", syn("10.1.2.3", "10.0.1.1"))[0] == TC_ACT_OK
        assert run(dp, "lb_ingress", syn("10.2.0.1", "10.0.1.1"))[0] == TC_ACT_SHOT
        # The db pod joins web's policy: patched (the same generation), in force.
        moved = attrs.evolve(pod, subjects=["10.0.1.1", "10.0.1.2"])
        dp.set_policies([moved, attrs.evolve(other, subjects=["10.0.1.3"])])
        assert dp._state.policy.gen == gen
        dp.flush_conntrack()
        assert run(dp, "lb_ingress", syn("10.1.2.3", "10.0.1.2"))[0] == TC_ACT_OK
        assert run(dp, "lb_ingress", syn("10.2.0.1", "10.0.1.2"))[0] == TC_ACT_SHOT
        # Read back by another Datapath (no index): its change writes a generation.
        with lb.Datapath(dp.name, pin_root=dp.pin_root, create=False) as look:
            assert look.policies == dp.policies  # the rules' origins too
            assert look.policies[0].rules[0].origin == "ingress rule 0"
            look.set_policies([pod, other])
            assert look._state.policy.gen == 1 - gen
        assert run(dp, "lb_ingress", syn("10.2.0.1", "10.0.1.2"))[0] == TC_ACT_SHOT
        assert run(dp, "lb_ingress", syn("10.2.0.1", "10.0.1.3"))[0] == TC_ACT_OK


def test_explain_names_the_subject_and_the_policies_selecting_it() -> None:
    """Through a Service (after DNAT) the endpoint is the backend: explain says which
    subject entry holds it and which policies select it, and which rule decided."""
    web = Policy("ns/web", [Rule("allow", "10.1.0.0/16", "tcp", 8080)], "deny",
                 subjects=["10.0.1.0/24"])  # fmt: skip
    node = Policy("ns/web:node 10.0.0.1", [Rule("allow", "10.0.0.1")], "deny",
                  subjects=["10.0.1.1"])  # fmt: skip
    with datapath("pol-explain") as dp:
        dp.sync([WEB], [web, node])
        allowed = dp.explain("10.1.2.3", "10.96.0.10:80")
        assert (allowed.endpoint, allowed.subject) == ("10.0.1.1", "10.0.1.1/32")
        assert allowed.selected_by == ("ns/web", "ns/web:node 10.0.0.1")
        assert (allowed.policy, allowed.rule) == ("ns/web", 0)
        denied = dp.explain("10.9.9.9", "10.0.1.7:8080")
        assert denied.policy_default and denied.selected_by == ("ns/web",)
        assert denied.subject == "10.0.1.0/24" and denied.drop_reason == "policy denied"
        free = dp.explain("10.9.9.9", "10.0.2.7:8080")
        assert (free.endpoint, free.subject, free.selected_by) == ("10.0.2.7", None, ())


def test_contradictions_are_accepted_with_the_documented_precedence() -> None:
    both = Policy("both", [Rule("allow", "10.0.0.0/8"), Rule("deny", "10.0.0.0/8")])
    with datapath("pol-contra") as dp:
        dp.sync([WEB], [both, Policy("dup", [Rule("allow"), Rule("allow")])])
        assert run(dp, "lb_ingress", syn("10.1.2.3", "10.5.5.5"))[0] == TC_ACT_SHOT
        assert [s.packets for s in dp.policy_stats("both")] == [0, 1]
        with pytest.raises(lb.NotFound, match="policy 'nope' is not installed"):
            dp.policy_stats("nope")


def test_bad_arguments() -> None:
    with datapath("pol-bad") as dp:
        with pytest.raises(ValueError, match="expected a Policy, got 'web'"):
            dp.sync([WEB], ["web"])  # type: ignore[list-item]
        with pytest.raises(ValueError, match="two policies are named 'p'"):
            dp.sync([WEB], [Policy("p"), Policy("p", default="deny")])
        with pytest.raises(ValueError, match="remove_policy takes a Policy or a policy name"):
            dp.remove_policy(3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_policy_rules must be an integer"):
            lb.Datapath("x", max_policy_rules=0)
        assert dp.policies == []


def test_a_persisted_datapath_keeps_its_policies(pin_dir: Any) -> None:
    name = f"t{os.getpid()}-pol-persist"
    first = lb.Datapath(name, pin_root=pin_dir, persist=True)
    try:
        first.sync([WEB], [SOURCE_RANGES])
        counted = run(first, "lb_ingress", syn("10.2.0.1"))[0]
        assert counted == TC_ACT_SHOT
    finally:
        first.close()
    with lb.Datapath(name, pin_root=pin_dir) as second:
        assert second.adopted
        assert second.policies == [SOURCE_RANGES]
        assert run(second, "lb_ingress", syn("10.2.0.1"))[0] == TC_ACT_SHOT
        # A change from the adopting process replaces the generation in force.
        second.upsert_policy(Policy("web-sources", SOURCE_RANGES.rules))
        assert run(second, "lb_ingress", syn("10.2.0.1", "10.5.5.5"))[0] == TC_ACT_OK
        assert len(list(second._object.map("lb_pol_cidrs"))) == 2
        second.destroy()  # adopted: closing alone would leave it


def test_rules_for_every_endpoint_are_entries_once_and_every_endpoint_meets_them() -> None:
    """A policy for every endpoint next to 50 rule sets: its rules are entries once (a
    max_policy_entries that 50 copies would overflow holds them), and each endpoint with
    a rule set still meets them: a deny for everyone beats the pod's own allow, an allow
    for everyone opens the pod's default deny, and a tie is counted on the pod's rule."""
    pods = [
        Policy(f"ns/pod-{i}", [Rule("allow", "10.9.0.0/16", "tcp", 8080)], "deny",
               subjects=[f"10.0.1.{i}"])
        for i in range(1, 51)
    ]  # fmt: skip
    everyone = Policy(
        "blocklist",
        [Rule("deny", "10.9.9.0/24"), Rule("allow", "10.8.0.0/16"),
         Rule("allow", "10.9.0.0/16", "tcp", 8080)],
    )  # fmt: skip
    with datapath("pol-everyone", max_policy_entries=256) as dp:
        dp.sync([WEB], [*pods, everyone])
        assert policy_maps(dp)["lb_pol_cidrs"] < 128
        for pod in ("10.0.1.3", "10.0.1.50"):
            dp.flush_conntrack()
            assert run(dp, "lb_ingress", syn("10.9.1.1", pod, 8080))[0] == TC_ACT_OK
            assert run(dp, "lb_ingress", syn("10.9.9.1", pod, 8080))[0] == TC_ACT_SHOT
            assert run(dp, "lb_ingress", syn("10.8.0.1", pod, 22))[0] == TC_ACT_OK
            assert run(dp, "lb_ingress", syn("10.7.0.1", pod, 8080))[0] == TC_ACT_SHOT
        # 10.9.1.1:8080 matched the pod's rule and the blocklist's, equally specific.
        assert [t.packets for t in dp.policy_stats("ns/pod-3")] == [1]
        assert [t.packets for t in dp.policy_stats("blocklist")] == [2, 2, 0]
        # An endpoint no policy selects meets only the rules for every endpoint.
        dp.flush_conntrack()
        assert run(dp, "lb_ingress", syn("10.9.9.1", "10.0.2.1", 8080))[0] == TC_ACT_SHOT
        assert run(dp, "lb_ingress", syn("10.7.0.1", "10.0.2.1", 8080))[0] == TC_ACT_OK
