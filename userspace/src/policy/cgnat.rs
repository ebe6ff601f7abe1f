//! CGNAT (and tailnet ULA) source filtering: built-in ranges plus the user's per-prefix
//! exemptions, as longest-prefix rules per direction.

use std::{fmt, net::IpAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{CgnatConfig, CgnatMode, Field};

/// Carrier-grade NAT space, where tailnet addresses live.
pub const CGNAT_V4: Ipv4Net = ipv4net(100, 64, 0, 0, 10);
/// ChromeOS VMs use this part of CGNAT on the LAN side; the reference lets it in.
pub const CHROMEOS_V4: Ipv4Net = ipv4net(100, 115, 92, 0, 23);
/// The tailnet's IPv6 ULA range.
pub const TAILNET_ULA_V6: Ipv6Net =
    match Ipv6Net::new(std::net::Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 0), 48) {
        Ok(net) => net,
        Err(_) => panic!("bad constant"),
    };

const fn ipv4net(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    match Ipv4Net::new(std::net::Ipv4Addr::new(a, b, c, d), len) {
        Ok(net) => net,
        Err(_) => panic!("bad constant"),
    }
}

/// Source-prefix rules; within each list the longest matching prefix decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgnatRules {
    /// For packets entering an uplink.
    pub inbound: Vec<Rule>,
    /// For packets forwarded into the tunnel from elsewhere.
    pub forward: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub prefix: IpNet,
    pub verdict: Verdict,
    pub origin: Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Pass,
    Drop,
}

/// Where a rule comes from, for status output and rule comments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    CgnatRange,
    ChromeOs,
    TailnetUla,
    /// A config field, e.g. `cgnat.allow[0]`.
    Config(Field),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::CgnatRange => f.write_str("builtin: CGNAT range"),
            Origin::ChromeOs => f.write_str("builtin: ChromeOS VMs"),
            Origin::TailnetUla => f.write_str("builtin: tailnet ULA"),
            Origin::Config(field) => field.fmt(f),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
        })
    }
}

/// Compiles `[cgnat]` with the user's prefixes (field, prefix, allowed?).
///
/// Inbound: drop the CGNAT range and the tailnet ULA, pass the ChromeOS range, then the
/// user's `allow`/`drop` prefixes on top. Forward into the tunnel: drop the CGNAT range and
/// the ULA, with the user's prefixes on top (a prefix the user declares as a real network is
/// not a tailnet address either way); the ChromeOS carve-out is inbound only, as in the
/// reference. A user prefix equal to a built-in one replaces it.
pub fn compile(config: &CgnatConfig, user: impl Iterator<Item = (Field, IpNet, bool)>) -> CgnatRules {
    match config.mode {
        CgnatMode::Off => CgnatRules::default(),
        CgnatMode::Drop => {
            let ranges = [
                rule(CGNAT_V4.into(), Verdict::Drop, Origin::CgnatRange),
                rule(TAILNET_ULA_V6.into(), Verdict::Drop, Origin::TailnetUla),
            ];
            let chromeos = rule(CHROMEOS_V4.into(), Verdict::Pass, Origin::ChromeOs);
            let user: Vec<Rule> = user
                .map(|(field, prefix, allow)| {
                    let verdict = if allow { Verdict::Pass } else { Verdict::Drop };
                    rule(prefix, verdict, Origin::Config(field))
                })
                .collect();
            let forward = merge(ranges.to_vec(), &user);
            // Inbound is forward plus the ChromeOS carve-out, at its place in the order
            // (one sort for both lists).
            let mut inbound = forward.clone();
            if !user.iter().any(|u| u.prefix == chromeos.prefix) {
                let at = inbound.partition_point(|r| order(r) < order(&chromeos));
                inbound.insert(at, chromeos);
            }
            CgnatRules { inbound, forward }
        }
    }
}

fn rule(prefix: IpNet, verdict: Verdict, origin: Origin) -> Rule {
    Rule { prefix, verdict, origin }
}

/// Built-ins plus user rules (a user rule replaces a built-in with the same prefix; a
/// prefix listed twice is one rule, the first), sorted longest prefix first, then by
/// address: the order a first-match rule list needs to give the same answer as a
/// longest-prefix lookup.
fn merge(builtin: Vec<Rule>, user: &[Rule]) -> Vec<Rule> {
    let mut seen = std::collections::HashSet::new();
    let mut rules: Vec<Rule> = builtin
        .into_iter()
        .filter(|b| !user.iter().any(|u| u.prefix == b.prefix))
        .chain(user.iter().filter(|u| seen.insert(u.prefix)).cloned())
        .collect();
    rules.sort_by_key(order);
    rules
}

/// The sort key of a rule list: family, longest prefix first, then address. (Prefixes are
/// network addresses: validated so.)
fn order(rule: &Rule) -> (bool, std::cmp::Reverse<u8>, IpAddr) {
    (rule.prefix.addr().is_ipv6(), std::cmp::Reverse(rule.prefix.prefix_len()), rule.prefix.addr())
}

