//! Keeps tailgate's part of this host's tables as desired: writes what differs (one
//! `iptables-restore --noflush` per table), repairs what others changed, and undoes a start
//! that does not complete. Used by the iptables backend for everything, and by the BPF
//! backend for the one rule it still needs from netfilter (masquerade).

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use super::{
    exec::{Iptables, Variant},
    family_name,
    render::Rendered,
    sets::{self, Ipset, SetSpec, Staged},
    table::{self, Family, SavedTable, TableSpec},
};

pub struct Writer {
    pub ip: Iptables,
    /// The host's ipset, when it has one; prefix lists go into sets then.
    pub ipset: Option<Ipset>,
    /// The start of this instance's set names.
    set_prefix: String,
    /// What was last applied; repairs restore it.
    desired: Vec<TableSpec>,
    sets: Vec<SetSpec>,
    /// Whether tailgate's rules were already in force at start (kept by an earlier run).
    inherited: bool,
    /// tailgate's part of each table before the first write (to roll back to).
    before: Vec<TableSpec>,
    /// The first write's set changes and the sets it no longer needs: kept until the start
    /// commits (a roll-back puts the earlier run's sets back under its rules).
    pending: Staged,
    stale: Vec<String>,
    applied_once: bool,
    /// The nf_tables generation the tables were last found as desired at (nft variant).
    checked: Option<u32>,
    /// Each of our sets' header fingerprint (seed, size) as tailgate last wrote it: another
    /// set swapped in, or entries replaced, with the same count show there.
    seen: BTreeMap<String, (Option<String>, Option<u64>)>,
}

/// What a write or a repair rewrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Tables rewritten (`ipv4 filter`).
    pub tables: Vec<String>,
    /// Sets rebuilt (created, or swapped in).
    pub sets: Vec<String>,
    /// Whether the tables were read at all (a repair does not when the nft generation
    /// says nothing changed).
    pub read: bool,
}

impl Writer {
    pub fn new(ip: Iptables, ipset: Option<Ipset>, set_prefix: String) -> Self {
        Self {
            ip,
            ipset,
            set_prefix,
            desired: Vec::new(),
            sets: Vec::new(),
            inherited: false,
            before: Vec::new(),
            pending: Staged::default(),
            stale: Vec::new(),
            applied_once: false,
            checked: None,
            seen: BTreeMap::new(),
        }
    }

    pub fn inherited(&self) -> bool {
        self.inherited
    }

    /// Makes the tables and sets hold `desired`. On failure what was in force before stays
    /// in force (the tables this call already wrote are put back, the sets swapped back).
    pub fn apply(&mut self, desired: Rendered) -> Result<Written> {
        let first = !self.applied_once;
        if first {
            // The first write: remember what an earlier run left in force.
            self.before.clear();
            for (family, saved) in self.read_all(desired.tables.iter().map(|t| t.family))? {
                for spec in desired.tables.iter().filter(|t| t.family == family) {
                    let table = saved.get(&spec.table.name()).cloned().unwrap_or_default();
                    self.before.push(TableSpec::from_saved(spec.family, spec.table, &table));
                }
            }
            self.inherited = self.before.iter().any(|t| !t.chains.is_empty());
        }
        // Sets first: the rules written next refer to them. A start rebuilds every set (an
        // earlier run's may hold anything); a reload only those that changed.
        let headers = self.set_headers()?;
        let changed: Vec<&SetSpec> = desired
            .sets
            .iter()
            .filter(|s| match headers.get(&s.name) {
                None => true,
                Some(h) if !s.matches(h) => true,
                // A start keeps an earlier run's set (and its counters) that holds exactly
                // this list.
                Some(_) if first => !self.same_members(s),
                Some(h) => !self.sets.contains(s) || self.seen.get(&s.name) != Some(&owned(h.fingerprint())),
            })
            .collect();
        let staged = match &self.ipset {
            Some(ipset) => ipset.stage(&changed, &headers)?,
            None => Staged::default(),
        };
        let sets: Vec<String> = staged.names().cloned().collect();
        match self.sync_tracked(&desired.tables) {
            Ok(tables) => {
                if first {
                    // A roll-back only puts back the tables this start changed.
                    self.before.retain(|t| tables.contains(&name(t)));
                }
                let written = Written { tables, sets, read: true };
                // Our sets the rules no longer refer to, with staging copies of those a run
                // that stopped half-way left (a desired set's own is dealt with by `stage`).
                let wanted = |n: &str| {
                    let base = n.strip_suffix(sets::STAGING).unwrap_or(n);
                    desired.sets.iter().any(|s| s.name == base)
                };
                let stale: Vec<String> = headers
                    .keys()
                    .filter(|n| n.starts_with(&self.set_prefix) && sets::is_tailgate_set(n) && !wanted(n))
                    .cloned()
                    .collect();
                if let Some(ipset) = &self.ipset {
                    if first {
                        // One first write per start: nothing pending before it.
                        self.pending = staged;
                        self.stale = stale;
                    } else {
                        ipset.finish(staged);
                        if let Err(e) = ipset.destroy(&stale) {
                            tracing::warn!("ipset: {e:#}");
                        }
                    }
                }
                self.desired = desired.tables;
                self.sets = desired.sets;
                self.applied_once = true;
                self.remember_sets();
                Ok(written)
            }
            Err(e) => {
                // One table failed after others were written: put back what was in force.
                let restore = match (first, self.inherited) {
                    (true, true) => self.sync(&self.before).map(drop),
                    (true, false) => remove(&self.ip),
                    (false, _) => self.sync(&self.desired).map(drop),
                };
                if let Err(back) = restore {
                    tracing::error!("iptables: could not restore the previous rules: {back:#}");
                }
                if let Some(ipset) = &self.ipset {
                    ipset.undo(staged);
                }
                Err(e)
            }
        }
    }

