//! The iptables backend: the same policy as the BPF datapath, enforced with netfilter.
//! Used when BPF cannot be (`backend = "auto"`), or when asked (`backend = "iptables"`).

pub mod bypass;
pub mod cgnat;
pub mod conntrack;
pub mod exec;
pub mod generation;
pub mod mss;
pub mod proxy;
pub mod render;
pub mod services;
pub mod sets;
#[cfg(test)]
mod standin;
pub mod subnet_routes;
pub mod table;
pub mod writer;

use std::time::Duration;

use anyhow::{bail, Context, Result};

use self::{
    exec::{Iptables, Variant},
    render::Wiring,
    sets::Ipset,
    table::{Family, SavedTable, Table},
    writer::{destroy_sets, remove, Writer},
};
use super::Backend;
use crate::{
    lock::{self, Lock},
    policy::DesiredState,
};

#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The start of this instance's set names (`sets::name_prefix`).
    pub sets: String,
}

impl Options {
    /// How rules are written; prefix lists into sets when the host has ipset.
    pub fn wiring(&self, ipset: Option<&Ipset>) -> Wiring {
        Wiring { divert: self.divert, first: self.hook_first, sets: ipset.map(|_| self.sets.clone()) }
    }
}

/// Takes this network namespace's iptables lock (refusing if another daemon holds it) and
/// probes iptables.
pub fn open(opts: &Options) -> Result<(Iptables, Lock)> {
    let netns = match Lock::try_acquire(&lock::netns_path()?)? {
        Ok(lock) => lock,
        Err(held) => bail!(
            "another tailgate (PID {}) writes iptables rules in this network namespace; stop it first",
            held.pid
        ),
    };
    let ip = Iptables::probe(opts.variant).context("iptables")?;
    let tables: Vec<String> = ip.tables().map(|(f, t)| format!("{} {t}", family_name(f))).collect();
    tracing::info!("iptables-{}: tables [{}], divert: {}", ip.variant.name(), tables.join(", "), opts.divert);
    Ok((ip, netns))
}

pub struct IptablesBackend {
    writer: Writer,
    opts: Options,
    tunnel: String,
    /// Rules of others that bypass tailgate, as last reported.
    bypasses: Vec<String>,
    /// One writer of tailgate's chains per network namespace.
    _netns: Lock,
}

impl IptablesBackend {
    pub fn new(opts: Options) -> Result<Self> {
        let (ip, netns) = open(&opts)?;
        let ipset = match Ipset::probe() {
            Ok(ipset) => Some(ipset),
            Err(e) => {
                tracing::warn!(
                    "ipset unavailable ({e:#}): prefixes in [cgnat] allow/drop are written one rule each, \
                     which every packet from the filtered range walks"
                );
                None
            }
        };
        let writer = Writer::new(ip, ipset, opts.sets.clone());
        Ok(Self { writer, opts, tunnel: String::new(), bypasses: Vec::new(), _netns: netns })
    }

    /// Logs rules of others that now bypass tailgate (once per change).
    fn check_bypasses(&mut self) {
        let found = match bypasses(&self.writer.ip, &self.tunnel) {
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
    for (family, table) in ip.tables().filter(|(_, t)| *t == Table::Filter) {
        let saved = SavedTable::parse(&ip.save(family, table, false)?, table.name());
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
        let wiring = self.opts.wiring(self.writer.ipset.as_ref());
        let desired = render::render(state, wiring, &self.writer.ip.available);
        let sizes: Vec<(String, usize)> =
            desired.sets.iter().map(|s| (s.name.clone(), s.entries.len())).collect();
        let written = self.writer.apply(desired)?;
        let sets: Vec<String> = sizes
            .iter()
            .filter(|(name, _)| written.sets.contains(name))
            .map(|(name, n)| format!("{name} ({n} prefixes)"))
            .collect();
        tracing::info!("iptables: wrote [{}]", written.tables.join(", "));
        if !sets.is_empty() {
            tracing::info!("ipset: wrote [{}]", sets.join(", "));
        }
        self.tunnel = state.tunnel.clone();
        self.check_bypasses();
        Ok(())
    }

    fn repair_interval(&self) -> Option<Duration> {
        Some(self.opts.repair_interval)
    }

    fn repair(&mut self) -> Result<usize> {
        let repaired = self.writer.repair()?;
        let written: Vec<&String> = repaired.tables.iter().chain(&repaired.sets).collect();
        if !written.is_empty() {
            let names: Vec<&str> = written.iter().map(|s| s.as_str()).collect();
            tracing::warn!("iptables: rules changed by another program; restored [{}]", names.join(", "));
        }
        if repaired.read {
            self.check_bypasses();
        }
        Ok(written.len())
    }

    fn inherited(&self) -> bool {
        self.writer.inherited()
    }

    fn variant(&self) -> Option<Variant> {
        Some(self.writer.ip.variant)
    }

    fn commit(&mut self, _state: &DesiredState) -> Result<()> {
        self.writer.commit()
    }

    fn roll_back(self: Box<Self>) -> Result<()> {
        let inherited = self.writer.inherited();
        self.writer.roll_back()?;
        if inherited {
            tracing::info!("start rolled back: the kept rules are as they were");
        }
        Ok(())
    }

    fn stop(self: Box<Self>, keep: bool) -> Result<()> {
        if keep {
            tracing::info!("keep_datapath: leaving the iptables rules in place");
            return Ok(());
        }
        self.writer.remove()?;
        tracing::info!("iptables: removed every tailgate chain, hook and rule");
        Ok(())
    }
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

/// `remove_all` without asking who holds the lock (`cleanup --force`). With the rules of
/// every instance gone, so go the sets of every instance.
pub fn remove_all_unlocked() -> Result<()> {
    for variant in [Variant::Nft, Variant::Legacy] {
        if let Ok(ip) = Iptables::probe_quiet(variant) {
            remove(&ip).with_context(|| format!("cleaning iptables-{}", variant.name()))?;
        }
    }
    if let Ok(ipset) = Ipset::installed() {
        destroy_sets(&ipset, |_| true).context("removing tailgate's ipset sets")?;
    }
    Ok(())
}

pub fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}
