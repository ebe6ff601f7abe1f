//! Subnet routes as iptables rules: the reference's mark and accept in FORWARD, and the
//! masquerade of marked traffic leaving by any interface but the tunnel.
//!
//! ```text
//! filter/tg-forward:  -i TUN -j MARK --set-mark <value>/<mask>
//!                     -m mark --mark <value>/<mask> -j ACCEPT
//! nat/tg-postrouting: -m mark --mark <value>/<mask> ! -o TUN -j MASQUERADE   (masquerade)
//! ```

use tailgate_abi::counters::Counter;

use super::{
    render::{Builder, FAMILIES},
    table::{Rule, Table},
};
use crate::policy::DesiredState;

pub const POSTROUTING: &str = "tg-postrouting";
/// The counter name of the masquerade rule (packets that opened a masqueraded connection).
pub const MASQUERADED: &str = "masqueraded";

/// Both parts, for the iptables backend.
pub fn render(b: &mut Builder, state: &DesiredState) {
    let (tun, mark) = (&state.tunnel, state.subnet_routes.mark);
    for family in FAMILIES {
        let forward = vec![
            Rule::new(
                format!("-i {tun} -j MARK --set-mark {mark}"),
                Counter::TunnelInMarked.name(),
                "subnet route: mark",
            ),
            Rule::new(format!("-m mark --mark {mark} -j ACCEPT"), "-", "subnet route: accept"),
        ];
        b.add(family, Table::Filter, super::cgnat::FORWARD, "FORWARD", forward);
    }
    masquerade(b, state);
}

/// The masquerade rule (the BPF backend masquerades in its own programs).
fn masquerade(b: &mut Builder, state: &DesiredState) {
    if !state.subnet_routes.masquerade {
        return;
    }
    let (tun, mark) = (&state.tunnel, state.subnet_routes.mark);
    for family in FAMILIES {
        let rule = Rule::new(
            format!("-m mark --mark {mark} ! -o {tun} -j MASQUERADE"),
            MASQUERADED,
            "subnet route: masquerade",
        );
        b.add(family, Table::Nat, POSTROUTING, "POSTROUTING", vec![rule]);
    }
}