    /// Restores what another program changed. Sets are checked by their headers (one
    /// `ipset list -t`); with the nft variant the tables are read only when the ruleset's
    /// generation moved since they were last found as desired.
    pub fn repair(&mut self) -> Result<Written> {
        let mut repaired = Written::default();
        // Sets first (the rules refer to them); a failure there does not keep the tables
        // from being repaired.
        let sets = self.repair_sets().map(|names| repaired.sets = names);
        let generation = self.generation();
        if generation.is_none() || generation != self.checked {
            repaired.read = true;
            let desired = std::mem::take(&mut self.desired);
            let synced = self.sync_tracked(&desired);
            self.desired = desired;
            repaired.tables = synced?;
        }
        sets.map(|()| repaired)
    }

    /// `sync`, noting the nf_tables generation at which the tables are known to be as
    /// desired: the one read before plus one per table written (one transaction each).
    /// Anything else moved it too (another program, meanwhile), and the next repair reads.
    fn sync_tracked(&mut self, desired: &[TableSpec]) -> Result<Vec<String>> {
        self.checked = None;
        let before = self.generation();
        let written = self.sync(desired)?;
        let after = self.generation();
        self.checked = match (before, after) {
            (Some(b), Some(a)) if a == b.wrapping_add(written.len() as u32) => Some(a),
            _ => None,
        };
        Ok(written)
    }

    /// Rebuilds the sets that differ from what was applied; returns their names. From the
    /// headers: missing, another type, another entry count, another seed or size than
    /// tailgate left (a set swapped in, entries replaced); the members only where the
    /// header has no entry count.
    fn repair_sets(&mut self) -> Result<Vec<String>> {
        let Some(ipset) = self.ipset.as_ref().filter(|_| !self.sets.is_empty()) else {
            return Ok(Vec::new());
        };
        let headers = ipset.headers()?;
        let mut differing = sets::differing(&self.sets, &headers);
        for set in &self.sets {
            let Some(header) = headers.get(&set.name) else { continue };
            let moved = self.seen.get(&set.name).is_some_and(|seen| *seen != owned(header.fingerprint()));
            let uncounted = header.entries.is_none();
            if !differing.contains(&set) && (moved || (uncounted && !self.same_members(set))) {
                differing.push(set);
            }
        }
        if differing.is_empty() {
            return Ok(Vec::new());
        }
        ipset.finish(ipset.stage(&differing, &headers)?);
        let names = differing.iter().map(|s| s.name.clone()).collect();
        self.remember_sets();
        Ok(names)
    }

    /// Whether the set in force under `set`'s name holds exactly its entries.
    fn same_members(&self, set: &SetSpec) -> bool {
        let Some(ipset) = &self.ipset else { return false };
        ipset.members(&set.name).is_ok_and(|members| set.same_members(&members))
    }

    /// Notes our sets' fingerprints as they are now (just written).
    fn remember_sets(&mut self) {
        let Some(ipset) = &self.ipset else { return };
        self.seen = match ipset.headers() {
            Ok(headers) => self
                .sets
                .iter()
                .filter_map(|s| Some((s.name.clone(), owned(headers.get(&s.name)?.fingerprint()))))
                .collect(),
            // Unknown: the next repair compares counts only.
            Err(_) => BTreeMap::new(),
        };
    }

