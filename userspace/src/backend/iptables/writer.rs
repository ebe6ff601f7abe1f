//! Keeps tailgate's part of this host's tables as desired: writes what differs (one
//! `iptables-restore --noflush` per table), repairs what others changed, and undoes a start
//! that does not complete. Used by the iptables backend for everything, and by the BPF
//! backend for the one rule it still needs from netfilter (masquerade).

use anyhow::{Context, Result};

use super::{
    exec::{Iptables, Variant},
    family_name,
    table::{self, SavedTable, TableSpec},
};

pub struct Writer {
    pub ip: Iptables,
    /// What was last applied; repairs restore it.
    desired: Vec<TableSpec>,
    /// Whether tailgate's rules were already in force at start (kept by an earlier run).
    inherited: bool,
    /// tailgate's part of each table before the first write (to roll back to).
    before: Vec<TableSpec>,
    applied_once: bool,
}

impl Writer {
    pub fn new(ip: Iptables) -> Self {
        Self { ip, desired: Vec::new(), inherited: false, before: Vec::new(), applied_once: false }
    }

    pub fn inherited(&self) -> bool {
        self.inherited
    }

    /// Makes the tables hold `desired`. On failure the rules in force before stay in force
    /// (the tables this call already wrote are put back).
    pub fn apply(&mut self, desired: Vec<TableSpec>) -> Result<Vec<String>> {
        let first = !self.applied_once;
        if first {
            // The first write: remember what an earlier run left in force.
            self.before.clear();
            for spec in &desired {
                let saved = self.read(spec)?;
                self.before.push(TableSpec::from_saved(spec.family, spec.table, &saved));
            }
            self.inherited = self.before.iter().any(|t| !t.chains.is_empty());
        }
        match self.sync(&desired) {
            Ok(written) => {
                if first {
                    // A roll-back only puts back the tables this start changed.
                    self.before.retain(|t| written.contains(&name(t)));
                }
                self.desired = desired;
                self.applied_once = true;
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
                Err(e)
            }
        }
    }

    /// Restores what another program changed; returns the tables rewritten.
    pub fn repair(&mut self) -> Result<Vec<String>> {
        self.sync(&self.desired)
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
        Ok(())
    }

    /// Undoes a start: the rules an earlier run left are put back as they were; without
    /// such rules, everything tailgate owns goes.
    pub fn roll_back(&self) -> Result<()> {
        if !self.applied_once {
            // Nothing written (a failed first write restores by itself).
            return Ok(());
        }
        if !self.inherited {
            return remove(&self.ip);
        }
        self.sync(&self.before)?;
        Ok(())
    }

    /// Removes everything tailgate owns from this variant's tables.
    pub fn remove(&self) -> Result<()> {
        remove(&self.ip)
    }

    fn read(&self, spec: &TableSpec) -> Result<SavedTable> {
        let text = self.ip.save(spec.family, spec.table, false)?;
        Ok(SavedTable::parse(&text, spec.table.name()))
    }

    /// Writes what differs between `desired` and the kernel; returns the tables written.
    fn sync(&self, desired: &[TableSpec]) -> Result<Vec<String>> {
        let mut written = Vec::new();
        for spec in desired {
            if let Some(payload) = table::plan(spec, &self.read(spec)?) {
                self.ip.restore(spec.family, &payload)?;
                written.push(name(spec));
            }
        }
        Ok(written)
    }
}

fn name(spec: &TableSpec) -> String {
    format!("{} {}", family_name(spec.family), spec.table)
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
            standin::StandIn,
            table::{Family, Table},
        },
        config::Config,
        policy,
    };

    fn tables(toml: &str) -> Vec<TableSpec> {
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let state = policy::compile(
            &config,
            policy::System { uplinks: vec!["eth0".into()], tunnel_mtu: Some(1280), ..Default::default() },
        );
        render(&state, Wiring { divert: true, first: false }, &Available::all())
    }

    fn writer(standin: &Arc<StandIn>) -> Writer {
        Writer::new(Iptables::with_runner(Variant::Nft, Available::all(), standin.clone()))
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
        assert_eq!(w.repair().unwrap(), Vec::<String>::new());
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
        assert_eq!(w.repair().unwrap(), ["ipv4 mangle"]);
        assert_eq!(standin.dump(), applied, "hook and chain back");
        // Never applied: nothing to undo.
        writer(&standin).roll_back().unwrap();
        assert!(!ours(&standin).is_empty());
    }
}
