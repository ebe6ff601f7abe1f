//! The iptables backend: the same policy as the BPF datapath, enforced with netfilter.
//! Used when BPF cannot be (`backend = "auto"`), or when asked (`backend = "iptables"`).

pub mod bypass;
pub mod cgnat;
pub mod exec;
pub mod table;

use std::time::Duration;

use anyhow::{bail, Context, Result};

use self::{
    cgnat::Wiring,
    exec::{Iptables, Variant},
    table::{Family, SavedTable, TableSpec},
};
use super::Backend;
use crate::{
    lock::{self, Lock},
    policy::DesiredState,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Insert jumps from INPUT/FORWARD/POSTROUTING (where missing). `false`: the user wires
    /// the chains in; tailgate inserts no jump and never deletes one it did not write.
    pub divert: bool,
    /// Keep the jumps first (a repair moves them back on top).
    pub hook_first: bool,
    /// Force a variant; `None` picks the one the host already uses.
    pub variant: Option<Variant>,
    /// How often the rules are read back and repaired.
    pub repair_interval: Duration,
}

pub struct IptablesBackend {
    ip: Iptables,
    opts: Options,
    /// What was last applied; repairs restore it.
    desired: Vec<TableSpec>,
    tunnel: String,
    /// Rules of others that bypass tailgate, as last reported.
    bypasses: Vec<String>,
    /// Whether tailgate's rules were already in force at start (kept by an earlier run).
    inherited: bool,
    /// tailgate's part of each table before the first write (to roll back to).
    before: Vec<TableSpec>,
    /// One writer of tailgate's chains per network namespace.
    _netns: Lock,
}

impl IptablesBackend {
    /// Takes this network namespace's iptables lock (refusing to start if another daemon
    /// holds it) and probes iptables.
    pub fn new(opts: Options) -> Result<Self> {
        let netns = match Lock::try_acquire(&lock::netns_path()?)? {
            Ok(lock) => lock,
            Err(held) => bail!(
                "another tailgate (PID {}) enforces with iptables in this network namespace; stop it first",
                held.pid
            ),
        };
        let ip = Iptables::probe(opts.variant).context("iptables backend")?;
        tracing::info!(
            "iptables-{} (IPv6 filter: {}, IPv6 nat: {}), divert: {}",
            ip.variant.name(),
            yes(ip.available.v6_filter),
            yes(ip.available.v6_nat),
            opts.divert
        );
        Ok(Self {
            ip,
            opts,
            desired: Vec::new(),
            tunnel: String::new(),
            bypasses: Vec::new(),
            inherited: false,
            before: Vec::new(),
            _netns: netns,
        })
    }

    /// Writes what differs between `desired` and the kernel; returns the tables written.
    fn sync(&self, desired: &[TableSpec]) -> Result<Vec<String>> {
        let mut written = Vec::new();
        for spec in desired {
            let saved = SavedTable::parse(&self.ip.save(spec.family, spec.table, false)?, spec.table);
            if let Some(payload) = table::plan(spec, &saved) {
                self.ip.restore(spec.family, &payload)?;
                written.push(format!("{} {}", family_name(spec.family), spec.table));
            }
        }
        Ok(written)
    }

    /// Logs rules of others that now bypass tailgate (once per change).
    fn check_bypasses(&mut self) {
        let found = match bypasses(&self.ip, &self.tunnel) {
            Ok(found) => found,
            Err(e) => return tracing::warn!("reading the filter tables: {e:#}"),
        };
        if found != self.bypasses {
            for rule in found.iter().filter(|r| !self.bypasses.contains(r)) {
                tracing::warn!(
                    "{rule} comes before tailgate's hook and can accept what tailgate drops \
                     (set [iptables] hook_position = \"first\" to keep tailgate on top)"
                );
            }
            self.bypasses = found;
        }
    }
}

/// Rules above tailgate's hooks, in every filter table, that can accept what it drops.
pub fn bypasses(ip: &Iptables, tunnel: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for (family, table) in ip.tables().filter(|(_, t)| *t == "filter") {
        let saved = SavedTable::parse(&ip.save(family, table, false)?, table);
        for rule in bypass::find(&saved, family, tunnel) {
            found.push(format!("{} filter {rule}", family_name(family)));
        }
    }
    Ok(found)
}