    /// The nf_tables generation; `None` (read the tables) for legacy, or when it cannot be
    /// read.
    fn generation(&self) -> Option<u32> {
        match self.ip.generation()? {
            Ok(generation) => Some(generation),
            Err(e) => {
                tracing::debug!("nf_tables generation: {e:#}");
                None
            }
        }
    }

    /// A start stands: no roll-back from here on; a run with the other variant (nft <->
    /// legacy) left its rules in force with its policy: they go now that these are in force.
    pub fn commit(&mut self) -> Result<()> {
        self.before.clear();
        let other = match self.ip.variant {
            Variant::Nft => Variant::Legacy,
            Variant::Legacy => Variant::Nft,
        };
        if let Ok(ip) = Iptables::probe_quiet(other) {
            remove(&ip).with_context(|| format!("removing tailgate's iptables-{} rules", other.name()))?;
        }
        // After the other variant's rules: they may still refer to the stale sets.
        if let Some(ipset) = &self.ipset {
            ipset.finish(std::mem::take(&mut self.pending));
            if let Err(e) = ipset.destroy(&std::mem::take(&mut self.stale)) {
                tracing::warn!("ipset: {e:#}");
            }
        }
        Ok(())
    }

    /// Undoes a start: the rules (and sets) an earlier run left are put back as they were;
    /// without such rules, everything tailgate owns goes.
    pub fn roll_back(mut self) -> Result<()> {
        if !self.applied_once {
            // Nothing written (a failed first write restores by itself).
            return Ok(());
        }
        let rules = if self.inherited { self.sync(&self.before).map(drop) } else { remove(&self.ip) };
        if let Some(ipset) = &self.ipset {
            ipset.undo(std::mem::take(&mut self.pending));
        }
        rules
    }

    /// Removes everything tailgate owns from this variant's tables, then this instance's
    /// sets.
    pub fn remove(&self) -> Result<()> {
        remove(&self.ip)?;
        match &self.ipset {
            Some(ipset) => destroy_sets(ipset, |name| name.starts_with(&self.set_prefix)),
            None => Ok(()),
        }
    }

