//! Map sync for CGNAT filtering: makes the prefix maps and lookup plans of a policy
//! generation hold exactly the desired rules (see `generation` for how a change reaches the
//! datapath at once, `cgnat_plan` for the plans).
//!
//! A rule (prefix + verdict) has one id, and so one hit counter, wherever it appears
//! (inbound and forward, both generations), kept for as long as the rule stays in the
//! policy. New rules get the lowest free id with a zeroed counter; when a reload replaces so
//! much of the policy that no id is free, a new rule takes the id of a rule this same sync
//! removes (both count into it until the switch). Ids live only in the maps, so they survive
//! restarts with the pinned maps.

use std::{collections::HashMap, sync::Arc};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use ipnet::IpNet;
use tailgate_abi::{
    cgnat::{
        plan_index, Plan, PrefixRule, FORWARD, INBOUND, LEGACY_MAPS, MAP_FWD_V4, MAP_FWD_V6, MAP_IN_V4,
        MAP_IN_V6, MAP_PLAN, TAG_LEN,
    },
    verdict, MAP_RULE_HITS, MAX_RULES,
};

use super::{cgnat_plan, generation::GenerationWriter};
use crate::policy::{CgnatRules, Rule, Verdict};

/// What a sync changed in the generation that became active, in map entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// A prefix in one shape for both families: (IPv6?, prefix length, address bytes).
pub type Prefix = (bool, u32, [u8; 16]);

/// A table keyed by prefix.
pub type PrefixMap<V> = HashMap<Prefix, V, rustc_hash::FxBuildHasher>;

/// The four prefix maps: (name, IPv6?, inbound?). Each holds both generations.
const TRIES: [(&str, bool, bool); 4] = [
    (MAP_IN_V4, false, true),
    (MAP_IN_V6, true, true),
    (MAP_FWD_V4, false, false),
    (MAP_FWD_V6, true, false),
];

/// The map names: the prefix maps, then the plans.
pub fn map_names() -> impl Iterator<Item = &'static str> {
    TRIES.into_iter().map(|(name, _, _)| name).chain([MAP_PLAN])
}

/// Per prefix map (in `TRIES` order): prefix → rule. Shared (`Arc`) between the
/// generations that hold the same content, so the daemon keeps one copy of the policy.
pub type Tries = Arc<TrieSet>;
pub type TrieSet = Vec<PrefixMap<PrefixRule>>;

/// The CGNAT maps of both generations. What each generation holds is read from the maps
/// once (they may come pinned from an earlier run) and then kept in step with every write,
/// so a change writes what it changes and reads no map.
pub struct CgnatMaps {
    /// Per generation; `None` until read, and again after a write failed half-way.
    held: [Option<Tries>; 2],
    /// What the change being written wants, ids assigned.
    desired: Tries,
    /// The plans of `desired`.
    plans: [Plan; 2],
    /// The change from a content both generations held when it was planned: what a write
    /// over that content does (the usual case), without comparing every entry.
    delta: Option<Delta>,
    /// The report of the first write of a change (the generation that becomes active).
    pub report: Option<SyncReport>,
}

/// Entries to write and prefixes to remove, per prefix map.
type Changes = Vec<(Vec<(Prefix, PrefixRule)>, Vec<Prefix>)>;

/// Writes and removals, per prefix map, that turn `from` into the desired content.
struct Delta {
    from: Tries,
    changes: Changes,
    unchanged: usize,
}

impl Default for CgnatMaps {
    fn default() -> Self {
        Self {
            held: [None, None],
            desired: Tries::default(),
            plans: [Plan::EMPTY; 2],
            delta: None,
            report: None,
        }
    }
}