impl Backend for IptablesBackend {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, state: &DesiredState) -> Result<()> {
        let wiring = Wiring { divert: self.opts.divert, first: self.opts.hook_first };
        let desired = cgnat::render(state, wiring, self.ip.available);
        let first = self.desired.is_empty();
        if first {
            // The first write: remember what an earlier run left in force.
            for spec in &desired {
                let saved = SavedTable::parse(&self.ip.save(spec.family, spec.table, false)?, spec.table);
                self.before.push(TableSpec::from_saved(spec.family, spec.table, &saved));
            }
            self.inherited = self.before.iter().any(|t| !t.chains.is_empty());
        }
        match self.sync(&desired) {
            Ok(written) => {
                tracing::info!("iptables: wrote [{}]", written.join(", "));
                if first {
                    // A roll-back only puts back the tables this start changed.
                    self.before
                        .retain(|t| written.contains(&format!("{} {}", family_name(t.family), t.table)));
                }
                self.desired = desired;
                self.tunnel = state.tunnel.clone();
                self.check_bypasses();
                Ok(())
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

    fn repair_interval(&self) -> Option<Duration> {
        Some(self.opts.repair_interval)
    }

    fn repair(&mut self) -> Result<()> {
        let written = self.sync(&self.desired)?;
        if !written.is_empty() {
            tracing::warn!("iptables: rules changed by another program; restored [{}]", written.join(", "));
        }
        self.check_bypasses();
        Ok(())
    }

    fn inherited(&self) -> bool {
        self.inherited
    }

    fn variant(&self) -> Option<Variant> {
        Some(self.ip.variant)
    }

    fn commit(&mut self, _state: &DesiredState) -> Result<()> {
        self.before.clear();
        // A run with the other variant (nft <-> legacy) left its rules in force with its
        // policy: remove them now that these are in force.
        let other = match self.ip.variant {
            Variant::Nft => Variant::Legacy,
            Variant::Legacy => Variant::Nft,
        };
        if let Ok(ip) = Iptables::probe_quiet(other) {
            remove(&ip).with_context(|| format!("removing tailgate's iptables-{} rules", other.name()))?;
        }
        Ok(())
    }

    fn roll_back(self: Box<Self>) -> Result<()> {
        if !self.inherited {
            return self.stop(false);
        }
        self.sync(&self.before)?;
        tracing::info!("start rolled back: the kept rules are as they were");
        Ok(())
    }

    fn stop(self: Box<Self>, keep: bool) -> Result<()> {
        if keep {
            tracing::info!("keep_datapath: leaving the iptables rules in place");
            return Ok(());
        }
        remove(&self.ip)?;
        tracing::info!("iptables: removed every tailgate chain, hook and rule");
        Ok(())
    }
}

/// Removes everything tailgate owns from the tables of `ip` (hooks, `tg-*` chains, rules
/// with a tailgate comment, older versions' too). A chain a user-written jump still
/// refers to is flushed and left.
fn remove(ip: &Iptables) -> Result<()> {
    // Every table, even after one failed: leave as little behind as possible.
    let mut first_error = None;
    for (family, table) in ip.tables() {
        let empty = TableSpec { family, table, chains: Vec::new(), hooks: Vec::new() };
        let removed = ip.save(family, table, false).and_then(|text| {
            match table::plan(&empty, &SavedTable::parse(&text, table)) {
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

/// Removes tailgate's rules from both variants (for `tailgate cleanup` and when the BPF
/// backend starts). Variants or families this host lacks are skipped. Refuses while another
/// daemon enforces with iptables in this network namespace (it would restore them anyway).
pub fn remove_all() -> Result<()> {
    let _netns = match Lock::try_acquire(&lock::netns_path()?)? {
        Ok(lock) => lock,
        Err(held) => bail!(
            "tailgate (PID {}) enforces with iptables in this network namespace; stop it first",
            held.pid
        ),
    };
    remove_all_unlocked()
}

/// `remove_all` without asking who holds the lock (`cleanup --force`).
pub fn remove_all_unlocked() -> Result<()> {
    for variant in [Variant::Nft, Variant::Legacy] {
        if let Ok(ip) = Iptables::probe_quiet(variant) {
            remove(&ip).with_context(|| format!("cleaning iptables-{}", variant.name()))?;
        }
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}
