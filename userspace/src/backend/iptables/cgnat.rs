//! CGNAT source filtering in iptables. The built-in ranges alone (the reference's
//! configuration) are rules, in longest-prefix-first order so the first matching rule is
//! the one the BPF LPM lookup would pick, rule for rule as the reference writes them:
//!
//! ```text
//! filter/tg-input:    ! -i TUN -s <prefix> -j RETURN|DROP   (inbound rules, longest first)
//!                     -i TUN -j ACCEPT
//! filter/tg-forward:  (subnet-route rules first, see `subnet_routes`)
//!                     -o TUN -s <prefix> -j ACCEPT|DROP     (forward rules, longest first)
//!                     -o TUN -j ACCEPT
//! ```
//!
//! With the user's prefixes, a family's list goes into one kernel set (see `sets`) matched
//! by a constant number of rules; traffic from outside the filtered range (R, the list's
//! widest prefix) leaves after one address test, whatever the list's size:
//!
//! ```text
//! filter/tg-input:    -i TUN -j ACCEPT
//!                     ! -s R -j RETURN
//!                     (replies to the gateway's own connections, see `conntrack`)
//!                     -m set --match-set <in> src -j RETURN  (longest prefix passes)
//!                     -j DROP                                (longest prefix drops)
//! filter/tg-forward:  (subnet-route and stateful rules first)
//!                     ! -o TUN -j RETURN
//!                     ! -s R -j ACCEPT
//!                     -m set --match-set <fwd> src -j ACCEPT
//!                     -j DROP
//! ```

use ipnet::IpNet;
use tailgate_abi::counters::Counter;

use super::{
    render::{Builder, FAMILIES},
    sets::{Entry, SetSpec},
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
        set: "in",
    };
    let forward = Direction {
        interface: format!("-o {tun}"),
        pass: ("ACCEPT", Counter::TunnelPassForward),
        drop: Counter::TunnelDrop,
        last: (format!("-o {tun} -j ACCEPT"), "into the tunnel"),
        set: "fwd",
    };
    for family in FAMILIES {
        let rules = of_family(&state.cgnat.inbound, family);
        match in_set(b, &inbound, &rules, family) {
            Some((set, range)) => {
                let head = vec![
                    Rule::new(inbound.last.0.clone(), "-", inbound.last.1),
                    Rule::new(format!("! -s {range} -j RETURN"), "-", format!("outside {range}")),
                ];
                b.prepend(family, Table::Filter, INPUT, "INPUT", head);
                b.add(family, Table::Filter, INPUT, "INPUT", inbound.set_rules(&set));
                b.add_set(set);
            }
            None => b.add(family, Table::Filter, INPUT, "INPUT", inbound.rules(&rules)),
        }
        let rules = of_family(&state.cgnat.forward, family);
        match in_set(b, &forward, &rules, family) {
            Some((set, range)) => {
                let mut out = vec![
                    Rule::new(format!("! -o {tun} -j RETURN"), "-", "not into the tunnel"),
                    Rule::new(format!("! -s {range} -j ACCEPT"), "-", forward.last.1),
                ];
                out.extend(forward.set_rules(&set));
                b.add(family, Table::Filter, FORWARD, "FORWARD", out);
                b.add_set(set);
            }
            None => b.add(family, Table::Filter, FORWARD, "FORWARD", forward.rules(&rules)),
        }
    }
}

fn of_family(rules: &[policy::Rule], family: Family) -> Vec<&policy::Rule> {
    rules
        .iter()
        .filter(|r| matches!((r.prefix, family), (IpNet::V4(_), Family::V4) | (IpNet::V6(_), Family::V6)))
        .collect()
}

/// The set a family's list goes into, and the range R it covers: when the host has sets
/// and the user listed prefixes (the built-ins alone stay the reference's rules). Every
/// prefix lies in R, the widest, which is a rule itself, so inside R the longest matching
/// prefix decides and outside it nothing does.
fn in_set(
    b: &Builder,
    direction: &Direction,
    rules: &[&policy::Rule],
    family: Family,
) -> Option<(SetSpec, IpNet)> {
    let prefix = b.sets()?;
    if !rules.iter().any(|r| matches!(r.origin, policy::Origin::Config(_))) {
        return None;
    }
    let range = rules.iter().min_by_key(|r| r.prefix.prefix_len())?.prefix;
    if !rules.iter().all(|r| range.contains(&r.prefix)) {
        return None;
    }
    let digit = if family == Family::V4 { 4 } else { 6 };
    // One rule per prefix (`policy::cgnat` merges a prefix listed twice): one `add` each.
    let entries = rules
        .iter()
        .map(|r| Entry {
            prefix: r.prefix,
            nomatch: r.verdict == Verdict::Drop,
            comment: r.origin.to_string(),
        })
        .collect();
    Some((SetSpec { name: format!("{prefix}-{}{digit}", direction.set), family, entries }, range))
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
    /// The list's part of its set's name (`in`, `fwd`).
    set: &'static str,
}

impl Direction {
    /// The prefix rules of one family, already in longest-prefix-first order (see
    /// `policy::cgnat`), then the closing rule. A prefix rule's label starts with the
    /// prefix, which `status` lists with its counter.
    fn rules(&self, rules: &[&policy::Rule]) -> Vec<Rule> {
        let mut out: Vec<Rule> = rules
            .iter()
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
    /// The set's two rules: a set match passes, the rest of the range drops. Labels name
    /// the set (`status` and `explain` read the entry that decided from it).
    fn set_rules(&self, set: &SetSpec) -> Vec<Rule> {
        let (target, pass) = self.pass;
        vec![
            Rule::new(
                format!("-m set --match-set {} src -j {target}", set.name),
                pass.name(),
                set_label(&set.name, "pass"),
            ),
            Rule::new("-j DROP".into(), self.drop.name(), set_label(&set.name, "drop")),
        ]
    }
}

/// `set <name>: <verdict>`, the label of a set's rules.
fn set_label(name: &str, verdict: &str) -> String {
    format!("{SET_LABEL}{name}: {verdict}")
}

/// Labels of set rules start with this; the set's name follows, up to `:`.
pub const SET_LABEL: &str = "set ";

/// The set a rule's label names (a set rule's), if any.
pub fn labelled_set(label: &str) -> Option<&str> {
    label.strip_prefix(SET_LABEL)?.split_once(':').map(|(name, _)| name)
}