impl CgnatMaps {
    /// Prepares a change to `rules`: assigns ids (a rule both generations hold keeps its
    /// id; new rules take free ones) and zeroes the counters of new ids. Write it with
    /// `generation::swap`.
    pub fn plan(&mut self, ebpf: &mut Ebpf, rules: &CgnatRules) -> Result<()> {
        if self.held.iter().any(Option::is_none) {
            self.held = read_both(ebpf)?.map(|tries| Some(Arc::new(tries)));
        }
        // Both generations normally hold one shared content: look there once.
        let base = match &self.held {
            [Some(a), Some(b)] if Arc::ptr_eq(a, b) => Some(a.clone()),
            _ => None,
        };
        let held: Vec<&TrieSet> = match &base {
            Some(base) => vec![&**base],
            None => self.held.iter().flatten().map(|t| &**t).collect(),
        };
        let mut ids = Ids::new(&held);
        let mut desired = Vec::with_capacity(TRIES.len());
        let mut changes: Changes = Vec::with_capacity(TRIES.len());
        // Rules no generation holds: (map, prefix, verdict). They get ids once every kept
        // id is known, so an id taken from a leaving rule is never one that stays.
        let mut new_rules = Vec::new();
        let mut unchanged = 0;
        for (t, &(_, v6, inbound)) in TRIES.iter().enumerate() {
            let list = if inbound { &rules.inbound } else { &rules.forward };
            // The same family's map of the other direction: a rule shares its id there.
            let other = t ^ 2;
            let mut trie = PrefixMap::with_capacity_and_hasher(list.len(), Default::default());
            let mut writes = Vec::new();
            for (prefix, verdict) in entries(list, v6) {
                let held_rule = |map: usize| {
                    held.iter().find_map(|tries| tries[map].get(&prefix)).filter(|r| r.verdict == verdict)
                };
                let here = held_rule(t);
                match here.or_else(|| held_rule(other)) {
                    Some(rule) if rule.rule_id < MAX_RULES => {
                        ids.keep(rule.rule_id);
                        if here.is_some() {
                            unchanged += 1;
                        } else {
                            writes.push((prefix, *rule));
                        }
                        trie.insert(prefix, *rule);
                    }
                    _ => new_rules.push((t, prefix, verdict)),
                }
            }
            changes.push((writes, Vec::new()));
            desired.push(trie);
        }
        for (t, prefix, verdict) in new_rules {
            let rule = PrefixRule { verdict, rule_id: ids.fresh_for(prefix, verdict) };
            changes[t].0.push((prefix, rule));
            desired[t].insert(prefix, rule);
        }
        // Entries that go: only looked for where some of the old content was not kept.
        if let Some(base) = &base {
            for ((want, (writes, stale)), have) in desired.iter().zip(&mut changes).zip(base.iter()) {
                if have.len() + writes.len() != want.len() {
                    *stale = have.keys().filter(|p| !want.contains_key(*p)).copied().collect();
                }
            }
        }
        let fresh = ids.into_fresh();
        zero_counters(ebpf, fresh.into_iter())?;
        self.desired = Arc::new(desired);
        self.plans = plans(&self.desired);
        self.delta = base.map(|from| Delta { from, changes, unchanged });
        self.report = None;
        Ok(())
    }

    /// A change is written to both generations: what it kept of the content before goes
    /// (a whole policy's worth of memory after a full replace).
    pub fn settle(&mut self) {
        self.delta = None;
    }

    /// What generation `generation` holds, if known.
    pub fn held(&self, generation: u32) -> Option<Tries> {
        self.held[generation as usize & 1].clone()
    }

    /// Prepares writing back a content read earlier with `held` (ids and all).
    pub fn restore(&mut self, content: Tries) {
        self.plans = plans(&content);
        self.desired = content;
        self.delta = None;
        self.report = None;
    }
}

