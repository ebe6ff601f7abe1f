//! Rules of other programs placed above tailgate's hooks that can accept what tailgate
//! drops: a firewall that inserts `-j ACCEPT` at the top of INPUT bypasses tailgate
//! silently. Found here (pure code, from `iptables-save`), reported in the log and by
//! `tailgate status`, and undone by `[iptables] hook_position = "first"`.
//!
//! A rule above the hook is harmless when it cannot match what tailgate drops: traffic from
//! (or, in FORWARD, into) the tunnel, sources outside the filtered range, other output
//! interfaces, or only replies of connections already admitted (`--ctstate
//! ESTABLISHED,RELATED`). It can accept when its target is ACCEPT, RETURN (to the chain's
//! policy) or a user chain (which may accept).

use ipnet::IpNet;

use super::{
    cgnat::{FORWARD, INPUT},
    table::{Family, SavedRule, SavedTable, CHAIN_PREFIX},
};
use crate::policy::{CGNAT_V4, TAILNET_ULA_V6};

/// Targets that never accept.
const SAFE_TARGETS: &[&str] =
    &["DROP", "REJECT", "LOG", "NFLOG", "MARK", "CONNMARK", "NOTRACK", "CT", "TCPMSS", "AUDIT", "TRACE"];

/// Rules above tailgate's hooks in a filter table that can accept what tailgate drops, as
/// "INPUT rule 1 (-j ACCEPT)".
pub fn find(saved: &SavedTable, family: Family, tunnel: &str) -> Vec<String> {
    let range: IpNet = match family {
        Family::V4 => CGNAT_V4.into(),
        Family::V6 => TAILNET_ULA_V6.into(),
    };
    let mut found = Vec::new();
    for (builtin, ours, tunnel_flag) in [("INPUT", INPUT, "-i"), ("FORWARD", FORWARD, "-o")] {
        let Some(rules) = saved.chains.get(builtin) else { continue };
        let Some(hook) = rules.iter().position(|r| r.targets(ours)) else { continue };
        for (i, rule) in rules[..hook].iter().enumerate() {
            if can_accept(rule, saved, &range, tunnel, tunnel_flag) {
                found.push(format!("{builtin} rule {} ({})", i + 1, without_counters(&rule.body)));
            }
        }
    }
    found
}

fn can_accept(rule: &SavedRule, saved: &SavedTable, range: &IpNet, tunnel: &str, tunnel_flag: &str) -> bool {
    let words: Vec<&str> = rule.body.split_whitespace().collect();
    let arg = |flag: &str| {
        words.windows(2).position(|w| w[0] == flag).map(|i| (words[i + 1], i > 0 && words[i - 1] == "!"))
    };
    let Some((target, _)) = arg("-j").or_else(|| arg("-g")) else { return false };
    let user_chain = saved.chains.contains_key(target) && !target.starts_with(CHAIN_PREFIX);
    if !(target == "ACCEPT" || target == "RETURN" || user_chain) || SAFE_TARGETS.contains(&target) {
        return false;
    }
    // From the tunnel (exactly: `-i tun+` also matches other devices): tailgate accepts that
    // too. In FORWARD, only packets into the tunnel are filtered: an output interface match
    // that cannot be the tunnel never carries them (`+` is iptables' prefix wildcard).
    if let Some((iface, false)) = arg("-i") {
        if iface == tunnel {
            return false;
        }
    }
    if tunnel_flag == "-o" {
        if let Some((pattern, negated)) = arg("-o") {
            let matches_tunnel = match pattern.strip_suffix('+') {
                Some(prefix) => tunnel.starts_with(prefix),
                None => pattern == tunnel,
            };
            if matches_tunnel == negated {
                return false;
            }
        }
    }
    if let Some((source, false)) = arg("-s") {
        if let Ok(net) =
            source.parse::<IpNet>().or_else(|_| source.parse::<std::net::IpAddr>().map(IpNet::from))
        {
            if !(net.contains(&range.network()) || range.contains(&net.network())) {
                return false;
            }
        }
    }
    let states = arg("--ctstate").or_else(|| arg("--state"));
    if let Some((states, false)) = states {
        if states.split(',').all(|s| s == "ESTABLISHED" || s == "RELATED") {
            return false;
        }
    }
    true
}

