"""Planning a change of the installed policies: pure, like :mod:`pyebpflb.plan`,
whose steps it uses.

A new generation of lookup entries is written where packets do not look
(prepare), ``lb_policy`` flips to it (publish), and the old generation goes
(cleanup); undo flips back first, then removes the new one. Rule ids (and their
counters) stay with their rules, policy ids with their names.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator
from typing import Any

import attrs

from pyebpflb import maps, policy
from pyebpflb.layout import POLICY_GEN_SHIFT, POLICY_RULESET
from pyebpflb.model import Action, Direction, Policy, Rule
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
    patched = _patch(state, wanted, service_ids, next_rule_id, next_policy_id)
    if patched is not None:
        return patched
    phases = _Phases()
    rule_ids = itertools.count(next_rule_id)
    policy_ids = itertools.count(next_policy_id)
    installed, refs = _names_and_rules(state, wanted, phases, rule_ids, policy_ids)
    gen = 1 - state.gen if state.active else 0
    compiled, keys, subject_keys = _generation(state, wanted, refs, service_ids, gen, phases)
    _head(state, wanted, compiled, gen, phases)
    index = RulesetIndex.of(wanted, refs, compiled, keys[gen], subject_keys[gen], gen, service_ids)
    state_now = PolicyState(
        gen=gen,
        active=bool(wanted),
        policies=installed,
        refs=tuple(refs),
        keys=keys,
        subject_keys=subject_keys,
        index=index,
    )
    return _plan(phases, state_now, rule_ids, policy_ids)


def _plan(
    phases: _Phases, state: PolicyState, rule_ids: Iterator[int], policy_ids: Iterator[int]
) -> PolicyPlan:
    """The plan of ``phases``, leaving the policies as ``state`` says."""
    return PolicyPlan(
        prepare=phases.prepare.list(),
        publish=phases.publish.list(),
        undo=phases.undo_head.list() + phases.undo.list(),
        cleanup=phases.cleanup.list(),
        state=state,
        next_rule_id=next(rule_ids),
        next_policy_id=next(policy_ids),
    )


def _names_and_rules(
    state: PolicyState,
    wanted: list[Policy],
    phases: _Phases,
    rule_ids: Iterator[int],
    policy_ids: Iterator[int],
    changed: set[str] | None = None,
    fresh: dict[str, list[policy.RuleRef]] | None = None,
) -> tuple[dict[str, tuple[int, Policy]], list[policy.RuleRef]]:
    """Ids for the wanted policies and rules, writing the names and rules that are
    new or moved; what left goes in cleanup. ``changed``: the names of the policies
    that are not as installed, when known; ``fresh`` receives their refs."""
    prepare, undo = phases.prepare, phases.undo
    known: RulesetIndex | None = state.index
    wanted_names = {p.name for p in wanted}
    # With the index, a policy that did not change keeps its refs as they are.
    kept_whole: set[str] = set()
    if known is not None:
        if changed is None:
            changed = {
                p.name
                for p in wanted
                if (old := state.policies.get(p.name)) is None or not (old[1] is p or old[1] == p)
            }
        kept_whole = wanted_names - changed
        fresh = {} if fresh is None else fresh
    # The nth copy of a rule in a policy keeps the nth copy's id.
    old_ids: dict[tuple[str, Rule, int], policy.RuleRef] = {}
    seen: dict[tuple[str, Rule], int] = {}
    old_refs = (
        state.refs
        if known is None
        else [r for name, own in known.refs.items() if name not in kept_whole for r in own]
    )
    for ref in old_refs:
        nth = seen[(ref.policy, ref.rule)] = seen.get((ref.policy, ref.rule), -1) + 1
        old_ids[(ref.policy, ref.rule, nth)] = ref
    installed: dict[str, tuple[int, Policy]] = {}
    refs: list[policy.RuleRef] = []
    seen.clear()
    work = wanted
    if known is not None:
        # Only the changed ones are walked; the others are taken whole, in place.
        held = state.policies
        installed = {p.name: (held[p.name][0] if p.name in held else 0, p) for p in wanted}
        work = [p for p in wanted if p.name not in kept_whole]
    for item in work:
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
            if fresh is not None:
                fresh.setdefault(item.name, []).append(ref)
            rule_key = maps.u32(ref.id)
            if kept is None:
                prepare.write(maps.POL_RULES, rule_key, maps.policy_rule(ref, policy_id))
                undo.delete(maps.POL_RULES, rule_key)
            elif kept.index != index:
                prepare.write(maps.POL_RULES, rule_key, maps.policy_rule(ref, policy_id))
                undo.write(maps.POL_RULES, rule_key, maps.policy_rule(kept, policy_id))
    for name, (policy_id, gone_policy) in state.policies.items():
        if name not in wanted_names:
            phases.cleanup.delete(maps.POL_NAMES, maps.u32(policy_id))
            _members(policy_id, gone_policy.subjects, (), phases)
    for gone in old_ids.values():
        phases.cleanup.delete(maps.POL_RULES, maps.u32(gone.id))
        phases.cleanup.delete(maps.RULE_STATS, maps.u32(gone.id))
    if work is not wanted:
        assert known is not None and fresh is not None
        refs = [
            r
            for p in wanted
            for r in (known.refs[p.name] if p.name in kept_whole else fresh.get(p.name, ()))
        ]
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


def _present(state: PolicyState, gen: int) -> tuple[list[Any], list[Any], list[Any]]:
    """The cidr, port and subject keys generation ``gen`` holds (a patched generation's
    from its index, not kept as lists)."""
    index: RulesetIndex | None = state.index
    if index is not None and index.gen == gen and gen not in state.keys:
        cidrs, ports = list(index.base[0]), list(index.base[1])
        for entries in index.rulesets.values():
            cidrs += entries.cidr_keys
            ports += entries.port_keys
        return cidrs, ports, [key for _, key in index.subjects.values()]
    cidr_keys, port_keys = state.keys.get(gen, ([], []))
    return cidr_keys, port_keys, state.subject_keys.get(gen, [])


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
    stale_cidrs, stale_ports, stale_subjects = _present(state, gen)
    for key in stale_cidrs:
        prepare.delete(maps.POL_CIDRS, key, missing_ok=True)
    for key in stale_ports:
        prepare.delete(maps.POL_PORTS, key, missing_ok=True)
    for key in stale_subjects:
        prepare.delete(maps.subject_map(key), key, missing_ok=True)
    compiled = policy.compile_policies(wanted, refs, service_ids, gen << POLICY_GEN_SHIFT)
    cidr_keys = [maps.policy_cidr_key(entry, gen) for entry in compiled.cidrs]
    port_keys = [maps.policy_port_key(entry) for entry in compiled.ports]
    for key, entry in zip(cidr_keys, compiled.cidrs, strict=True):
        prepare.write(maps.POL_CIDRS, key, maps.policy_class(entry))
    for key, port_entry in zip(port_keys, compiled.ports, strict=True):
        prepare.write(maps.POL_PORTS, key, maps.policy_verdict(port_entry))
    subject_keys = [maps.policy_subject_key(entry, gen) for entry in compiled.subjects]
    for key, subject in zip(subject_keys, compiled.subjects, strict=True):
        prepare.write(maps.subject_map(key), key, maps.policy_subject(subject))
    for key in cidr_keys:
        undo.delete(maps.POL_CIDRS, key)
    for key in port_keys:
        undo.delete(maps.POL_PORTS, key)
    for key in subject_keys:
        undo.delete(maps.subject_map(key), key)
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
        old_head = maps.policy_head(state.gen, _flags_of(state), state.sctp_pieces)
        phases.undo_head.write(maps.POLICY, head_key, old_head)
        old_cidrs, old_ports, old_subjects = _present(state, state.gen)
        for key in old_cidrs:
            phases.cleanup.delete(maps.POL_CIDRS, key)
        for key in old_ports:
            phases.cleanup.delete(maps.POL_PORTS, key)
        for key in old_subjects:
            phases.cleanup.delete(maps.subject_map(key), key)
    elif wanted:
        phases.undo_head.delete(maps.POLICY, head_key)


def _flags_of(state: PolicyState) -> policy.Compiled:
    """The head flags of the installed policies (no entries needed)."""
    return policy.flags([p for _, p in state.policies.values()])


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


# -- patching the active generation ----------------------------------------------------
#
# A change that only touches policies with subjects (a pod's labels moved it from one
# policy to another, a peer pod came or went) need not rewrite a generation of tens of
# thousands of entries: only the rule sets whose policies changed are compiled, each
# under a new number where packets do not look yet (prepare); then each endpoint whose
# rule set changed is pointed at its new one, one lb_pol_subjects entry each (publish,
# every write atomic: a packet sees the endpoint's old rule set or its new one, whole);
# then the rule sets no endpoint points at go (cleanup).

SubjectAt = tuple[Direction, int, int, int]  # direction, family, prefix length, network


@attrs.frozen
class RulesetEntries:
    """One rule set's lookup entries in the active generation."""

    number: int
    ruleset: policy.Ruleset
    cidr_keys: tuple[Any, ...]
    port_keys: tuple[Any, ...]


