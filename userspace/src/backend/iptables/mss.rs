//! MSS clamping as iptables rules, in its own mangle chain: mangle FORWARD runs before
//! filter FORWARD and TCPMSS does not end the chain, so no accept of anyone's (ours
//! included) can keep a SYN from being clamped (the reference's nftables bug, TS #11002).
//!
//! ```text
//! mangle/tg-mss: -i TUN -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu|--set-mss N
//!                -o TUN -p tcp --tcp-flags SYN,RST SYN -j TCPMSS ...
//! ```

use tailgate_abi::counters::Counter;

use super::{
    render::{Builder, FAMILIES},
    table::{Rule, Table},
};
use crate::policy::{DesiredState, Mss};

pub const CHAIN: &str = "tg-mss";

pub fn render(b: &mut Builder, state: &DesiredState) {
    let target = match state.mss {
        Mss::Off => return,
        // TCPMSS only ever lowers, with --set-mss too.
        Mss::Fixed(mss) => format!("TCPMSS --set-mss {mss}"),
        // The smaller of the MTUs of the route out and the route back: the tunnel's.
        Mss::Pmtu { .. } => "TCPMSS --clamp-mss-to-pmtu".to_string(),
    };
    let tun = &state.tunnel;
    for family in FAMILIES {
        let rules = vec![
            Rule::new(
                format!("-i {tun} -p tcp -m tcp --tcp-flags SYN,RST SYN -j {target}"),
                Counter::TunnelInMssClamped.name(),
                "mss: from the tunnel",
            ),
            Rule::new(
                format!("-o {tun} -p tcp -m tcp --tcp-flags SYN,RST SYN -j {target}"),
                Counter::TunnelOutMssClamped.name(),
                "mss: into the tunnel",
            ),
        ];
        b.add(family, Table::Mangle, CHAIN, "FORWARD", rules);
    }
}
