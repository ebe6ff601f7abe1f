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
    maps::{Array, ArrayOfMaps, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    Ebpf,
};
use ipnet::IpNet;
use tailgate_abi::{
    cgnat::{
        plan_index, FamilyPlan, Plan, PrefixRule, Shape, Slot4, Slot6, FORWARD, INBOUND, LEGACY_MAPS,
        MAP_FWD_V4, MAP_FWD_V6, MAP_IN_V4, MAP_IN_V6, MAP_PLAN, MAX_PROBE, MAX_SLOTS, TABLE_FLAGS,
    },
    verdict, MAP_RULE_HITS, MAX_RULES,
};

use super::{
    cgnat_plan,
    cgnat_table::{self as table, Slot},
    generation::GenerationWriter,
    mapped::Mapped,
};
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

/// The four prefix maps: (name, IPv6?, inbound?). Each holds a table per generation.
const PREFIX_MAPS: [(&str, bool, bool); 4] = [
    (MAP_IN_V4, false, true),
    (MAP_IN_V6, true, true),
    (MAP_FWD_V4, false, false),
    (MAP_FWD_V6, true, false),
];

/// The map names: the prefix maps, then the plans.
pub fn map_names() -> impl Iterator<Item = &'static str> {
    PREFIX_MAPS.into_iter().map(|(name, _, _)| name).chain([MAP_PLAN])
}

/// Per prefix map (in `PREFIX_MAPS` order): prefix → rule. Shared (`Arc`) between the
/// generations that hold the same content, so the daemon keeps one copy of the policy.
pub type Prefixes = Arc<PrefixSet>;
pub type PrefixSet = Vec<PrefixMap<PrefixRule>>;

/// The CGNAT maps of both generations. What each generation holds is read from the maps
/// once (they may come pinned from an earlier run) and then kept in step with every write,
/// so a change writes what it changes and reads no map.
pub struct CgnatMaps {
    /// Per generation; `None` until read, and again after a write failed half-way.
    held: [Option<Prefixes>; 2],
    /// Per generation, per prefix map (`PREFIX_MAPS` order): the table the outer map points to.
    tables: [[Option<Table>; 4]; 2],
    /// What the change being written wants, ids assigned.
    desired: Prefixes,
    /// The plans of `desired`, without the table fields (each generation's tables fill them).
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
    from: Prefixes,
    changes: Changes,
    unchanged: usize,
}