impl GenerationWriter for CgnatMaps {
    fn write(&mut self, ebpf: &mut Ebpf, generation: u32) -> Result<usize> {
        let held = match self.held[generation as usize].take() {
            Some(held) => held,
            None => Arc::new(std::mem::take(&mut read_both(ebpf)?[generation as usize])),
        };
        let mut report = SyncReport::default();
        if Arc::ptr_eq(&held, &self.desired) {
            // This generation already holds exactly this (the common second write).
            report.unchanged = held.iter().map(|trie| trie.len()).sum();
            self.held[generation as usize] = Some(held);
            self.report.get_or_insert(report);
            return Ok(0);
        }
        let computed;
        let changes = match &self.delta {
            Some(delta) if Arc::ptr_eq(&delta.from, &held) => {
                report.unchanged = delta.unchanged;
                &delta.changes
            }
            // Another content (a write failed before, or a restore): compare every entry.
            _ => {
                computed = diff(&self.desired, &held, &mut report);
                &computed
            }
        };
        for (&(name, v6, _), (writes, stale)) in TRIES.iter().zip(changes) {
            report.added += writes.len();
            report.removed += stale.len();
            // On failure `held` stays unknown: the next change reads the maps again.
            if v6 {
                apply::<20>(ebpf, name, generation, writes, stale)?;
            } else {
                apply::<8>(ebpf, name, generation, writes, stale)?;
            }
        }
        // The plans last: they only say where to look.
        let written = write_plans(ebpf, generation, &self.plans)?;
        self.held[generation as usize] = Some(self.desired.clone());
        self.report.get_or_insert(report);
        Ok(report.added + report.removed + written)
    }
}

/// What turns `have` into `want`, per prefix map.
#[allow(clippy::type_complexity)]
fn diff(
    want: &TrieSet,
    have: &TrieSet,
    report: &mut SyncReport,
) -> Vec<(Vec<(Prefix, PrefixRule)>, Vec<Prefix>)> {
    want.iter()
        .zip(have)
        .map(|(want, have)| {
            let stale: Vec<Prefix> = have.keys().filter(|p| !want.contains_key(*p)).copied().collect();
            let mut writes = Vec::new();
            for (prefix, rule) in want {
                if have.get(prefix) == Some(rule) {
                    report.unchanged += 1;
                } else {
                    writes.push((*prefix, *rule));
                }
            }
            (writes, stale)
        })
        .collect()
}

/// The plans of the inbound and forward directions of `tries`.
pub fn plans(tries: &Tries) -> [Plan; 2] {
    // TRIES order: in v4, in v6, fwd v4, fwd v6.
    let plan = |v4, v6| Plan { v4: cgnat_plan::family(&tries[v4]), v6: cgnat_plan::family(&tries[v6]) };
    [plan(0, 1), plan(2, 3)]
}

/// Writes the plans of one generation where they differ; returns how many it wrote.
fn write_plans(ebpf: &mut Ebpf, generation: u32, plans: &[Plan; 2]) -> Result<usize> {
    let map = ebpf.map_mut(MAP_PLAN).with_context(|| format!("map {MAP_PLAN} missing"))?;
    let mut array: Array<&mut MapData, Plan> = Array::try_from(map)?;
    let mut written = 0;
    for (direction, plan) in [INBOUND, FORWARD].into_iter().zip(plans) {
        let index = plan_index(direction, generation);
        if array.get(&index, 0)? != *plan {
            array.set(index, *plan, 0).with_context(|| format!("writing {MAP_PLAN}"))?;
            written += 1;
        }
    }
    Ok(written)
}

/// What the tries hold, per generation.
fn read_both(ebpf: &Ebpf) -> Result<[TrieSet; 2]> {
    let mut both = [TrieSet::new(), TrieSet::new()];
    for &(name, v6, _) in &TRIES {
        let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
        let [g0, g1] = read_trie(map, v6).with_context(|| format!("reading {name}"))?;
        both[0].push(g0);
        both[1].push(g1);
    }
    Ok(both)
}

/// The rules of one family as (prefix, verdict).
pub fn entries(rules: &[Rule], v6: bool) -> impl Iterator<Item = (Prefix, u32)> + '_ {
    rules.iter().filter(move |r| matches!(r.prefix, IpNet::V6(_)) == v6).map(move |r| {
        let mut addr = [0u8; 16];
        match r.prefix {
            IpNet::V4(net) => addr[..4].copy_from_slice(&net.network().octets()),
            IpNet::V6(net) => addr = net.network().octets(),
        }
        let verdict = if r.verdict == Verdict::Drop { verdict::DROP } else { verdict::PASS };
        ((v6, u32::from(r.prefix.prefix_len()), addr), verdict)
    })
}

