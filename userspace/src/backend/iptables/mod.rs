//! The iptables backend: the same policy as the BPF datapath, enforced with netfilter.
//! Used when BPF cannot be (`backend = "auto"`), or when asked (`backend = "iptables"`).

pub mod cgnat;
pub mod exec;
pub mod table;

use std::time::Duration;

use anyhow::{Context, Result};

use self::{
    exec::{Iptables, Variant},
    table::{Family, SavedTable, TableSpec},
};
use super::Backend;
use crate::policy::DesiredState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Insert jumps from INPUT/FORWARD/POSTROUTING (where missing). `false`: the user wires
    /// the chains in; tailgate inserts no jump and never deletes one it did not write.
    pub divert: bool,
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
}

impl IptablesBackend {
    pub fn new(opts: Options) -> Result<Self> {
        let ip = Iptables::probe(opts.variant).context("iptables backend")?;
        tracing::info!(
            "iptables-{} (IPv6 filter: {}, IPv6 nat: {}), divert: {}",
            ip.variant.name(),
            yes(ip.available.v6_filter),
            yes(ip.available.v6_nat),
            opts.divert
        );
        Ok(Self { ip, opts, desired: Vec::new() })
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
}

impl Backend for IptablesBackend {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, state: &DesiredState) -> Result<()> {
        let desired = cgnat::render(state, self.opts.divert, self.ip.available);
        match self.sync(&desired) {
            Ok(written) => {
                tracing::info!("iptables: wrote [{}]", written.join(", "));
                self.desired = desired;
                Ok(())
            }
            Err(e) => {
                // One table failed after others were written: put back what was in force.
                let restore = if self.desired.is_empty() {
                    remove(&self.ip)
                } else {
                    self.sync(&self.desired).map(drop)
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
    for (family, table) in ip.tables() {
        let empty = TableSpec { family, table, chains: Vec::new(), hooks: Vec::new() };
        let saved = SavedTable::parse(&ip.save(family, table, false)?, table);
        if let Some(payload) = table::plan(&empty, &saved) {
            ip.restore(family, &payload)?;
        }
    }
    Ok(())
}

/// Removes tailgate's rules from both variants (for `tailgate cleanup` and when the BPF
/// backend starts). Variants or families this host lacks are skipped.
pub fn remove_all() -> Result<()> {
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