@attrs.frozen
class RulesetIndex:
    """The active generation as the process that wrote it knows it: what patching it
    needs. Never changed in place (a failed change keeps the old one)."""

    gen: int
    base: tuple[list[Any], list[Any]]  # cidr and port keys of scope 0 and the services
    numbers: dict[policy.Ruleset, int]  # a rule set -> its number
    rulesets: dict[int, RulesetEntries]  # by number
    pointing: dict[int, frozenset[SubjectAt]]  # number -> the endpoint entries pointing at it
    containing: dict[str, frozenset[int]]  # a policy -> the rule sets holding it
    subjects: dict[SubjectAt, tuple[policy.SubjectEntry, Any]]  # entry, its key
    by_cidr: dict[tuple[Direction, int], dict[tuple[int, int], dict[str, int]]]
    refs: dict[str, tuple[policy.RuleRef, ...]]  # by policy
    everyone_denies: dict[Direction, bool]
    next_number: int
    next_class: int  # with the generation's bit
    counts: dict[Direction, tuple[int, int]]  # policies in a direction, those with subjects
    names_services: bool  # a rule names a service
    service_ids: dict[str, list[int]]  # as compiled: the services' scopes

    @classmethod
    def of(
        cls,
        wanted: list[Policy],
        refs: list[policy.RuleRef],
        compiled: policy.Compiled,
        keys: tuple[list[Any], list[Any]],
        subject_keys: list[Any],
        gen: int,
        service_ids: dict[str, list[int]],
    ) -> RulesetIndex:
        """The index of a generation compiled whole."""
        scope_of_class = {e.class_id: e.scope for e in compiled.cidrs}
        cidr_keys, port_keys = keys
        by_scope: dict[int, tuple[list[Any], list[Any]]] = {}
        base: tuple[list[Any], list[Any]] = ([], [])
        for key, entry in zip(cidr_keys, compiled.cidrs, strict=True):
            if entry.scope & POLICY_RULESET:
                by_scope.setdefault(entry.scope & ~POLICY_RULESET, ([], []))[0].append(key)
            else:
                base[0].append(key)
        for key, port in zip(port_keys, compiled.ports, strict=True):
            scope = scope_of_class[port.class_id]
            if scope & POLICY_RULESET:
                by_scope.setdefault(scope & ~POLICY_RULESET, ([], []))[1].append(key)
            else:
                base[1].append(key)
        numbers = dict(compiled.rulesets)
        rulesets = {
            n: RulesetEntries(n, rs, tuple(by_scope.get(n, ([], []))[0]),
                              tuple(by_scope.get(n, ([], []))[1]))
            for rs, n in numbers.items()
        }  # fmt: skip
        subjects: dict[SubjectAt, tuple[policy.SubjectEntry, Any]] = {}
        pointing: dict[int, set[SubjectAt]] = {n: set() for n in numbers.values()}
        for key, subject in zip(subject_keys, compiled.subjects, strict=True):
            at = _at(subject.direction, subject.network)
            subjects[at] = (subject, key)
            pointing[subject.scope & ~POLICY_RULESET].add(at)
        containing: dict[str, set[int]] = {}
        for (_, names), n in numbers.items():
            for name in names:
                containing.setdefault(name, set()).add(n)
        by_cidr: dict[tuple[Direction, int], dict[tuple[int, int], dict[str, int]]] = {}
        for item in wanted:
            _count(by_cidr, item, 1)
        own: dict[str, list[policy.RuleRef]] = {p.name: [] for p in wanted}
        for ref in refs:
            own[ref.policy].append(ref)
        classes = [e.class_id & ~(1 << POLICY_GEN_SHIFT) for e in compiled.cidrs]
        head = policy.flags(wanted)
        return cls(
            gen=gen,
            base=base,
            numbers=numbers,
            rulesets=rulesets,
            pointing={n: frozenset(ats) for n, ats in pointing.items()},
            containing={name: frozenset(ns) for name, ns in containing.items()},
            subjects=subjects,
            by_cidr=by_cidr,
            refs={name: tuple(r) for name, r in own.items()},
            everyone_denies={
                Direction.INGRESS: head.ingress_deny,
                Direction.EGRESS: head.egress_deny,
            },
            next_number=max(numbers.values(), default=0) + 1,
            next_class=(gen << POLICY_GEN_SHIFT) | (max(classes, default=0) + 1),
            counts={
                d: (
                    sum(p.direction is d for p in wanted),
                    sum(p.direction is d and bool(p.subjects) for p in wanted),
                )
                for d in Direction
            },
            names_services=head.ingress_service_rules,
            service_ids=service_ids,
        )


