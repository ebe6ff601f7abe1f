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

use std::collections::{BTreeSet, HashMap};

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

/// Per prefix map (in `TRIES` order): prefix → rule.
pub type Tries = Vec<HashMap<Prefix, PrefixRule>>;

/// The CGNAT maps of both generations. What each generation holds is read from the maps
/// once (they may come pinned from an earlier run) and then kept in step with every write,
/// so a change costs what it changes, not a read of every entry.
#[derive(Default)]
pub struct CgnatMaps {
    /// Per generation; `None` until read, and again after a write failed half-way.
    held: [Option<Tries>; 2],
    /// What the change being written wants, ids assigned.
    desired: Tries,
    /// The report of the first write of a change (the generation that becomes active).
    pub report: Option<SyncReport>,
}

impl CgnatMaps {
    /// Prepares a change to `rules`: assigns ids (against what both generations hold) and
    /// zeroes the counters of new ids. Write it with `generation::swap`.
    pub fn plan(&mut self, ebpf: &mut Ebpf, rules: &CgnatRules) -> Result<()> {
        let wanted: Vec<HashMap<Prefix, u32>> = TRIES
            .iter()
            .map(|&(_, v6, inbound)| entries(if inbound { &rules.inbound } else { &rules.forward }, v6))
            .collect();
        if self.held.iter().any(Option::is_none) {
            self.held = read_both(ebpf)?.map(Some);
        }
        let current: Vec<&HashMap<Prefix, PrefixRule>> = self.held.iter().flatten().flatten().collect();
        let ids = assign_ids(&wanted, &current);
        zero_counters(ebpf, ids.fresh.iter().copied())?;
        self.desired = wanted
            .into_iter()
            .map(|trie| {
                trie.into_iter()
                    .map(|(prefix, verdict)| {
                        (prefix, PrefixRule { verdict, rule_id: ids.of[&(prefix, verdict)] })
                    })
                    .collect()
            })
            .collect();
        self.report = None;
        Ok(())
    }

    /// What generation `generation` holds, if known.
    pub fn held(&self, generation: u32) -> Option<&Tries> {
        self.held[generation as usize & 1].as_ref()
    }

    /// Prepares writing back a content read earlier with `held` (ids and all).
    pub fn restore(&mut self, content: Tries) {
        self.desired = content;
        self.report = None;
    }
}

