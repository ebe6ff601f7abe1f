//! Map sync for CGNAT filtering: makes the four LPM tries hold exactly the desired rules.
//!
//! Each (trie, prefix, verdict) keeps its rule id, and so its hit counter, for as long as it
//! stays in the policy; new rules get the lowest free id with a zeroed counter. Ids live
//! only in the maps, so they survive daemon restarts with the pinned maps. Updates are
//! per-key atomic and ordered insert-then-delete: a reload never opens a gap.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, Result};
use aya::{
    maps::{lpm_trie::Key, LpmTrie, MapData, PerCpuArray, PerCpuValues},
    Ebpf,
};
use ipnet::IpNet;
use tailgate_abi::{
    cgnat::{PrefixRule, MAP_FWD_V4, MAP_FWD_V6, MAP_IN_V4, MAP_IN_V6},
    verdict, MAP_RULE_HITS, MAX_RULES,
};

use crate::policy::{CgnatRules, Rule, Verdict};

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// Rule ids not used by any trie entry.
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn allocate(&mut self) -> Option<u32> {
        while self.next < MAX_RULES {
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }

    fn free(&mut self, id: u32) {
        if self.used.remove(&id) {
            self.next = self.next.min(id);
        }
    }
}

pub fn sync(ebpf: &mut Ebpf, rules: &CgnatRules) -> Result<SyncReport> {
    let (in_v4, in_v6) = split_families(&rules.inbound);
    let (fwd_v4, fwd_v6) = split_families(&rules.forward);
    let mut ids = IdAllocator { used: BTreeSet::new(), next: 0 };
    for name in [MAP_IN_V4, MAP_FWD_V4] {
        ids.used.extend(read::<4>(ebpf, name)?.values().map(|r| r.rule_id));
    }
    for name in [MAP_IN_V6, MAP_FWD_V6] {
        ids.used.extend(read::<16>(ebpf, name)?.values().map(|r| r.rule_id));
    }
    let mut report = SyncReport::default();
    sync_trie(ebpf, MAP_IN_V4, in_v4, &mut ids, &mut report)?;
    sync_trie(ebpf, MAP_IN_V6, in_v6, &mut ids, &mut report)?;
    sync_trie(ebpf, MAP_FWD_V4, fwd_v4, &mut ids, &mut report)?;
    sync_trie(ebpf, MAP_FWD_V6, fwd_v6, &mut ids, &mut report)?;
    Ok(report)
}

type Entries<const N: usize> = HashMap<(u32, [u8; N]), u32>;

fn split_families(rules: &[Rule]) -> (Entries<4>, Entries<16>) {
    let mut v4 = HashMap::new();
    let mut v6 = HashMap::new();
    for rule in rules {
        let verdict = match rule.verdict {
            Verdict::Pass => verdict::PASS,
            Verdict::Drop => verdict::DROP,
        };
        let len = u32::from(rule.prefix.prefix_len());
        match rule.prefix {
            IpNet::V4(net) => v4.insert((len, net.network().octets()), verdict),
            IpNet::V6(net) => v6.insert((len, net.network().octets()), verdict),
        };
    }
    (v4, v6)
}

/// Current entries of a trie.
pub fn read<const N: usize>(ebpf: &Ebpf, name: &str) -> Result<HashMap<(u32, [u8; N]), PrefixRule>> {
    let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
    let trie: LpmTrie<&MapData, [u8; N], PrefixRule> = LpmTrie::try_from(map)?;
    read_trie(&trie)
}

pub fn read_trie<const N: usize>(
    trie: &LpmTrie<&MapData, [u8; N], PrefixRule>,
) -> Result<HashMap<(u32, [u8; N]), PrefixRule>> {
    let mut entries = HashMap::new();
    for item in trie.iter() {
        let (key, rule) = item?;
        entries.insert((key.prefix_len(), key.data()), rule);
    }
    Ok(entries)
}

fn sync_trie<const N: usize>(
    ebpf: &mut Ebpf,
    name: &str,
    desired: Entries<N>,
    ids: &mut IdAllocator,
    report: &mut SyncReport,
) -> Result<()> {
    let current = read::<N>(ebpf, name)?;
    let mut inserts = Vec::new();
    for (key, verdict) in &desired {
        match current.get(key) {
            Some(rule) if rule.verdict == *verdict => report.unchanged += 1,
            _ => {
                // Past MAX_RULES rules a rule still works, it is just not counted.
                let rule_id = ids.allocate().unwrap_or(MAX_RULES);
                inserts.push((*key, PrefixRule { verdict: *verdict, rule_id }));
            }
        }
    }
    zero_counters(ebpf, inserts.iter().map(|(_, r)| r.rule_id))?;

    let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
    let mut trie: LpmTrie<&mut MapData, [u8; N], PrefixRule> = LpmTrie::try_from(map)?;
    for ((len, addr), rule) in &inserts {
        trie.insert(&Key::new(*len, *addr), *rule, 0).with_context(|| format!("inserting into {name}"))?;
    }
    report.added += inserts.len();
    for (key, rule) in &current {
        let replaced = inserts.iter().any(|(k, _)| k == key);
        if replaced || !desired.contains_key(key) {
            if !replaced {
                trie.remove(&Key::new(key.0, key.1)).with_context(|| format!("removing from {name}"))?;
                report.removed += 1;
            }
            ids.free(rule.rule_id);
        }
    }
    Ok(())
}

fn zero_counters(ebpf: &mut Ebpf, ids: impl Iterator<Item = u32>) -> Result<()> {
    let map = ebpf.map_mut(MAP_RULE_HITS).context("map RULE_HITS missing")?;
    let mut hits: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(map)?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    for id in ids.filter(|id| *id < MAX_RULES) {
        hits.set(id, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
    }
    Ok(())
}