def _at(direction: Direction, network: Any) -> SubjectAt:
    return (direction, network.version, network.prefixlen, int(network.network_address))


def _count(
    by_cidr: dict[tuple[Direction, int], dict[tuple[int, int], dict[str, int]]],
    item: Policy,
    step: int,
    copied: set[Any] | None = None,
) -> None:
    """Count ``item``'s subjects in (``step`` 1) or out (-1) of ``by_cidr``; with
    ``copied``, each mapping is copied before its first change (the old index keeps
    its own)."""
    for subject in item.subjects:
        where = (item.direction, subject.version)
        at = (subject.prefixlen, int(subject.network_address))
        if copied is not None and where not in copied:
            copied.add(where)
            by_cidr[where] = dict(by_cidr.get(where, {}))
        held = by_cidr.setdefault(where, {})
        if copied is not None and (where, at) not in copied:
            copied.add((where, at))
            held[at] = dict(held.get(at, {}))
        names = held.setdefault(at, {})
        names[item.name] = names.get(item.name, 0) + step
        if names[item.name] <= 0:
            del names[item.name]
            if not names:
                del held[at]


def _patch(
    state: PolicyState,
    wanted: list[Policy],
    service_ids: dict[str, list[int]],
    next_rule_id: int,
    next_policy_id: int,
) -> PolicyPlan | None:
    """The plan that patches the active generation into ``wanted``; None when the
    change is not one a patch can make (a generation is then written whole)."""
    index: RulesetIndex | None = state.index
    if index is None or not state.active or not wanted or index.gen != state.gen:
        return None
    if index.names_services and service_ids != index.service_ids:
        return None  # the rules naming services are compiled for other services
    new = {p.name: p for p in wanted}
    before: list[Policy] = []
    after: list[Policy] = []
    for name, (_, old) in state.policies.items():
        now = new.get(name)
        if now is None:
            before.append(old)
        elif now is not old and now != old:
            before.append(old)
            after.append(now)
    after += [p for name, p in new.items() if name not in state.policies]
    for item in before + after:
        if not item.subjects or any(r.service is not None for r in item.rules):
            return None
    counts = dict(index.counts)
    for step, items in ((-1, before), (1, after)):
        for item in items:
            total, with_subjects = counts[item.direction]
            counts[item.direction] = (total + step, with_subjects + step)
    if any(
        (a > 0, b > 0) != (c > 0, d > 0)
        for (a, b), (c, d) in zip(counts.values(), index.counts.values(), strict=True)
    ):
        return None  # a direction gains its first policy or loses its last: the head changes
    phases = _Phases()
    rule_ids = itertools.count(next_rule_id)
    policy_ids = itertools.count(next_policy_id)
    changed = {p.name for p in before + after}
    fresh: dict[str, list[policy.RuleRef]] = {name: [] for name in changed if name in new}
    installed, refs = _names_and_rules(state, wanted, phases, rule_ids, policy_ids, changed, fresh)
    own: dict[str, tuple[policy.RuleRef, ...]] = dict(index.refs)
    for item in before:
        own.pop(item.name, None)
    own.update({name: tuple(r) for name, r in fresh.items()})
    by_cidr = dict(index.by_cidr)
    copied: set[Any] = set()
    affected: set[SubjectAt] = set()
    for step, items in ((-1, before), (1, after)):
        for item in items:
            _count(by_cidr, item, step, copied)
            affected.update(_at(item.direction, s) for s in item.subjects)
    stale = {n for name in changed for n in index.containing.get(name, ())}
    for number in stale:
        affected.update(index.pointing.get(number, ()))
    wider = [at for at in affected if at[2] < (32 if at[1] == 4 else 128)]
    if wider:  # the endpoints inside a changed CIDR subject change too
        everything = set(index.subjects) | {
            (d, f, length, net) for (d, f), held in by_cidr.items() for length, net in held
        }
        for d, f, length, net in wider:
            shift = (32 if f == 4 else 128) - length
            affected.update(at for at in everything
                            if at[:2] == (d, f) and at[2] >= length
                            and at[3] >> shift == net >> shift)  # fmt: skip
    walkers: dict[tuple[Direction, int], Any] = {}
    numbers = dict(index.numbers)
    for number in stale:
        numbers.pop(index.rulesets[number].ruleset, None)
    rulesets = dict(index.rulesets)
    pointing: dict[int, set[SubjectAt]] = {}  # the changed ones, copied

    def moved(number: int, at: SubjectAt, step: int) -> None:
        if number not in pointing:
            pointing[number] = set(index.pointing.get(number, ()))
        (pointing[number].add if step > 0 else pointing[number].discard)(at)

    subjects = dict(index.subjects)
    next_number = index.next_number
    class_ids = itertools.count(index.next_class)
    gen = state.gen
    for at in sorted(affected, key=lambda a: (a[0].value, a[1], a[2], a[3])):
        direction, family, prefixlen, network = at
        if (direction, family) not in walkers:
            walkers[(direction, family)] = policy.prefix_walk(
                by_cidr.get((direction, family), {}), 32 if family == 4 else 128
            )
        walk = walkers[(direction, family)]
        names = frozenset(n for held in walk(prefixlen, network) for n in held)
        was = subjects.get(at)
        if was is not None and (prefixlen, network) not in by_cidr.get((direction, family), {}):
            subjects.pop(at)  # no policy names this CIDR any more
            moved(was[0].scope & ~POLICY_RULESET, at, -1)
            phases.publish.delete(maps.subject_map(was[1]), was[1])
            phases.undo_head.write(maps.subject_map(was[1]), was[1], maps.policy_subject(was[0]))
            continue
        if not names:
            continue
        ruleset = (direction, names)
        found = numbers.get(ruleset)
        if found is None:
            number = numbers[ruleset] = next_number
            next_number += 1
            rulesets[number] = _write_ruleset(ruleset, number, own, class_ids, gen, phases)
        else:
            number = found
        deny = index.everyone_denies[direction] or any(new[n].default is Action.DENY for n in names)
        net_type = ipaddress.IPv4Network if family == 4 else ipaddress.IPv6Network
        entry = policy.SubjectEntry(
            direction, family, net_type((network, prefixlen)), POLICY_RULESET | number, deny
        )
        if was is not None and was[0] == entry:
            continue
        key = maps.policy_subject_key(entry, gen)
        phases.publish.write(maps.subject_map(key), key, maps.policy_subject(entry))
        if was is not None:
            moved(was[0].scope & ~POLICY_RULESET, at, -1)
            phases.undo_head.write(maps.subject_map(key), key, maps.policy_subject(was[0]))
        else:
            phases.undo_head.delete(maps.subject_map(key), key)
        moved(number, at, 1)
        subjects[at] = (entry, key)
    containing = dict(index.containing)
    new_pointing = dict(index.pointing)
    for number, ats in pointing.items():
        new_pointing[number] = frozenset(ats)
        if ats:
            continue
        gone = rulesets.pop(number)
        del new_pointing[number]
        if numbers.get(gone.ruleset) == number:
            del numbers[gone.ruleset]
        for name in gone.ruleset[1]:
            containing[name] = containing.get(name, frozenset()) - {number}
        for cidr_key in gone.cidr_keys:
            phases.cleanup.delete(maps.POL_CIDRS, cidr_key)
        for port_key in gone.port_keys:
            phases.cleanup.delete(maps.POL_PORTS, port_key)
    for number in set(rulesets) - set(index.rulesets):  # new ones
        for name in rulesets[number].ruleset[1]:
            containing[name] = containing.get(name, frozenset()) | {number}
    containing = {name: held for name, held in containing.items() if held}
    patched = attrs.evolve(
        index,
        numbers=numbers,
        rulesets=rulesets,
        pointing=new_pointing,
        containing=containing,
        subjects=subjects,
        by_cidr=by_cidr,
        refs=own,
        next_number=next_number,
        next_class=next(class_ids),
        counts=counts,
    )
    state_now = PolicyState(
        gen=gen,
        active=True,
        policies=installed,
        refs=tuple(refs),
        # This generation's keys are the index's (_present): not listed each change.
        keys={1 - gen: state.keys.get(1 - gen, ([], []))},
        subject_keys={1 - gen: state.subject_keys.get(1 - gen, [])},
        index=patched,
    )
    return _plan(phases, state_now, rule_ids, policy_ids)