impl GenerationWriter for CgnatMaps {
    fn write(&mut self, ebpf: &mut Ebpf, generation: u32) -> Result<usize> {
        let held = match self.held[generation as usize].take() {
            Some(held) => held,
            None => std::mem::take(&mut read_both(ebpf)?[generation as usize]),
        };
        let mut report = SyncReport::default();
        for ((&(name, v6, _), want), have) in TRIES.iter().zip(&self.desired).zip(&held) {
            let stale: Vec<Prefix> = have.keys().filter(|p| !want.contains_key(*p)).copied().collect();
            let mut writes = Vec::new();
            for (prefix, rule) in want {
                if have.get(prefix) == Some(rule) {
                    report.unchanged += 1;
                } else {
                    writes.push((*prefix, *rule));
                }
            }
            report.added += writes.len();
            report.removed += stale.len();
            // On failure `held` stays unknown: the next change reads the maps again.
            if v6 {
                apply::<20>(ebpf, name, generation, &writes, &stale)?;
            } else {
                apply::<8>(ebpf, name, generation, &writes, &stale)?;
            }
        }
        // The plans last: they only say where to look.
        let plans = plans(&self.desired);
        let written = write_plans(ebpf, generation, &plans)?;
        self.held[generation as usize] = Some(self.desired.clone());
        self.report.get_or_insert(report);
        Ok(report.added + report.removed + written)
    }
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
fn read_both(ebpf: &Ebpf) -> Result<[Tries; 2]> {
    let mut both = [Tries::new(), Tries::new()];
    for &(name, v6, _) in &TRIES {
        let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
        let [g0, g1] = read_trie(map, v6).with_context(|| format!("reading {name}"))?;
        both[0].push(g0);
        both[1].push(g1);
    }
    Ok(both)
}

/// The rules of one family as prefix → verdict.
pub fn entries(rules: &[Rule], v6: bool) -> HashMap<Prefix, u32> {
    rules
        .iter()
        .filter(|r| matches!(r.prefix, IpNet::V6(_)) == v6)
        .map(|r| {
            let mut addr = [0u8; 16];
            match r.prefix {
                IpNet::V4(net) => addr[..4].copy_from_slice(&net.network().octets()),
                IpNet::V6(net) => addr = net.network().octets(),
            }
            let verdict = if r.verdict == Verdict::Drop { verdict::DROP } else { verdict::PASS };
            ((v6, u32::from(r.prefix.prefix_len()), addr), verdict)
        })
        .collect()
}

/// The id of every desired rule, and which of them are new (counters to zero).
struct Ids {
    of: HashMap<(Prefix, u32), u32>,
    fresh: Vec<u32>,
}

fn assign_ids(desired: &[HashMap<Prefix, u32>], current: &[&HashMap<Prefix, PrefixRule>]) -> Ids {
    let wanted: BTreeSet<(Prefix, u32)> =
        desired.iter().flat_map(|t| t.iter().map(|(p, v)| (*p, *v))).collect();
    let mut of: HashMap<(Prefix, u32), u32> = HashMap::new();
    let mut in_use = BTreeSet::new();
    for trie in current {
        for (prefix, rule) in trie.iter() {
            in_use.insert(rule.rule_id);
            let rule_key = (*prefix, rule.verdict);
            if wanted.contains(&rule_key) && rule.rule_id < MAX_RULES {
                of.entry(rule_key).or_insert(rule.rule_id);
            }
        }
    }
    let kept: BTreeSet<u32> = of.values().copied().collect();
    // Ids nobody uses first, then ids of rules this sync removes.
    let mut unused = (0..MAX_RULES).filter(|id| !in_use.contains(id));
    let mut leaving = in_use.iter().copied().filter(|id| *id < MAX_RULES && !kept.contains(id));
    let mut fresh = Vec::new();
    for rule_key in wanted {
        if let std::collections::hash_map::Entry::Vacant(slot) = of.entry(rule_key) {
            // Past MAX_RULES a rule still works; it is just not counted.
            let id = unused.next().or_else(|| leaving.next()).unwrap_or(MAX_RULES);
            slot.insert(id);
            if id < MAX_RULES {
                fresh.push(id);
            }
        }
    }
    Ids { of, fresh }
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
fn read_trie(map: &Map, v6: bool) -> Result<[HashMap<Prefix, PrefixRule>; 2]> {
    if v6 {
        read_tagged::<20>(map, v6)
    } else {
        read_tagged::<8>(map, v6)
    }
}

fn read_tagged<const K: usize>(map: &Map, v6: bool) -> Result<[HashMap<Prefix, PrefixRule>; 2]> {
    let hash: BpfHashMap<&MapData, [u8; K], PrefixRule> = BpfHashMap::try_from(map)?;
    let mut both = [HashMap::new(), HashMap::new()];
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

fn as_nets(entries: HashMap<Prefix, PrefixRule>) -> Result<Vec<(IpNet, PrefixRule)>> {
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

fn read_untagged(map: &Map, v6: bool) -> Result<HashMap<Prefix, PrefixRule>> {
    if v6 {
        untagged::<16>(map, v6)
    } else {
        untagged::<4>(map, v6)
    }
}

fn untagged<const N: usize>(map: &Map, v6: bool) -> Result<HashMap<Prefix, PrefixRule>> {
    let trie: LpmTrie<&MapData, [u8; N], PrefixRule> = LpmTrie::try_from(map)?;
    let mut entries = HashMap::new();
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
    let mut tries = Tries::new();
    for (&(_, v6, _), name) in TRIES.iter().zip(LEGACY_MAPS) {
        let path = pins.map(name);
        let map = Map::from_map_data(
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?,
        )?;
        tries.push(read_untagged(&map, v6)?);
    }
    Ok(Some(tries))
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