impl Default for CgnatMaps {
    fn default() -> Self {
        Self {
            held: [None, None],
            tables: Default::default(),
            desired: Prefixes::default(),
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
        for generation in 0..2 {
            if self.held[generation].is_none() {
                let (sets, tables) = read_generation_tables(ebpf, generation as u32)?;
                self.held[generation] = Some(Arc::new(sets));
                self.tables[generation] = tables;
            }
        }
        // Both generations normally hold one shared content: look there once.
        let base = match &self.held {
            [Some(a), Some(b)] if Arc::ptr_eq(a, b) => Some(a.clone()),
            _ => None,
        };
        let held: Vec<&PrefixSet> = match &base {
            Some(base) => vec![&**base],
            None => self.held.iter().flatten().map(|t| &**t).collect(),
        };
        let mut ids = Ids::new(&held);
        let mut desired = Vec::with_capacity(PREFIX_MAPS.len());
        let mut changes: Changes = Vec::with_capacity(PREFIX_MAPS.len());
        // Rules no generation holds: (map, prefix, verdict). They get ids once every kept
        // id is known, so an id taken from a leaving rule is never one that stays.
        let mut new_rules = Vec::new();
        let mut unchanged = 0;
        for (t, &(_, v6, inbound)) in PREFIX_MAPS.iter().enumerate() {
            let list = if inbound { &rules.inbound } else { &rules.forward };
            // The same family's map of the other direction: a rule shares its id there.
            let other = t ^ 2;
            let mut content = PrefixMap::with_capacity_and_hasher(list.len(), Default::default());
            let mut writes = Vec::new();
            for (prefix, verdict) in entries(list, v6) {
                let held_rule = |map: usize| {
                    held.iter().find_map(|sets| sets[map].get(&prefix)).filter(|r| r.verdict == verdict)
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
                        content.insert(prefix, *rule);
                    }
                    _ => new_rules.push((t, prefix, verdict)),
                }
            }
            changes.push((writes, Vec::new()));
            desired.push(content);
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
    pub fn held(&self, generation: u32) -> Option<Prefixes> {
        self.held[generation as usize & 1].clone()
    }

    /// Prepares writing back a content read earlier with `held` (ids and all).
    pub fn restore(&mut self, content: Prefixes) {
        self.plans = plans(&content);
        self.desired = content;
        self.delta = None;
        self.report = None;
    }
}

impl GenerationWriter for CgnatMaps {
    fn write(&mut self, ebpf: &mut Ebpf, generation: u32) -> Result<usize> {
        let g = generation as usize & 1;
        let held = match self.held[g].take() {
            Some(held) => held,
            None => {
                let (sets, tables) = read_generation_tables(ebpf, generation)?;
                self.tables[g] = tables;
                Arc::new(sets)
            }
        };
        let mut report = SyncReport::default();
        if Arc::ptr_eq(&held, &self.desired) {
            // This generation already holds exactly this (the common second write).
            report.unchanged = held.iter().map(|content| content.len()).sum();
            self.held[g] = Some(held);
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
        for (t, (&(name, v6, _), (writes, stale))) in PREFIX_MAPS.iter().zip(changes).enumerate() {
            report.added += writes.len();
            report.removed += stale.len();
            // On failure `held` stays unknown: the next change reads the maps again.
            let held_table = self.tables[g][t].take();
            let want = &self.desired[t];
            let written = if v6 {
                write_table::<Slot6>(ebpf, name, generation, held_table, want, writes, stale)?
            } else {
                write_table::<Slot4>(ebpf, name, generation, held_table, want, writes, stale)?
            };
            self.tables[g][t] = Some(written);
        }
        // The plans last: they only say where to look.
        let plans = self.plans_of(g);
        let written = write_plans(ebpf, generation, &plans)?;
        self.held[g] = Some(self.desired.clone());
        self.report.get_or_insert(report);
        Ok(report.added + report.removed + written)
    }
}

impl CgnatMaps {
    /// The plans of `desired` over the tables generation `g` has.
    fn plans_of(&self, g: usize) -> [Plan; 2] {
        let mut plans = self.plans;
        // PREFIX_MAPS order: in v4, in v6, fwd v4, fwd v6.
        for (d, plan) in plans.iter_mut().enumerate() {
            with_table(&mut plan.v4, self.tables[g][2 * d].as_ref());
            with_table(&mut plan.v6, self.tables[g][2 * d + 1].as_ref());
        }
        plans
    }
}

fn with_table<const A: usize, const L: usize>(plan: &mut FamilyPlan<A, L>, table: Option<&Table>) {
    if let Some(table) = table {
        plan.table = Shape::pack(table.capacity.trailing_zeros(), table.longest);
    }
}

/// One generation's table of one prefix map: an inner map of the map's array-of-maps.
pub struct Table {
    map: MapData,
    capacity: u32,
    /// The longest probe it needs (`table::longest_run`).
    longest: u32,
}

/// Makes generation `generation`'s table of prefix map `name` hold `want`: in place when the
/// table it has suits the new size (applying `stale` and `writes`, nobody reads it), else a
/// new table sized to `want`, put into the outer map.
fn write_table<S: Slot>(
    ebpf: &mut Ebpf,
    name: &str,
    generation: u32,
    held: Option<Table>,
    want: &PrefixMap<PrefixRule>,
    writes: &[(Prefix, PrefixRule)],
    stale: &[Prefix],
) -> Result<Table> {
    if let Some(mut held) = held.filter(|t| table::suits(t.capacity, want.len())) {
        let mut mapped =
            mapped::<S>(&held.map, true).with_context(|| format!("mapping a table of {name}"))?;
        let slots = mapped.elements_mut();
        for prefix in stale {
            table::remove(slots, prefix);
        }
        // Removals only shorten runs: the longest known stays an upper bound.
        let longest = table::fill(slots, writes.iter().map(|(p, r)| (p, r)));
        if let Some(longest) = longest.map(|l| l.max(held.longest)).filter(|&l| l <= MAX_PROBE) {
            held.longest = longest;
            return Ok(held);
        }
        // Runs grew too long: a larger table, built whole.
    }
    let mut capacity = table::capacity_for(want.len());
    loop {
        let map = create_table::<S>(name, generation, capacity)?;
        let mut mapped = mapped::<S>(&map, true).with_context(|| format!("mapping a new table of {name}"))?;
        let slots = mapped.elements_mut();
        let longest = table::fill(slots, want);
        drop(mapped);
        if let Some(longest) = longest.filter(|&l| l <= MAX_PROBE) {
            let outer = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
            let mut outer: ArrayOfMaps<&mut MapData, MapData> = ArrayOfMaps::try_from(outer)?;
            outer.set(generation, &map, 0).with_context(|| format!("installing a table of {name}"))?;
            return Ok(Table { map, capacity, longest });
        }
        if capacity >= MAX_SLOTS {
            anyhow::bail!(
                "{name}: {} prefixes do not fit a table of {MAX_SLOTS} slots with probes of at most \
                 {MAX_PROBE} slots",
                want.len()
            );
        }
        capacity *= 2;
    }
}

/// A new, empty table (`BPF_F_MMAPABLE` array) of `capacity` slots.
fn create_table<S: Slot>(name: &str, generation: u32, capacity: u32) -> Result<MapData> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let def =
        aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, size_of::<S>() as u32, capacity, TABLE_FLAGS);
    let label = format!("{}_g{generation}", name.to_lowercase());
    MapData::create(def, &label, None)
        .with_context(|| format!("creating a table of {capacity} slots for {name}"))
}

/// A slot table mapped into this process (see `mapped`); refuses one whose size is not a
/// power of two (the lookup masks the hash).
fn mapped<S: Slot>(map: &MapData, writable: bool) -> Result<Mapped<S>> {
    let capacity = map.info()?.max_entries();
    anyhow::ensure!(capacity.is_power_of_two(), "table has {capacity} slots, expected a power of two");
    Mapped::new(map, writable)
}

/// The table generation `generation` of an outer map points to, if any.
fn inner_table(outer: &Map, generation: u32) -> Result<Option<MapData>> {
    let outer: ArrayOfMaps<&MapData, MapData> = ArrayOfMaps::try_from(outer)?;
    match outer.get(&(generation & 1), 0) {
        Ok(map) => Ok(Some(map)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// What one table holds, and the table.
fn read_table<S: Slot>(outer: &Map, generation: u32) -> Result<(PrefixMap<PrefixRule>, Option<Table>)> {
    let Some(map) = inner_table(outer, generation)? else { return Ok((PrefixMap::default(), None)) };
    let mapped = mapped::<S>(&map, false)?;
    let slots = mapped.elements();
    let (entries, capacity, longest) = (table::read(slots), slots.len() as u32, table::longest_run(slots));
    drop(mapped);
    Ok((entries, Some(Table { map, capacity, longest })))
}

/// What generation `generation`'s tables hold, and the tables.
fn read_generation_tables(ebpf: &Ebpf, generation: u32) -> Result<(PrefixSet, [Option<Table>; 4])> {
    let mut sets = PrefixSet::new();
    let mut tables: [Option<Table>; 4] = Default::default();
    for (t, &(name, v6, _)) in PREFIX_MAPS.iter().enumerate() {
        let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
        let (entries, table) =
            if v6 { read_table::<Slot6>(map, generation) } else { read_table::<Slot4>(map, generation) }
                .with_context(|| format!("reading {name}"))?;
        sets.push(entries);
        tables[t] = table;
    }
    Ok((sets, tables))
}

/// What turns `have` into `want`, per prefix map.
#[allow(clippy::type_complexity)]
fn diff(
    want: &PrefixSet,
    have: &PrefixSet,
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

/// The plans of the inbound and forward directions of `sets`.
pub fn plans(sets: &Prefixes) -> [Plan; 2] {
    // PREFIX_MAPS order: in v4, in v6, fwd v4, fwd v6.
    let plan = |v4, v6| Plan { v4: cgnat_plan::family(&sets[v4]), v6: cgnat_plan::family(&sets[v6]) };
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
    fn new(held: &[&PrefixSet]) -> Self {
        let mut in_use = vec![false; MAX_RULES as usize];
        for rule in held.iter().flat_map(|sets| sets.iter().flat_map(|content| content.values())) {
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

/// The rules of generation `generation` in a prefix map (pinned or loaded), as prefixes.
pub fn rules(map: &Map, v6: bool, generation: u32) -> Result<Vec<(IpNet, PrefixRule)>> {
    as_nets(read_one(map, v6, generation)?)
}

fn read_one(map: &Map, v6: bool, generation: u32) -> Result<PrefixMap<PrefixRule>> {
    Ok(if v6 { read_table::<Slot6>(map, generation)?.0 } else { read_table::<Slot4>(map, generation)?.0 })
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
pub fn legacy_policy(pins: &super::Pins) -> Result<Option<Prefixes>> {
    if !pins.map(LEGACY_MAPS[0]).exists() {
        return Ok(None);
    }
    // LEGACY_MAPS is in PREFIX_MAPS order.
    let mut tries = PrefixSet::new();
    for (&(_, v6, _), name) in PREFIX_MAPS.iter().zip(LEGACY_MAPS) {
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
    Ok(read_one(map, N == 16, generation)?
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