def _write_ruleset(
    ruleset: policy.Ruleset,
    number: int,
    own: dict[str, tuple[policy.RuleRef, ...]],
    class_ids: Iterator[int],
    gen: int,
    phases: _Phases,
) -> RulesetEntries:
    """A rule set compiled under ``number``, written where no endpoint points yet."""
    direction, names = ruleset
    members: list[policy.RuleRef] = []
    for name in sorted(names):
        members += [r for r in own.get(name, ()) if r.rule.service is None]
    cidr_keys, port_keys = [], []
    for family in (4, 6):
        mine = [r for r in members if r.rule.cidr is None or r.rule.cidr.version == family]
        if not mine:
            continue
        cidrs, ports = policy.classes(direction, POLICY_RULESET | number, family, mine, class_ids)
        for port in ports:
            key = maps.policy_port_key(port)
            phases.prepare.write(maps.POL_PORTS, key, maps.policy_verdict(port))
            phases.undo.delete(maps.POL_PORTS, key)
            port_keys.append(key)
        for cidr in cidrs:
            key = maps.policy_cidr_key(cidr, gen)
            phases.prepare.write(maps.POL_CIDRS, key, maps.policy_class(cidr))
            phases.undo.delete(maps.POL_CIDRS, key)
            cidr_keys.append(key)
    return RulesetEntries(number, ruleset, tuple(cidr_keys), tuple(port_keys))


__all__ = ["PolicyPlan", "RulesetIndex", "diff_policies", "with_policies"]
