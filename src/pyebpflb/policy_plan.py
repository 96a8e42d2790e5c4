"""Planning a change of the installed policies: pure, like :mod:`pyebpflb.plan`,
whose steps it uses.

A new generation of lookup entries is written where packets do not look
(prepare), ``lb_policy`` flips to it (publish), and the old generation goes
(cleanup); undo flips back first, then removes the new one. Rule ids (and their
counters) stay with their rules, policy ids with their names.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import attrs

from pyebpflb import maps, policy
from pyebpflb.layout import POLICY_GEN_SHIFT
from pyebpflb.model import Policy, Rule
from pyebpflb.plan import Plan, Step, Steps
from pyebpflb.snapshot import PolicyState


@attrs.define
class PolicyPlan:
    """Replacing the installed policies: the steps of each phase, the state once
    in force, and the next free ids."""

    prepare: list[Step]
    publish: list[Step]
    undo: list[Step]
    cleanup: list[Step]
    state: PolicyState
    next_rule_id: int
    next_policy_id: int


class _Phases:
    def __init__(self) -> None:
        self.prepare, self.publish, self.cleanup = Steps(), Steps(), Steps()
        self.undo_head, self.undo = Steps(), Steps()  # undo_head runs first


def diff_policies(
    state: PolicyState,
    wanted: list[Policy],
    service_ids: dict[str, list[int]],
    next_rule_id: int,
    next_policy_id: int,
) -> PolicyPlan:
    """The plan that makes ``wanted`` the installed policies (already checked).

    A rule keeps its id (and its counter) while its policy keeps it, wherever
    it moves in the list; a policy keeps its id while its name stays.
    """
    phases = _Phases()
    rule_ids = itertools.count(next_rule_id)
    policy_ids = itertools.count(next_policy_id)
    installed, refs = _names_and_rules(state, wanted, phases, rule_ids, policy_ids)
    gen = 1 - state.gen if state.active else 0
    compiled, keys, subject_keys = _generation(state, wanted, refs, service_ids, gen, phases)
    _head(state, wanted, compiled, gen, phases)
    return PolicyPlan(
        prepare=phases.prepare.list(),
        publish=phases.publish.list(),
        undo=phases.undo_head.list() + phases.undo.list(),
        cleanup=phases.cleanup.list(),
        state=PolicyState(
            gen=gen,
            active=bool(wanted),
            policies=installed,
            refs=tuple(refs),
            keys=keys,
            subject_keys=subject_keys,
        ),
        next_rule_id=next(rule_ids),
        next_policy_id=next(policy_ids),
    )


def _names_and_rules(
    state: PolicyState,
    wanted: list[Policy],
    phases: _Phases,
    rule_ids: Iterator[int],
    policy_ids: Iterator[int],
) -> tuple[dict[str, tuple[int, Policy]], list[policy.RuleRef]]:
    """Ids for the wanted policies and rules, writing the names and rules that are
    new or moved; what left goes in cleanup."""
    prepare, undo = phases.prepare, phases.undo
    # The nth copy of a rule in a policy keeps the nth copy's id.
    old_ids: dict[tuple[str, Rule, int], policy.RuleRef] = {}
    seen: dict[tuple[str, Rule], int] = {}
    for ref in state.refs:
        nth = seen[(ref.policy, ref.rule)] = seen.get((ref.policy, ref.rule), -1) + 1
        old_ids[(ref.policy, ref.rule, nth)] = ref
    installed: dict[str, tuple[int, Policy]] = {}
    refs: list[policy.RuleRef] = []
    seen.clear()
    for item in wanted:
        old = state.policies.get(item.name)
        policy_id = old[0] if old is not None else next(policy_ids)
        installed[item.name] = (policy_id, item)
        info_key = maps.u32(policy_id)
        if old is None:
            prepare.write(maps.POL_NAMES, info_key, maps.policy_info(item))
            undo.delete(maps.POL_NAMES, info_key)
        elif old[1] != item:
            prepare.write(maps.POL_NAMES, info_key, maps.policy_info(item))
            undo.write(maps.POL_NAMES, info_key, maps.policy_info(old[1]))
        _members(policy_id, old[1].subjects if old is not None else (), item.subjects, phases)
        for index, rule in enumerate(item.rules):
            nth = seen[(item.name, rule)] = seen.get((item.name, rule), -1) + 1
            kept = old_ids.pop((item.name, rule, nth), None)
            ref = policy.RuleRef(kept.id if kept else next(rule_ids), item.name, index, rule)
            refs.append(ref)
            rule_key = maps.u32(ref.id)
            if kept is None:
                prepare.write(maps.POL_RULES, rule_key, maps.policy_rule(ref, policy_id))
                undo.delete(maps.POL_RULES, rule_key)
            elif kept.index != index:
                prepare.write(maps.POL_RULES, rule_key, maps.policy_rule(ref, policy_id))
                undo.write(maps.POL_RULES, rule_key, maps.policy_rule(kept, policy_id))
    for name, (policy_id, gone_policy) in state.policies.items():
        if name not in installed:
            phases.cleanup.delete(maps.POL_NAMES, maps.u32(policy_id))
            _members(policy_id, gone_policy.subjects, (), phases)
    for gone in old_ids.values():
        phases.cleanup.delete(maps.POL_RULES, maps.u32(gone.id))
        phases.cleanup.delete(maps.RULE_STATS, maps.u32(gone.id))
    return installed, refs


def _members(policy_id: int, old: tuple[Any, ...], new: tuple[Any, ...], phases: _Phases) -> None:
    """A policy's subjects in lb_pol_members (read back, not looked up by packets):
    the new ones written first, those no longer there removed at cleanup."""
    for index in range(max(len(old), len(new))):
        key = maps.policy_member_key(policy_id, index)
        if index < len(new):
            if index < len(old) and old[index] == new[index]:
                continue
            phases.prepare.write(maps.POL_MEMBERS, key, maps.policy_member(new[index]))
            if index < len(old):
                phases.undo.write(maps.POL_MEMBERS, key, maps.policy_member(old[index]))
            else:
                phases.undo.delete(maps.POL_MEMBERS, key)
        else:
            phases.cleanup.delete(maps.POL_MEMBERS, key)


def _generation(
    state: PolicyState,
    wanted: list[Policy],
    refs: list[policy.RuleRef],
    service_ids: dict[str, list[int]],
    gen: int,
    phases: _Phases,
) -> tuple[policy.Compiled, dict[int, tuple[list[Any], list[Any]]], dict[int, list[Any]]]:
    """The lookup entries of generation ``gen``, the one packets do not read: first
    clear what a crashed change may have left there, then write it whole."""
    prepare, undo = phases.prepare, phases.undo
    stale_cidrs, stale_ports = state.keys.get(gen, ([], []))
    for key in stale_cidrs:
        prepare.delete(maps.POL_CIDRS, key, missing_ok=True)
    for key in stale_ports:
        prepare.delete(maps.POL_PORTS, key, missing_ok=True)
    for key in state.subject_keys.get(gen, []):
        prepare.delete(maps.POL_SUBJECTS, key, missing_ok=True)
    compiled = policy.compile_policies(wanted, refs, service_ids, gen << POLICY_GEN_SHIFT)
    cidr_keys = [maps.policy_cidr_key(entry, gen) for entry in compiled.cidrs]
    port_keys = [maps.policy_port_key(entry) for entry in compiled.ports]
    for key, entry in zip(cidr_keys, compiled.cidrs, strict=True):
        prepare.write(maps.POL_CIDRS, key, maps.policy_class(entry))
    for key, port_entry in zip(port_keys, compiled.ports, strict=True):
        prepare.write(maps.POL_PORTS, key, maps.policy_verdict(port_entry))
    subject_keys = [maps.policy_subject_key(entry, gen) for entry in compiled.subjects]
    for key, subject in zip(subject_keys, compiled.subjects, strict=True):
        prepare.write(maps.POL_SUBJECTS, key, maps.policy_subject(subject))
    for key in cidr_keys:
        undo.delete(maps.POL_CIDRS, key)
    for key in port_keys:
        undo.delete(maps.POL_PORTS, key)
    for key in subject_keys:
        undo.delete(maps.POL_SUBJECTS, key)
    return (
        compiled,
        {gen: (cidr_keys, port_keys), 1 - gen: ([], [])},
        {gen: subject_keys, 1 - gen: []},
    )


def _head(
    state: PolicyState, wanted: list[Policy], compiled: policy.Compiled, gen: int, phases: _Phases
) -> None:
    """The head flips to the new generation; undo flips it back before it removes
    what the new head pointed at, and cleanup removes the old generation."""
    head_key = maps.u32(0)
    if wanted:
        phases.publish.write(maps.POLICY, head_key, maps.policy_head(gen, compiled))
    elif state.active:
        phases.publish.delete(maps.POLICY, head_key)
    if state.active:
        old_head = maps.policy_head(state.gen, _flags_of(state))
        phases.undo_head.write(maps.POLICY, head_key, old_head)
        old_cidrs, old_ports = state.keys.get(state.gen, ([], []))
        for key in old_cidrs:
            phases.cleanup.delete(maps.POL_CIDRS, key)
        for key in old_ports:
            phases.cleanup.delete(maps.POL_PORTS, key)
        for key in state.subject_keys.get(state.gen, []):
            phases.cleanup.delete(maps.POL_SUBJECTS, key)
    elif wanted:
        phases.undo_head.delete(maps.POLICY, head_key)


def _flags_of(state: PolicyState) -> policy.Compiled:
    """The head flags of the installed policies (no entries needed)."""
    return policy.compile_policies([p for _, p in state.policies.values()], [], {})


def with_policies(change: Plan, policies: PolicyPlan) -> Plan:
    """``change`` and ``policies`` as one all-or-nothing plan. The policy head flips
    after service removals and before new services are published: a new service is
    never reachable before the rules naming it are in force, nor a removed one after."""
    at, back = change.removal_steps, change.unpublish_steps
    return attrs.evolve(
        change,
        prepare=change.prepare + policies.prepare,
        publish=change.publish[:at] + policies.publish + change.publish[at:],
        undo=change.undo[:back] + policies.undo + change.undo[back:],
        cleanup=change.cleanup + policies.cleanup,
        changed=change.changed + 1,
        policy=policies,
    )


__all__ = ["PolicyPlan", "diff_policies", "with_policies"]
