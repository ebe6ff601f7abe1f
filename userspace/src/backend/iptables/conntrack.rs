//! Flow tracking as iptables rules, on the kernel's conntrack.
//!
//! ```text
//! mangle/tg-output:  -o TUN -j RETURN                       (allow_replies)
//!                    -o lo -j RETURN
//!                    -m conntrack --ctstate NEW -j CONNMARK --set-xmark <OWN>/<OWN>
//! filter/tg-input:   ! -i TUN -m connmark --mark <OWN>/<OWN> -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
//!                    (then the CGNAT prefix rules, see `cgnat`)
//! filter/tg-forward: (subnet-route rules first, see `subnet_routes`)
//!                    -o TUN -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP   (stateful)
//!                    (then the CGNAT prefix rules)
//! ```
//! A plain `--ctstate ESTABLISHED,RELATED` accept in tg-input would let a LAN host forge a
//! tailnet peer's address into a connection the gateway has *through the tunnel*
//! (CVE-2019-14899): only connections the gateway opened out of a device other than the
//! tunnel carry the connmark, so only their replies get past the CGNAT drop. The stateful
//! rule comes before the prefix rules, as in the reference: an exempt source does not get
//! past it.

use tailgate_abi::counters::Counter;

use super::{
    render::{Builder, FAMILIES},
    table::{Rule, Table},
};
use crate::policy::DesiredState;

pub const OUTPUT: &str = "tg-output";
/// The connmark bit of the gateway's own connections out of non-tunnel devices: outside the
/// bits the reference's marks use (0xff0000), which some hosts copy between packet marks
/// and connmarks.
pub const OWN_CONNMARK: &str = "0x1000000/0x1000000";

pub fn render(b: &mut Builder, state: &DesiredState) {
    let tun = &state.tunnel;
    for family in FAMILIES {
        if state.conntrack.own_replies {
            let output = vec![
                Rule::new(format!("-o {tun} -j RETURN"), "-", "own flows: not through the tunnel"),
                Rule::new("-o lo -j RETURN".into(), "-", "own flows: not to this host"),
                Rule::new(
                    format!("-m conntrack --ctstate NEW -j CONNMARK --set-xmark {OWN_CONNMARK}"),
                    "-",
                    "own flows: mark",
                ),
            ];
            b.add(family, Table::Mangle, OUTPUT, "OUTPUT", output);
            let reply = Rule::new(
                format!(
                    "! -i {tun} -m connmark --mark {OWN_CONNMARK} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"
                ),
                Counter::UplinkPassReply.name(),
                "own flows: replies",
            );
            b.add(family, Table::Filter, super::cgnat::INPUT, "INPUT", vec![reply]);
        }
        if state.conntrack.stateful {
            let stateful = Rule::new(
                format!("-o {tun} -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP"),
                Counter::TunnelDropStateful.name(),
                "stateful: only flows opened from the tunnel",
            );
            b.add(family, Table::Filter, super::cgnat::FORWARD, "FORWARD", vec![stateful]);
        }
    }
}
