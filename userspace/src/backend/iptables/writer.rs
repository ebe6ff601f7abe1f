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