    /// Every set's header; none without ipset.
    fn set_headers(&self) -> Result<BTreeMap<String, sets::Header>> {
        match &self.ipset {
            Some(ipset) => ipset.headers(),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Every table of the families asked, one `iptables-save` per family.
    fn read_all(
        &self,
        families: impl Iterator<Item = Family>,
    ) -> Result<Vec<(Family, BTreeMap<&'static str, SavedTable>)>> {
        let mut families: Vec<Family> = families.collect();
        families.dedup();
        families
            .into_iter()
            .map(|family| {
                let text = self.ip.save_all(family)?;
                let tables = table::Table::ALL.map(|t| (t.name(), SavedTable::parse(&text, t.name())));
                Ok((family, tables.into_iter().collect()))
            })
            .collect()
    }

    /// Writes what differs between `desired` and the kernel; returns the tables written.
    fn sync(&self, desired: &[TableSpec]) -> Result<Vec<String>> {
        let mut written = Vec::new();
        for (family, saved) in self.read_all(desired.iter().map(|t| t.family))? {
            for spec in desired.iter().filter(|t| t.family == family) {
                let current = saved.get(&spec.table.name()).cloned().unwrap_or_default();
                if let Some(payload) = table::plan(spec, &current) {
                    self.ip.restore(spec.family, &payload)?;
                    written.push(name(spec));
                }
            }
        }
        Ok(written)
    }
}

fn owned((initval, memsize): (Option<&str>, Option<u64>)) -> (Option<String>, Option<u64>) {
    (initval.map(str::to_string), memsize)
}

fn name(spec: &TableSpec) -> String {
    format!("{} {}", family_name(spec.family), spec.table)
}

/// Destroys tailgate's sets that `which` picks (after the rules that used them are gone).
pub fn destroy_sets(ipset: &Ipset, which: impl Fn(&str) -> bool) -> Result<()> {
    let names: Vec<String> =
        ipset.headers()?.into_keys().filter(|n| sets::is_tailgate_set(n) && which(n)).collect();
    ipset.destroy(&names)
}

/// Removes everything tailgate owns from the tables of `ip` (hooks, `tg-*` chains, rules
/// with a tailgate comment, older versions' too). A chain a user-written jump still
/// refers to is flushed and left.
pub fn remove(ip: &Iptables) -> Result<()> {
    // Every table, even after one failed: leave as little behind as possible.
    let mut first_error = None;
    for (family, table) in ip.tables() {
        let empty = TableSpec { family, table, chains: Vec::new(), hooks: Vec::new() };
        let removed = ip.save(family, table, false).and_then(|text| {
            match table::plan(&empty, &SavedTable::parse(&text, table.name())) {
                Some(payload) => ip.restore(family, &payload),
                None => Ok(()),
            }
        });
        if let Err(e) = removed {
            tracing::error!("removing tailgate's rules from {} {table}: {e:#}", family_name(family));
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use super::*;
    use crate::{
        backend::iptables::{
            exec::Available,
            render::{render, Wiring},
            sets::{Ipset, Runner as _},
            standin::{IpsetStandIn, StandIn},
            table::{Family, Table},
        },
        config::Config,
        policy,
    };

    fn tables(toml: &str) -> Rendered {
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let state = policy::compile(
            &config,
            policy::System { uplinks: vec!["eth0".into()], tunnel_mtu: Some(1280), ..Default::default() },
        );
        // No ipset in these tests: prefix lists as rules.
        render(&state, Wiring { sets: None, ..Wiring::standard() }, &Available::all())
    }

    fn writer(standin: &Arc<StandIn>) -> Writer {
        Writer::new(
            Iptables::with_runner(Variant::Nft, Available::all(), standin.clone()),
            None,
            "tg-00000000".into(),
        )
    }

    fn ours(standin: &StandIn) -> Vec<String> {
        standin.dump().into_iter().filter(|l| l.contains("tailgate:") || l.contains(":tg-")).collect()
    }

    const USER_RULE: &str = "-s 10.0.0.0/8 -j ACCEPT";

    #[test]
    fn a_first_write_failing_half_way_leaves_nothing_and_keeps_the_users_rules() {
        let standin = Arc::new(StandIn::default());
        standin.append(Family::V4, Table::Filter, "INPUT", USER_RULE);
        *standin.fail.lock().unwrap() = Some((Family::V6, Table::Filter));
        let mut w = writer(&standin);
        assert!(w.apply(tables("")).is_err());
        *standin.fail.lock().unwrap() = None;
        assert_eq!(ours(&standin), Vec::<String>::new(), "the IPv4 tables written first were taken back");
        assert!(standin.dump().iter().any(|l| l.ends_with(USER_RULE)));
        w.roll_back().unwrap();
    }

    #[test]
    fn a_start_over_kept_rules_rolls_back_to_them_exactly() {
        let standin = Arc::new(StandIn::default());
        let mut earlier = writer(&standin);
        earlier.apply(tables("[cgnat]\nallow = [\"100.100.0.0/16\"]")).unwrap();
        let kept = standin.dump();

        // A new start writes another policy, then fails later on: its roll-back puts the
        // kept rules back as they were (hashes too, so the next start finds them as written).
        let mut start = writer(&standin);
        start.apply(tables("[mss]\nclamp = 1200\n[subnet_routes]\nmasquerade = false")).unwrap();
        assert!(start.inherited());
        assert_ne!(standin.dump(), kept);
        start.roll_back().unwrap();
        assert_eq!(standin.dump(), kept);

        // Same, when the new start's own write fails half-way.
        let mut start = writer(&standin);
        *standin.fail.lock().unwrap() = Some((Family::V6, Table::Filter));
        assert!(start.apply(tables("[cgnat]\nmode = \"off\"")).is_err());
        *standin.fail.lock().unwrap() = None;
        assert_eq!(standin.dump(), kept);
    }

    #[test]
    fn a_failed_reload_keeps_the_policy_in_force() {
        let standin = Arc::new(StandIn::default());
        let mut w = writer(&standin);
        w.apply(tables("")).unwrap();
        let before = standin.dump();
        *standin.fail.lock().unwrap() = Some((Family::V6, Table::Mangle));
        assert!(w.apply(tables("[mss]\nclamp = 1300\n[cgnat]\ndrop = [\"100.100.0.0/16\"]")).is_err());
        *standin.fail.lock().unwrap() = None;
        assert_eq!(standin.dump(), before, "the tables written before the failure are put back");
        // A repair finds nothing to do; a roll-back of a start without kept rules removes all.
        assert_eq!(w.repair().unwrap().tables, Vec::<String>::new());
        w.roll_back().unwrap();
        assert_eq!(ours(&standin), Vec::<String>::new());
    }

    #[test]
    fn a_repair_restores_what_another_program_flushed_and_a_roll_back_without_a_write_touches_nothing() {
        let standin = Arc::new(StandIn::default());
        let mut w = writer(&standin);
        w.apply(tables("")).unwrap();
        let applied = standin.dump();
        // Another program flushes mangle and deletes our chains.
        let other = Iptables::with_runner(Variant::Nft, Available::all(), standin.clone());
        let flush =
            "*mangle\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:tg-mss - [0:0]\n:tg-output - [0:0]\n\
                     -X tg-mss\n-X tg-output\nCOMMIT\n";
        other.restore(Family::V4, flush).unwrap();
        let saved = other.save(Family::V4, Table::Mangle, false).unwrap();
        assert!(!saved.contains("tailgate"), "{saved}");
        assert_eq!(w.repair().unwrap().tables, ["ipv4 mangle"]);
        assert_eq!(standin.dump(), applied, "hook and chain back");
        // Never applied: nothing to undo.
        writer(&standin).roll_back().unwrap();
        assert!(!ours(&standin).is_empty());
    }

    fn with_sets(toml: &str) -> Rendered {
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let state =
            policy::compile(&config, policy::System { uplinks: vec!["eth0".into()], ..Default::default() });
        render(&state, Wiring::standard(), &Available::all())
    }

    fn set_writer(standin: &Arc<StandIn>, sets: &Arc<IpsetStandIn>) -> Writer {
        let ip = Iptables::with_runner(Variant::Nft, Available::all(), standin.clone());
        Writer::new(ip, Some(Ipset::with_runner(sets.clone())), Wiring::standard().sets.unwrap())
    }

    /// Tables and sets with `policy` applied by a writer whose start committed.
    fn committed(policy: &str) -> (Arc<StandIn>, Arc<IpsetStandIn>, Writer) {
        let (standin, sets) = (Arc::new(StandIn::default()), Arc::new(IpsetStandIn::default()));
        let mut w = set_writer(&standin, &sets);
        w.apply(with_sets(policy)).unwrap();
        w.commit().unwrap();
        (standin, sets, w)
    }

    const POLICY_A: &str = "[cgnat]\nallow = [\"100.100.0.0/16\"]";
    const POLICY_B: &str = "[cgnat]\nallow = [\"100.101.0.0/16\"]\ndrop = [\"100.101.1.0/24\"]";

    #[test]
    fn a_reload_swaps_set_contents_under_the_same_names_and_a_failed_one_swaps_them_back() {
        let (standin, sets, mut w) = committed(POLICY_A);
        let a = sets.dump();
        assert_eq!(
            a.keys().map(|k| &k[12..]).collect::<Vec<_>>(),
            ["fwd4", "in4"],
            "IPv6 has no user prefix"
        );
        assert!(a.values().all(|m| m.iter().any(|e| e.starts_with("100.100.0.0/16 comment"))));
        let rules = standin.dump();

        // B: same rules, other contents, swapped in; nothing staged left.
        let written = w.apply(with_sets(POLICY_B)).unwrap();
        assert_eq!((written.sets.len(), written.tables.len()), (2, 0), "the two sets, no table");
        assert_eq!(standin.dump(), rules);
        let b = sets.dump();
        assert_eq!(b.keys().collect::<Vec<_>>(), a.keys().collect::<Vec<_>>());
        assert!(b.values().all(|m| m.iter().any(|e| e.starts_with("100.101.1.0/24 nomatch"))));

        // A reload that changes the rules too (another tunnel) and fails in IPv6 mangle:
        // rules and sets are B's again.
        *standin.fail.lock().unwrap() = Some((Family::V6, Table::Mangle));
        assert!(w.apply(with_sets(&format!("tunnel = \"wg0\"\n{POLICY_A}"))).is_err());
        *standin.fail.lock().unwrap() = None;
        assert_eq!(standin.dump(), rules);
        assert_eq!(sets.dump(), b);

        // A set that cannot be built changes nothing.
        *sets.fail.lock().unwrap() = Some("100.100.0.0/16".into());
        assert!(w.apply(with_sets(POLICY_A)).is_err());
        *sets.fail.lock().unwrap() = None;
        assert_eq!((standin.dump(), sets.dump()), (rules, b));

        // Back to the built-ins alone: the reference's rules, and the sets go.
        w.apply(with_sets("")).unwrap();
        assert!(sets.dump().is_empty());
        assert!(standin.dump().iter().any(|l| l.contains("builtin: CGNAT range")));
    }

    #[test]
    fn a_start_over_kept_sets_rolls_back_to_their_contents() {
        let (standin, sets, _earlier) = committed(POLICY_A);
        let kept = (standin.dump(), sets.dump());
        for next in [POLICY_B, ""] {
            let mut start = set_writer(&standin, &sets);
            start.apply(with_sets(next)).unwrap();
            assert_ne!((standin.dump(), sets.dump()), kept);
            start.roll_back().unwrap();
            assert_eq!((standin.dump(), sets.dump()), kept, "rolled back from {next:?}");
        }
        // A start that commits leaves no staged set behind.
        let mut start = set_writer(&standin, &sets);
        start.apply(with_sets(POLICY_B)).unwrap();
        start.commit().unwrap();
        assert!(sets.dump().keys().all(|n| !n.ends_with("-new")), "{:?}", sets.dump());
        // Stop: rules and this instance's sets go; another instance's stay.
        sets.restore("create tg-12345678-in4 hash:net family inet\n").unwrap();
        start.remove().unwrap();
        assert_eq!(sets.dump().into_keys().collect::<Vec<_>>(), ["tg-12345678-in4"]);
        assert_eq!(ours(&standin), Vec::<String>::new());
    }

    #[test]
    fn a_repair_reads_the_tables_only_when_the_generation_moved_and_rebuilds_a_flushed_set() {
        let (standin, sets, mut w) = committed(POLICY_A);
        let applied = (standin.dump(), sets.dump());
        // The write moved the generation by its own commits only: no repair reads.
        let reads = *standin.reads.lock().unwrap();
        for _ in 0..3 {
            assert_eq!(w.repair().unwrap(), Written::default());
        }
        assert_eq!(*standin.reads.lock().unwrap(), reads, "no table read while nothing changed");

        // Another program flushes a set: rebuilt, without reading the tables.
        let name = applied.1.keys().next().unwrap().clone();
        sets.restore(&format!("flush {name}\n")).unwrap();
        let repaired = w.repair().unwrap();
        assert_eq!((repaired.sets, repaired.read), (vec![name], false));
        assert_eq!(sets.dump(), applied.1);

        // Another program adds a rule anywhere: the tables are read, ours found as desired.
        standin.append(Family::V4, Table::Filter, "INPUT", USER_RULE);
        let repaired = w.repair().unwrap();
        assert!(repaired.read && repaired.tables.is_empty());
        assert!(!w.repair().unwrap().read, "read once per change");
        let applied = standin.dump();
        // Another program flushes a chain: read and rewritten, then quiet again.
        let other = Iptables::with_runner(Variant::Nft, Available::all(), standin.clone());
        other.restore(Family::V4, "*filter\n:tg-input - [0:0]\nCOMMIT\n").unwrap();
        assert_eq!(w.repair().unwrap().tables, ["ipv4 filter"]);
        assert_eq!(standin.dump(), applied);
        assert!(!w.repair().unwrap().read);
    }

    #[test]
    fn a_set_changed_with_the_same_count_is_found_by_its_header() {
        let (standin, sets, mut w) = committed(POLICY_A);
        let applied = sets.dump();
        assert_eq!(w.repair().unwrap().sets, Vec::<String>::new(), "our own write is not a change");
        // Another program flips the exemption to nomatch (`add -exist`, its comment gone):
        // the entry count stays, the size does not.
        for (_, members) in sets.sets.lock().unwrap().values_mut() {
            for m in members.iter_mut().filter(|m| m.starts_with("100.100.0.0/16 ")) {
                *m = "100.100.0.0/16 nomatch".into();
            }
        }
        assert_eq!(w.repair().unwrap().sets.len(), 2);
        assert_eq!(sets.dump(), applied);
        // Another set with as many entries swapped in: another seed.
        let name = applied.keys().next().unwrap().clone();
        let mut foreign = "create x hash:net family inet\n".to_string();
        for m in &applied[&name] {
            foreign += &format!("add x {m}\n");
        }
        sets.restore(&format!("{foreign}swap x {name}\ndestroy x\n")).unwrap();
        assert_eq!(w.repair().unwrap().sets, [name]);
        assert_eq!(w.repair().unwrap().sets, Vec::<String>::new());
        // A start over sets that hold its lists keeps them (and their counters).
        let mut again = set_writer(&standin, &sets);
        let written = again.apply(with_sets(POLICY_A)).unwrap();
        assert_eq!(written.sets, Vec::<String>::new());
    }
}
