//! CGNAT source filtering as iptables rules, in longest-prefix-first order so the first
//! matching rule is the one the BPF LPM lookup would pick.
//!
//! ```text
//! filter/tg-input:    ! -i TUN -s <prefix> -j RETURN|DROP   (inbound rules, longest first)
//!                     -i TUN -j ACCEPT
//! filter/tg-forward:  (subnet-route rules first, see `subnet_routes`)
//!                     -o TUN -s <prefix> -j ACCEPT|DROP     (forward rules, longest first)
//!                     -o TUN -j ACCEPT
//! ```

use ipnet::IpNet;
use tailgate_abi::counters::Counter;

use super::{
    render::{Builder, FAMILIES},
    table::{Family, Rule, Table},
};
use crate::policy::{self, DesiredState, Verdict};

pub const INPUT: &str = "tg-input";
pub const FORWARD: &str = "tg-forward";

pub fn render(b: &mut Builder, state: &DesiredState) {
    let tun = &state.tunnel;
    for family in FAMILIES {
        let mut input: Vec<Rule> = prefix_rules(&state.cgnat.inbound, family)
            .map(|r| {
                let (target, counter) = match r.verdict {
                    Verdict::Drop => ("DROP", Counter::UplinkDrop),
                    Verdict::Pass => ("RETURN", Counter::UplinkPassRule),
                };
                prefix_rule(format!("! -i {tun} -s {} -j {target}", r.prefix), counter, r)
            })
            .collect();
        input.push(Rule::new(format!("-i {tun} -j ACCEPT"), "-", "from the tunnel"));
        b.add(family, Table::Filter, INPUT, "INPUT", input);

        let mut forward: Vec<Rule> = prefix_rules(&state.cgnat.forward, family)
            .map(|r| {
                let (target, counter) = match r.verdict {
                    Verdict::Drop => ("DROP", Counter::TunnelDrop),
                    Verdict::Pass => ("ACCEPT", Counter::TunnelPassForward),
                };
                prefix_rule(format!("-o {tun} -s {} -j {target}", r.prefix), counter, r)
            })
            .collect();
        forward.push(Rule::new(format!("-o {tun} -j ACCEPT"), "-", "into the tunnel"));
        b.add(family, Table::Filter, FORWARD, "FORWARD", forward);
    }
}

/// A prefix rule's label starts with the prefix, which `status` lists with its counter.
fn prefix_rule(spec: String, counter: Counter, rule: &policy::Rule) -> Rule {
    Rule::new(spec, counter.name(), format!("{} {}", rule.prefix, rule.origin))
}

/// The rules of one family, already in longest-prefix-first order (see `policy::cgnat`).
fn prefix_rules(rules: &[policy::Rule], family: Family) -> impl Iterator<Item = &policy::Rule> + '_ {
    rules.iter().filter(move |r| {
        matches!((r.prefix, family), (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6))
    })
}
