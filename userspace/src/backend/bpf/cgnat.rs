//! Map sync for CGNAT filtering: makes the four LPM tries hold exactly the desired rules.
//!
//! A rule (prefix + verdict) has one id, and so one hit counter, wherever it appears
//! (inbound and forward), kept for as long as the rule stays in the policy. New rules get
//! the lowest free id with a zeroed counter; when a reload replaces so much of the policy
//! that no id is free, a new rule takes the id of a rule this same sync removes. Ids live
//! only in the maps, so they survive restarts with the pinned maps.
//!
//! Updates are per-key atomic and ordered insert-then-delete (the tries have room for two
//! whole policies): a reload never leaves a prefix without a rule of the old or new policy.

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

/// What a sync changed, in trie entries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// A trie key in one shape for both families: (IPv6?, prefix length, address bytes).
type Prefix = (bool, u32, [u8; 16]);
/// Trie name → prefix → verdict or rule.
type Tries<T> = Vec<(&'static str, HashMap<Prefix, T>)>;

const TRIES: [(&str, bool); 4] =
    [(MAP_IN_V4, false), (MAP_IN_V6, true), (MAP_FWD_V4, false), (MAP_FWD_V6, true)];

pub fn sync(ebpf: &mut Ebpf, rules: &CgnatRules) -> Result<SyncReport> {
    let desired: Tries<u32> = TRIES
        .iter()
        .map(|&(name, _)| {
            let list = if name == MAP_IN_V4 || name == MAP_IN_V6 { &rules.inbound } else { &rules.forward };
            (name, entries(list, name == MAP_IN_V6 || name == MAP_FWD_V6))
        })
        .collect();
    let current: Tries<PrefixRule> =
        TRIES.iter().map(|&(name, v6)| Ok((name, read_any(ebpf, name, v6)?))).collect::<Result<_>>()?;

    let ids = assign_ids(&desired, &current);
    zero_counters(ebpf, ids.fresh.iter().copied())?;

    let mut report = SyncReport::default();
    for ((name, want), (_, have)) in desired.iter().zip(&current) {
        let v6 = name == &MAP_IN_V6 || name == &MAP_FWD_V6;
        let mut writes = Vec::new();
        for (prefix, verdict) in want {
            let rule = PrefixRule { verdict: *verdict, rule_id: ids.of[&(*prefix, *verdict)] };
            if have.get(prefix) == Some(&rule) {
                report.unchanged += 1;
            } else {
                writes.push((*prefix, rule));
            }
        }
        let stale: Vec<Prefix> = have.keys().filter(|p| !want.contains_key(*p)).copied().collect();
        report.added += writes.len();
        report.removed += stale.len();
        if v6 {
            apply::<16>(ebpf, name, &writes, &stale)?;
        } else {
            apply::<4>(ebpf, name, &writes, &stale)?;
        }
    }
    Ok(report)
}

fn entries(rules: &[Rule], v6: bool) -> HashMap<Prefix, u32> {
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

fn assign_ids(desired: &Tries<u32>, current: &Tries<PrefixRule>) -> Ids {
    let wanted: BTreeSet<(Prefix, u32)> =
        desired.iter().flat_map(|(_, t)| t.iter().map(|(p, v)| (*p, *v))).collect();
    let mut of: HashMap<(Prefix, u32), u32> = HashMap::new();
    let mut in_use = BTreeSet::new();
    for (_, trie) in current {
        for (prefix, rule) in trie {
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

fn apply<const N: usize>(
    ebpf: &mut Ebpf,
    name: &str,
    writes: &[(Prefix, PrefixRule)],
    stale: &[Prefix],
) -> Result<()> {
    let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
    let mut trie: LpmTrie<&mut MapData, [u8; N], PrefixRule> = LpmTrie::try_from(map)?;
    let key = |(_, len, addr): &Prefix| Key::new(*len, addr[..N].try_into().expect("address width"));
    for (prefix, rule) in writes {
        trie.insert(&key(prefix), *rule, 0).with_context(|| format!("inserting into {name}"))?;
    }
    for prefix in stale {
        trie.remove(&key(prefix)).with_context(|| format!("removing from {name}"))?;
    }
    Ok(())
}

fn read_any(ebpf: &Ebpf, name: &str, v6: bool) -> Result<HashMap<Prefix, PrefixRule>> {
    let widen = |len: u32, bytes: &[u8]| {
        let mut addr = [0u8; 16];
        addr[..bytes.len()].copy_from_slice(bytes);
        (v6, len, addr)
    };
    Ok(if v6 {
        read::<16>(ebpf, name)?.into_iter().map(|((len, a), r)| (widen(len, &a), r)).collect()
    } else {
        read::<4>(ebpf, name)?.into_iter().map(|((len, a), r)| (widen(len, &a), r)).collect()
    })
}

/// Current entries of a trie.
pub fn read<const N: usize>(ebpf: &Ebpf, name: &str) -> Result<HashMap<(u32, [u8; N]), PrefixRule>> {
    let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
    let trie: LpmTrie<&MapData, [u8; N], PrefixRule> = LpmTrie::try_from(map)?;
    let mut entries = HashMap::new();
    for item in trie.iter() {
        let (key, rule) = item?;
        entries.insert((key.prefix_len(), key.data()), rule);
    }
    Ok(entries)
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