/// Rule ids of a change: which are in use (by either generation), which the new policy
/// keeps, and which it takes anew.
struct Ids {
    in_use: Vec<bool>,
    kept: Vec<bool>,
    /// New (prefix, verdict) rules and their ids: a rule new to both directions gets one.
    fresh: HashMap<(Prefix, u32), u32>,
    /// Where the searches for an unused id and for an id of a leaving rule go on.
    next_unused: usize,
    next_leaving: usize,
}

impl Ids {
    fn new(held: &[&TrieSet]) -> Self {
        let mut in_use = vec![false; MAX_RULES as usize];
        for rule in held.iter().flat_map(|tries| tries.iter().flat_map(|trie| trie.values())) {
            if rule.rule_id < MAX_RULES {
                in_use[rule.rule_id as usize] = true;
            }
        }
        Self {
            in_use,
            kept: vec![false; MAX_RULES as usize],
            fresh: HashMap::new(),
            next_unused: 0,
            next_leaving: 0,
        }
    }

    fn keep(&mut self, id: u32) {
        self.kept[id as usize] = true;
    }

    /// The id of a rule no generation holds: the lowest nobody uses, else one of a rule
    /// this change removes (both count into it until the switch); past `MAX_RULES` the rule
    /// still works, uncounted.
    fn fresh_for(&mut self, prefix: Prefix, verdict: u32) -> u32 {
        if let Some(&id) = self.fresh.get(&(prefix, verdict)) {
            return id;
        }
        let unused = (self.next_unused..self.kept.len()).find(|&id| !self.in_use[id] && !self.kept[id]);
        if let Some(id) = unused {
            self.next_unused = id + 1;
        }
        let id = unused.or_else(|| {
            let leaving = (self.next_leaving..self.kept.len()).find(|&id| !self.kept[id]);
            if let Some(id) = leaving {
                self.next_leaving = id + 1;
            }
            leaving
        });
        let id = match id {
            Some(id) => {
                self.kept[id] = true;
                id as u32
            }
            None => MAX_RULES,
        };
        self.fresh.insert((prefix, verdict), id);
        id
    }

    /// The ids taken anew (counters to zero).
    fn into_fresh(self) -> Vec<u32> {
        self.fresh.into_values().filter(|&id| id < MAX_RULES).collect()
    }
}

/// Writes generation `generation` of a prefix map (nobody reads it): deletes first.
fn apply<const K: usize>(
    ebpf: &mut Ebpf,
    name: &str,
    generation: u32,
    writes: &[(Prefix, PrefixRule)],
    stale: &[Prefix],
) -> Result<()> {
    let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
    let mut hash: BpfHashMap<&mut MapData, [u8; K], PrefixRule> = BpfHashMap::try_from(map)?;
    for prefix in stale {
        hash.remove(&key::<K>(generation, prefix)).with_context(|| format!("removing from {name}"))?;
    }
    for (prefix, rule) in writes {
        hash.insert(key::<K>(generation, prefix), *rule, 0)
            .with_context(|| format!("inserting into {name}"))?;
    }
    Ok(())
}

/// The map key of `prefix` in `generation`: `[generation, length, 0, 0]`, then the
/// address (already masked: policy prefixes are network addresses).
fn key<const K: usize>(generation: u32, (_, len, addr): &Prefix) -> [u8; K] {
    let mut data = [0u8; K];
    data[0] = generation as u8;
    data[1] = *len as u8;
    data[TAG_LEN..].copy_from_slice(&addr[..K - TAG_LEN]);
    data
}

/// The entries of a prefix map, per generation.
fn read_trie(map: &Map, v6: bool) -> Result<[PrefixMap<PrefixRule>; 2]> {
    if v6 {
        read_tagged::<20>(map, v6)
    } else {
        read_tagged::<8>(map, v6)
    }
}

