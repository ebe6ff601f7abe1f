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
    let inbound = Direction {
        interface: format!("! -i {tun}"),
        pass: ("RETURN", Counter::UplinkPassRule),
        drop: Counter::UplinkDrop,
        last: (format!("-i {tun} -j ACCEPT"), "from the tunnel"),
    };
    let forward = Direction {
        interface: format!("-o {tun}"),
        pass: ("ACCEPT", Counter::TunnelPassForward),
        drop: Counter::TunnelDrop,
        last: (format!("-o {tun} -j ACCEPT"), "into the tunnel"),
    };
    for family in FAMILIES {
        b.add(family, Table::Filter, INPUT, "INPUT", inbound.rules(&state.cgnat.inbound, family));
        b.add(family, Table::Filter, FORWARD, "FORWARD", forward.rules(&state.cgnat.forward, family));
    }
}

/// How one direction's prefix rules are written.
struct Direction {
    /// The interface match every prefix rule starts with.
    interface: String,
    /// Target and counter of a pass rule; drop rules `-j DROP`.
    pass: (&'static str, Counter),
    drop: Counter,
    /// The rule after the prefix rules, and its label.
    last: (String, &'static str),
}

impl Direction {
    /// The prefix rules of one family, already in longest-prefix-first order (see
    /// `policy::cgnat`), then the closing rule. A prefix rule's label starts with the
    /// prefix, which `status` lists with its counter.
    fn rules(&self, rules: &[policy::Rule], family: Family) -> Vec<Rule> {
        let same_family = |r: &&policy::Rule| {
            matches!((r.prefix, family), (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6))
        };
        let mut out: Vec<Rule> = rules
            .iter()
            .filter(same_family)
            .map(|r| {
                let (target, counter) = match r.verdict {
                    Verdict::Drop => ("DROP", self.drop),
                    Verdict::Pass => self.pass,
                };
                let spec = format!("{} -s {} -j {target}", self.interface, r.prefix);
                Rule::new(spec, counter.name(), format!("{} {}", r.prefix, r.origin))
            })
            .collect();
        out.push(Rule::new(self.last.0.clone(), "-", self.last.1));
        out
    }
}
