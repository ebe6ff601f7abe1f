//! The egress proxy's tunnel side (`Settings::proxy_target`): a packet forwarded to the
//! target leaves the tunnel with the gateway's tailnet address (`proxy_source`) and a port
//! of `nat_ports` (the SNAT engine, `crate::snat`); the target's replies are translated back
//! as they come out of the tunnel. Its uplink side is the services' DNAT (entries of scope
//! `UPLINKS`, `crate::services`).
//!
//! Connections the target opens (through the gateway to the LAN, or to a service) are
//! recorded as they come out of the tunnel (zone `TUNNEL`): their replies to the target are
//! not translated, as netfilter NATs a connection only when it opens.

use tailgate_abi::{
    conntrack::zone,
    services::family,
    settings::{stage, Settings},
};

use crate::{
    conntrack::{At, Bytes},
    parse::{Ip, Packet},
    snat::{self, Answers, Fixed, Snat},
    stage::NatRewrite,
};

/// Tunnel egress: the translation of a packet forwarded to the target out of the tunnel
/// `ifindex`. Replies of the target's own connections pass: recorded from the tunnel, or
/// (a service's reply, translated back to the service's address by the time it gets here)
/// the service's flow.
#[inline(always)]
pub fn snat(packet: &Packet, bytes: Bytes, settings: &Settings, ifindex: u32, out: &mut NatRewrite) -> Snat {
    let answers = Answers(At::tunnel(ifindex), Some(At { zone: zone::DNAT, ifindex }));
    snat::snat(packet, bytes, settings.nat_ports, (&Fixed(settings.proxy_source), &answers), ifindex, out)
}

/// Tunnel ingress: records a connection the target opens (not a reply translated back).
#[inline(always)]
pub fn record_target(packet: &Packet, bytes: Bytes, ifindex: u32) {
    snat::record_opened(packet, bytes, ifindex, At::tunnel(ifindex));
}

/// Whether the egress proxy is on and `packet` goes to its target.
#[inline(always)]
pub fn to_target(packet: &Packet, settings: &Settings) -> bool {
    match &packet.ip {
        Ip::V4 { dst, .. } => is_target4(dst, settings),
        Ip::V6 { dst, .. } => is_target6(dst, settings),
    }
}

/// Whether the egress proxy is on and `packet` comes from its target.
#[inline(always)]
pub fn from_target(packet: &Packet, settings: &Settings) -> bool {
    match &packet.ip {
        Ip::V4 { src, .. } => is_target4(src, settings),
        Ip::V6 { src, .. } => is_target6(src, settings),
    }
}

#[inline(always)]
fn is_target4(addr: &[u8; 4], settings: &Settings) -> bool {
    let t = &settings.proxy_target;
    settings.stages & stage::EGRESS_PROXY != 0
        && settings.proxy_family == family::V4
        && *addr == [t[0], t[1], t[2], t[3]]
}

#[inline(always)]
fn is_target6(addr: &[u8; 16], settings: &Settings) -> bool {
    settings.stages & stage::EGRESS_PROXY != 0
        && settings.proxy_family == family::V6
        && *addr == settings.proxy_target
}