/// The rule that decides for `addr`: the longest matching prefix. This is the reference
/// semantics both backends implement.
pub fn resolve(rules: &[Rule], addr: IpAddr) -> Option<&Rule> {
    rules.iter().filter(|r| r.prefix.contains(&addr)).max_by_key(|r| r.prefix.prefix_len())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        config::Config,
        policy::{self, DesiredState, System},
    };

    fn state(toml: &str) -> DesiredState {
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        policy::compile(
            &config,
            System { uplinks: vec!["eth0".into()], tunnel_mtu: None, ..Default::default() },
        )
    }

    fn inbound(s: &DesiredState, addr: &str) -> Option<Verdict> {
        resolve(&s.cgnat.inbound, addr.parse().unwrap()).map(|r| r.verdict)
    }

    fn forward(s: &DesiredState, addr: &str) -> Option<Verdict> {
        resolve(&s.cgnat.forward, addr.parse().unwrap()).map(|r| r.verdict)
    }

    #[test]
    fn default_policy() {
        let s = state("");
        assert_eq!(inbound(&s, "100.64.0.1"), Some(Verdict::Drop));
        assert_eq!(inbound(&s, "100.127.255.255"), Some(Verdict::Drop));
        assert_eq!(inbound(&s, "100.115.92.7"), Some(Verdict::Pass));
        assert_eq!(inbound(&s, "100.115.93.255"), Some(Verdict::Pass));
        assert_eq!(inbound(&s, "100.115.94.0"), Some(Verdict::Drop));
        assert_eq!(inbound(&s, "100.128.0.1"), None);
        assert_eq!(inbound(&s, "192.0.2.1"), None);
        assert_eq!(inbound(&s, "fd7a:115c:a1e0::1"), Some(Verdict::Drop));
        assert_eq!(inbound(&s, "fd7a:115c:a1e1::1"), None);
        assert_eq!(inbound(&s, "2001:db8::1"), None);
        // Forwarding into the tunnel has no ChromeOS carve-out.
        assert_eq!(forward(&s, "100.115.92.7"), Some(Verdict::Drop));
        assert_eq!(forward(&s, "100.64.0.1"), Some(Verdict::Drop));
        assert_eq!(forward(&s, "198.51.100.1"), None);
    }

    #[test]
    fn a_prefix_listed_twice_is_one_rule_the_first() {
        let s = state("[cgnat]\nallow = [\"100.100.0.0/16\", \"100.100.0.0/16\"]");
        let rules: Vec<&Rule> =
            s.cgnat.inbound.iter().filter(|r| r.prefix.to_string() == "100.100.0.0/16").collect();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].origin.to_string(), "cgnat.allow[0]");
    }

    #[test]
    fn longest_prefix_wins_whatever_the_list_order() {
        let s = state(
            "[cgnat]\nallow = [\"100.100.0.0/16\"]\ndrop = [\"100.100.100.200/32\", \"100.100.100.0/24\"]",
        );
        assert_eq!(inbound(&s, "100.100.2.136"), Some(Verdict::Pass));
        assert_eq!(inbound(&s, "100.100.100.200"), Some(Verdict::Drop));
        assert_eq!(inbound(&s, "100.100.100.1"), Some(Verdict::Drop));
        assert_eq!(inbound(&s, "100.101.0.1"), Some(Verdict::Drop));
        assert_eq!(forward(&s, "100.100.2.136"), Some(Verdict::Pass));
    }

    #[test]
    fn user_rule_replaces_builtin_with_same_prefix() {
        let s = state("[cgnat]\ndrop = [\"100.115.92.0/23\"]");
        assert_eq!(inbound(&s, "100.115.92.7"), Some(Verdict::Drop));
        let n = s.cgnat.inbound.iter().filter(|r| r.prefix == CHROMEOS_V4.into()).count();
        assert_eq!(n, 1);
        let s = state("[cgnat]\nallow = [\"100.64.0.0/10\"]");
        assert_eq!(inbound(&s, "100.64.0.1"), Some(Verdict::Pass));
    }

    #[test]
    fn rules_are_sorted_for_first_match() {
        let s = state("[cgnat]\nallow = [\"100.100.0.0/16\", \"fd7a:115c:a1e0:1::/64\"]\ndrop = [\"100.100.100.200/32\"]");
        // First-match over the sorted list equals longest-prefix match for every probe.
        for addr in [
            "100.100.100.200",
            "100.100.1.1",
            "100.64.1.1",
            "100.115.92.1",
            "fd7a:115c:a1e0:1::5",
            "fd7a:115c:a1e0:2::5",
        ] {
            let addr: IpAddr = addr.parse().unwrap();
            let first = s.cgnat.inbound.iter().find(|r| r.prefix.contains(&addr));
            assert_eq!(first, resolve(&s.cgnat.inbound, addr), "{addr}");
        }
        assert!(
            s.cgnat.inbound.iter().position(|r| r.prefix.addr().is_ipv6())
                > s.cgnat.inbound.iter().rposition(|r| r.prefix.addr().is_ipv4())
        );
    }

    #[test]
    fn mode_off_has_no_rules() {
        let s = state("[cgnat]\nmode = \"off\"\nallow = [\"100.100.0.0/16\"]");
        assert!(s.cgnat.inbound.is_empty() && s.cgnat.forward.is_empty());
        assert_eq!(s.uplinks, ["eth0"]);
    }

    #[test]
    fn origins_name_config_fields() {
        let s = state("[cgnat]\ndrop = [\"100.100.100.200/32\"]");
        let r = resolve(&s.cgnat.inbound, "100.100.100.200".parse().unwrap()).unwrap();
        assert_eq!(r.origin.to_string(), "cgnat.drop[0]");
    }
}
