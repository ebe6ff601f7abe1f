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

/// How the chains are wired into the built-in ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wiring {
    /// Insert jumps from the built-in chains (`divert`); `false` renders no hooks.
    pub divert: bool,
    /// Keep those jumps first (`hook_position = "first"`).
    pub first: bool,
}

/// The tables to write, per family.
pub fn render(state: &DesiredState, wiring: Wiring, available: Available) -> Vec<TableSpec> {
    let mut tables = Vec::new();
    for family in [Family::V4, Family::V6] {
        if family == Family::V6 && !available.v6_filter {
            continue;
        }
        tables.push(filter(state, family, wiring));
        if family == Family::V4 || available.v6_nat {
            tables.push(nat(family, wiring));
        }
    }
    tables
}

fn filter(state: &DesiredState, family: Family, wiring: Wiring) -> TableSpec {
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
        chains: vec![
            Chain { name: INPUT.into(), rules: input },
            Chain { name: FORWARD.into(), rules: forward },
        ],
        hooks: hooks(wiring, &[("INPUT", INPUT), ("FORWARD", FORWARD)]),
    }
}

fn nat(family: Family, wiring: Wiring) -> TableSpec {
    let marked = format!("{:#x}/{:#x}", mark::SUBNET_ROUTE, mark::MASK);
    let rules =
        vec![rule(format!("-m mark --mark {marked} -j MASQUERADE"), "subnet route: masquerade".into())];
    TableSpec {
        family,
        table: "nat",
        chains: vec![Chain { name: POSTROUTING.into(), rules }],
        hooks: hooks(wiring, &[("POSTROUTING", POSTROUTING)]),
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
    Rule { spec, label, hash: None }
}

fn hooks(wiring: Wiring, pairs: &[(&'static str, &'static str)]) -> Vec<Hook> {
    if !wiring.divert {
        return Vec::new();
    }
    pairs
        .iter()
        .map(|&(builtin, target)| Hook {
            builtin: builtin.into(),
            target: target.into(),
            first: wiring.first,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        backend::iptables::table::{plan, SavedTable},
        config::Config,
        policy,
    };

    const ALL: Available = Available { v6_filter: true, v6_nat: true };

    fn tables(toml: &str, divert: bool, available: Available) -> Vec<TableSpec> {
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        render(&policy::compile(&config, vec!["eth0".into()]), Wiring { divert, first: false }, available)
    }

    /// Every restore payload for a fresh host, as tailgate would write them.
    fn payloads(tables: &[TableSpec]) -> String {
        tables
            .iter()
            .map(|t| {
                let family = if t.family == Family::V4 { "iptables" } else { "ip6tables" };
                let payload = plan(t, &SavedTable::default()).unwrap();
                format!("# {family}-restore --noflush\n{payload}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Compares with `golden/<name>.rules`; `UPDATE_GOLDEN=1` rewrites the file (review
    /// the diff by eye before committing it).
    fn golden(name: &str, text: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/backend/iptables/golden")
            .join(format!("{name}.rules"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, text).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(text, want, "{name}: rendering changed; if intended, run with UPDATE_GOLDEN=1 and review");
    }

    #[test]
    fn golden_reference_config() {
        golden("reference", &payloads(&tables("tunnel = \"tailscale0\"", true, ALL)));
    }

    #[test]
    fn golden_exemptions() {
        let toml = r#"
            tunnel = "tailscale0"
            [cgnat]
            allow = ["100.100.0.0/16", "100.64.0.0/24", "fd7a:115c:a1e0:ab::/64"]
            drop = ["100.100.100.200/32"]
        "#;
        golden("exemptions", &payloads(&tables(toml, true, ALL)));
    }

    #[test]
    fn golden_mode_off() {
        golden("mode_off", &payloads(&tables("tunnel = \"tailscale0\"\n[cgnat]\nmode = \"off\"", true, ALL)));
    }

    #[test]
    fn golden_no_divert_and_no_ipv6_nat() {
        let available = Available { v6_filter: true, v6_nat: false };
        golden("no_divert_no_v6_nat", &payloads(&tables("tunnel = \"tailscale0\"", false, available)));
    }

    #[test]
    fn ipv6_is_skipped_where_unusable() {
        let t = tables("", true, Available { v6_filter: false, v6_nat: false });
        assert!(t.iter().all(|t| t.family == Family::V4));
        assert_eq!(t.len(), 2);
    }

    /// The reference's filter rules (ts-input, ts-forward; TUN = tailscale0), rule for rule.
    const REFERENCE_INPUT: [&str; 3] = [
        "! -i tailscale0 -s 100.115.92.0/23 -j RETURN",
        "! -i tailscale0 -s 100.64.0.0/10 -j DROP",
        "-i tailscale0 -j ACCEPT",
    ];
    const REFERENCE_FORWARD: [&str; 4] = [
        "-i tailscale0 -j MARK --set-mark 0x40000/0xff0000",
        "-m mark --mark 0x40000/0xff0000 -j ACCEPT",
        "-o tailscale0 -s 100.64.0.0/10 -j DROP",
        "-o tailscale0 -j ACCEPT",
    ];

    #[test]
    fn reference_config_matches_the_reference_filter_rules_rule_for_rule() {
        let t = tables("tunnel = \"tailscale0\"", true, ALL);
        let filter = t.iter().find(|t| t.family == Family::V4 && t.table == "filter").unwrap();
        let chain = |name: &str| -> Vec<&str> {
            filter
                .chains
                .iter()
                .find(|c| c.name == name)
                .unwrap()
                .rules
                .iter()
                .map(|r| r.spec.as_str())
                .collect()
        };
        assert_eq!(chain(INPUT), REFERENCE_INPUT);
        assert_eq!(chain(FORWARD), REFERENCE_FORWARD);
        let hooks: Vec<_> = filter.hooks.iter().map(|h| (&*h.builtin, &*h.target)).collect();
        assert_eq!(hooks, [("INPUT", INPUT), ("FORWARD", FORWARD)]);
        let nat = t.iter().find(|t| t.family == Family::V4 && t.table == "nat").unwrap();
        assert_eq!(nat.chains[0].rules[0].spec, "-m mark --mark 0x40000/0xff0000 -j MASQUERADE");
    }

    #[test]
    fn rule_order_gives_the_longest_prefix_answer() {
        let toml =
            "[cgnat]\nallow = [\"100.100.0.0/16\"]\ndrop = [\"100.100.100.200/32\", \"100.100.100.0/24\"]";
        let t = tables(toml, true, ALL);
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let state = policy::compile(&config, vec![]);
        let input = &t[0].chains[0].rules;
        for addr in
            ["100.100.100.200", "100.100.100.7", "100.100.1.1", "100.64.0.1", "100.115.92.1", "198.51.100.1"]
        {
            let ip: std::net::IpAddr = addr.parse().unwrap();
            // First rule whose -s matches, as netfilter walks the chain.
            let first = input.iter().find(|r| {
                r.spec
                    .split_whitespace()
                    .skip_while(|w| *w != "-s")
                    .nth(1)
                    .is_some_and(|p| p.parse::<IpNet>().unwrap().contains(&ip))
            });
            let verdict = first.map(|r| if r.spec.ends_with("DROP") { Verdict::Drop } else { Verdict::Pass });
            let lpm = policy::resolve(&state.cgnat.inbound, ip).map(|r| r.verdict);
            assert_eq!(verdict, lpm, "{addr}");
        }
    }
}