fn without_counters(body: &str) -> String {
    body.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(input: &[&str], forward: &[&str]) -> SavedTable {
        let mut text = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:tg-input - [0:0]\n:tg-forward - [0:0]\n:mine - [0:0]\n");
        for (chain, rules) in [("INPUT", input), ("FORWARD", forward)] {
            for rule in rules {
                text.push_str(&format!("-A {chain} {rule}\n"));
            }
        }
        text.push_str("COMMIT\n");
        SavedTable::parse(&text, "filter")
    }

    const HOOK_IN: &str = "-m comment --comment tailgate:hook -j tg-input";
    const HOOK_FWD: &str = "-m comment --comment tailgate:hook -j tg-forward";

    #[test]
    fn accepts_above_the_hook_are_found_with_their_position() {
        let saved = table(&["-p tcp --dport 22 -j ACCEPT", "-j ACCEPT", HOOK_IN], &["-j mine", HOOK_FWD]);
        assert_eq!(
            find(&saved, Family::V4, "tun0"),
            [
                "INPUT rule 1 (-p tcp --dport 22 -j ACCEPT)",
                "INPUT rule 2 (-j ACCEPT)",
                "FORWARD rule 1 (-j mine)"
            ]
        );
    }

    #[test]
    fn rules_that_cannot_match_what_tailgate_drops_are_fine() {
        let saved = table(
            &[
                "-i tun0 -j ACCEPT",
                "-s 10.0.0.0/8 -j ACCEPT",
                "-s 192.0.2.7/32 -j ACCEPT",
                "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-p tcp -j DROP",
                "-j LOG",
                HOOK_IN,
                "-j ACCEPT",
            ],
            &["-o eth1 -j ACCEPT", "-i tun0 -j ACCEPT", HOOK_FWD],
        );
        assert_eq!(find(&saved, Family::V4, "tun0"), Vec::<String>::new());
    }

    #[test]
    fn overlapping_sources_and_other_states_can_accept() {
        let saved = table(
            &[
                "-s 100.100.0.0/16 -j ACCEPT",
                "-s 100.0.0.0/8 -j RETURN",
                "-m conntrack --ctstate NEW -j ACCEPT",
                HOOK_IN,
            ],
            &["-o tun0 -j ACCEPT", "! -o eth1 -j ACCEPT", "-o tun+ -j ACCEPT", "-o t+ -j ACCEPT", HOOK_FWD],
        );
        assert_eq!(find(&saved, Family::V4, "tun0").len(), 7);
        // Wildcards that cannot be the tunnel, or exclude it, are fine; `-i tun+` is not
        // only the tunnel.
        let saved =
            table(&["-i tun+ -j ACCEPT", HOOK_IN], &["-o eth+ -j ACCEPT", "! -o tun+ -j ACCEPT", HOOK_FWD]);
        assert_eq!(find(&saved, Family::V4, "tun0"), ["INPUT rule 1 (-i tun+ -j ACCEPT)"]);
        // The IPv6 table is judged against the tailnet ULA.
        let v6 = table(&["-s 2001:db8::/32 -j ACCEPT", "-s fd7a:115c:a1e0::/64 -j ACCEPT", HOOK_IN], &[]);
        assert_eq!(find(&v6, Family::V6, "tun0"), ["INPUT rule 2 (-s fd7a:115c:a1e0::/64 -j ACCEPT)"]);
    }

    #[test]
    fn without_a_hook_nothing_is_above_it() {
        let saved = table(&["-j ACCEPT", "-j tg-input"], &["-j ACCEPT"]);
        assert_eq!(find(&saved, Family::V4, "tun0"), ["INPUT rule 1 (-j ACCEPT)"]);
    }
}
