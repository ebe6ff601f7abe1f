//! Renders the desired state into iptables chains (pure): the reference rule set, with the
//! CGNAT prefix rules in longest-prefix-first order, so the first matching rule is the one
//! the BPF LPM lookup would pick.
//!
//! ```text
//! filter/tg-input:    ! -i TUN -s <prefix> -j RETURN|DROP   (inbound rules, longest first)
//!                     -i TUN -j ACCEPT
//! filter/tg-forward:  -i TUN -j MARK --set-mark 0x40000/0xff0000
//!                     -m mark --mark 0x40000/0xff0000 -j ACCEPT
//!                     -o TUN -s <prefix> -j ACCEPT|DROP     (forward rules, longest first)
//!                     -o TUN -j ACCEPT
//! nat/tg-postrouting: -m mark --mark 0x40000/0xff0000 -j MASQUERADE
//! ```

use ipnet::IpNet;
use tailgate_abi::mark;

use super::table::{Chain, Family, Hook, Rule, TableSpec};
use crate::policy::{self, DesiredState, Verdict};

pub const INPUT: &str = "tg-input";
pub const FORWARD: &str = "tg-forward";
pub const POSTROUTING: &str = "tg-postrouting";

/// What this host's netfilter offers, from the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Available {
    pub v6_filter: bool,
    pub v6_nat: bool,
}

/// The tables to write, per family. `divert = false` renders no hooks.
pub fn render(state: &DesiredState, divert: bool, available: Available) -> Vec<TableSpec> {
    let mut tables = Vec::new();
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !available.v6_filter {
            continue;
        }
        tables.push(filter(state, family, divert));
        if family == Family::V4 || available.v6_nat {
            tables.push(nat(family, divert));
        }
    }
    tables
}

fn filter(state: &DesiredState, family: Family, divert: bool) -> TableSpec {
    let tun = &state.tunnel;
    let mut input: Vec<Rule> = prefix_rules(&state.cgnat.inbound, family)
        .map(|(prefix, verdict, label)| {
            let target = if verdict == Verdict::Drop { "DROP" } else { "RETURN" };
            rule(format!("! -i {tun} -s {prefix} -j {target}"), label)
        })
        .collect();
    input.push(rule(format!("-i {tun} -j ACCEPT"), "from the tunnel".into()));

    let marked = format!("{:#x}/{:#x}", mark::SUBNET_ROUTE, mark::MASK);
    let mut forward = vec![
        rule(format!("-i {tun} -j MARK --set-mark {marked}"), "subnet route: mark".into()),
        rule(format!("-m mark --mark {marked} -j ACCEPT"), "subnet route: accept".into()),
    ];
    forward.extend(prefix_rules(&state.cgnat.forward, family).map(|(prefix, verdict, label)| {
        let target = if verdict == Verdict::Drop { "DROP" } else { "ACCEPT" };
        rule(format!("-o {tun} -s {prefix} -j {target}"), label)
    }));
    forward.push(rule(format!("-o {tun} -j ACCEPT"), "into the tunnel".into()));

    TableSpec {
        family,
        table: "filter",
        chains: vec![Chain { name: INPUT, rules: input }, Chain { name: FORWARD, rules: forward }],
        hooks: hooks(divert, &[("INPUT", INPUT), ("FORWARD", FORWARD)]),
    }
}

fn nat(family: Family, divert: bool) -> TableSpec {
    let marked = format!("{:#x}/{:#x}", mark::SUBNET_ROUTE, mark::MASK);
    let rules =
        vec![rule(format!("-m mark --mark {marked} -j MASQUERADE"), "subnet route: masquerade".into())];
    TableSpec {
        family,
        table: "nat",
        chains: vec![Chain { name: POSTROUTING, rules }],
        hooks: hooks(divert, &[("POSTROUTING", POSTROUTING)]),
    }
}

/// The rules of one family, already in longest-prefix-first order (see `policy::compile`).
fn prefix_rules(
    rules: &[policy::Rule],
    family: Family,
) -> impl Iterator<Item = (IpNet, Verdict, String)> + '_ {
    rules
        .iter()
        .filter(move |r| {
            matches!((r.prefix, family), (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6))
        })
        .map(|r| (r.prefix, r.verdict, r.origin.to_string()))
}

fn rule(spec: String, label: String) -> Rule {
    Rule { spec, label }
}

fn hooks(divert: bool, pairs: &[(&'static str, &'static str)]) -> Vec<Hook> {
    if !divert {
        return Vec::new();
    }
    pairs.iter().map(|&(builtin, target)| Hook { builtin, target }).collect()
}