fn read_tagged<const K: usize>(map: &Map, v6: bool) -> Result<[PrefixMap<PrefixRule>; 2]> {
    let hash: BpfHashMap<&MapData, [u8; K], PrefixRule> = BpfHashMap::try_from(map)?;
    let mut both = [PrefixMap::default(), PrefixMap::default()];
    for item in hash.iter() {
        let (data, rule) = item?;
        let mut addr = [0u8; 16];
        addr[..K - TAG_LEN].copy_from_slice(&data[TAG_LEN..]);
        both[usize::from(data[0] & 1)].insert((v6, u32::from(data[1]), addr), rule);
    }
    Ok(both)
}

/// The rules of generation `generation` in a trie map (pinned or loaded), as prefixes.
pub fn rules(map: &Map, v6: bool, generation: u32) -> Result<Vec<(IpNet, PrefixRule)>> {
    let [g0, g1] = read_trie(map, v6)?;
    as_nets(if generation == 0 { g0 } else { g1 })
}

/// The rules of a trie pinned by a version before policy generations (keys without a tag).
pub fn legacy_rules(map: &Map, v6: bool) -> Result<Vec<(IpNet, PrefixRule)>> {
    as_nets(read_untagged(map, v6)?)
}

fn as_nets(entries: PrefixMap<PrefixRule>) -> Result<Vec<(IpNet, PrefixRule)>> {
    entries
        .into_iter()
        .map(|((v6, len, addr), rule)| {
            let net: IpNet = if v6 {
                ipnet::Ipv6Net::new(addr.into(), len as u8)?.into()
            } else {
                ipnet::Ipv4Net::new([addr[0], addr[1], addr[2], addr[3]].into(), len as u8)?.into()
            };
            Ok((net, rule))
        })
        .collect()
}

fn read_untagged(map: &Map, v6: bool) -> Result<PrefixMap<PrefixRule>> {
    if v6 {
        untagged::<16>(map, v6)
    } else {
        untagged::<4>(map, v6)
    }
}

fn untagged<const N: usize>(map: &Map, v6: bool) -> Result<PrefixMap<PrefixRule>> {
    let trie: LpmTrie<&MapData, [u8; N], PrefixRule> = LpmTrie::try_from(map)?;
    let mut entries = PrefixMap::default();
    for item in trie.iter() {
        let (key, rule) = item?;
        let mut addr = [0u8; 16];
        addr[..N].copy_from_slice(&key.data());
        entries.insert((v6, key.prefix_len(), addr), rule);
    }
    Ok(entries)
}

/// The policy a version before policy generations left pinned under `pins` (a kept
/// datapath being upgraded), in the shape of one generation; `None` if there is none.
pub fn legacy_policy(pins: &super::Pins) -> Result<Option<Tries>> {
    if !pins.map(LEGACY_MAPS[0]).exists() {
        return Ok(None);
    }
    // LEGACY_MAPS is in TRIES order.
    let mut tries = TrieSet::new();
    for (&(_, v6, _), name) in TRIES.iter().zip(LEGACY_MAPS) {
        let path = pins.map(name);
        let map = Map::from_map_data(
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?,
        )?;
        tries.push(read_untagged(&map, v6)?);
    }
    Ok(Some(Arc::new(tries)))
}

/// The entries of the active generation of trie `name`, for tests: (prefix length, address).
pub fn read_active<const N: usize>(ebpf: &Ebpf, name: &str) -> Result<HashMap<(u32, [u8; N]), PrefixRule>> {
    read_generation::<N>(ebpf, name, super::generation::active(ebpf)?)
}

/// The entries of one generation of trie `name`, for tests.
pub fn read_generation<const N: usize>(
    ebpf: &Ebpf,
    name: &str,
    generation: u32,
) -> Result<HashMap<(u32, [u8; N]), PrefixRule>> {
    let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
    let both = read_trie(map, N == 16)?;
    Ok(both[generation as usize & 1]
        .iter()
        .map(|((_, len, addr), rule)| ((*len, addr[..N].try_into().expect("address width")), *rule))
        .collect())
}

fn zero_counters(ebpf: &mut Ebpf, ids: impl Iterator<Item = u32>) -> Result<()> {
    let map = ebpf.map_mut(MAP_RULE_HITS).context("map RULE_HITS missing")?;
    let mut hits: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(map)?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    for id in ids {
        hits.set(id, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
    }
    Ok(())
}
