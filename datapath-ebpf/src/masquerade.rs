//! Masquerade (`[subnet_routes] masquerade`): a flow from the tunnel (its packets carry the
//! subnet-route mark) leaving an uplink gets the uplink's address and a source port of
//! `Settings::nat_ports`; replies arriving on that uplink are translated back. Both
//! directions of a flow are recorded together (zones `SNAT`, `SNAT_REPLY`), or the packet is
//! dropped: a tailnet source never leaves an uplink untranslated.
//!
//! As netfilter NATs a connection when it opens, the replies of a connection opened from a
//! LAN device into the tunnel (recorded at the tunnel's egress, zone `INBOUND`) are left
//! alone, though marked.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC},
    helpers::bpf_fib_lookup as fib_lookup,
};
use tailgate_abi::{
    conntrack::{opening, partner_clock, partner_due, proto, zone, Flow, FlowKey4, FlowKey6, Nat},
    counters::Counter,
    settings::Settings,
};

use crate::{
    conntrack::{self, live, nat_reply, now, At, Bytes, Table},
    counters::count,
    parse::{Ip, Packet, L4},
    services::{rewrite, transport, Family},
    stage::NatRewrite,
};

/// What the masquerade does with a marked packet leaving an uplink. (Fieldless, as
/// `services::Dnat`.)
#[repr(u8)]
pub enum Snat {
    /// Not to be translated (a reply of a connection opened from the LAN side).
    None,
    /// The rewrite was written.
    To,
    /// Cannot be translated: dropped rather than sent with a tailnet source.
    Drop,
}

/// Tries for a free port before a new flow is refused.
const TRIES: u32 = 8;

/// Uplink egress: the translation of a marked packet forwarded out of uplink `ifindex`
/// (arrived by `ingress`, the tunnel). `skb`: the context, for the route lookup that picks
/// the address (as MASQUERADE: the uplink's address towards the destination).
#[inline(always)]
pub fn snat(
    packet: &Packet,
    bytes: Bytes,
    settings: &Settings,
    (skb, ifindex, ingress): (*mut core::ffi::c_void, u32, u32),
    out: &mut NatRewrite,
) -> Snat {
    let at = At { zone: zone::INBOUND, ifindex: ingress };
    match (&packet.ip, transport(packet, bytes, true)) {
        (Ip::V4 { src, dst }, Some(l4)) => {
            snat_family::<FlowKey4>(packet, &l4, (src, dst), at, settings.nat_ports, (skb, ifindex), out)
        }
        (Ip::V6 { src, dst }, Some(l4)) => {
            snat_family::<FlowKey6>(packet, &l4, (src, dst), at, settings.nat_ports, (skb, ifindex), out)
        }
        // Not a flow it can translate (an echo reply, an ICMP error, a later fragment): a
        // reply of a connection from the LAN side passes as it is, anything else is dropped.
        _ if conntrack::reply(packet, bytes, at) => Snat::None,
        _ => Snat::Drop,
    }
}

/// Uplink ingress: a reply to a masqueraded flow, translated back to its client.
#[inline(always)]
pub fn reverse(
    packet: &Packet,
    bytes: Bytes,
    settings: &Settings,
    ifindex: u32,
    out: &mut NatRewrite,
) -> bool {
    let Some(l4) = transport(packet, bytes, false) else { return false };
    // Only ports the masquerade hands out: the host's own traffic costs no lookup.
    let [first, last] = settings.nat_ports;
    if l4.dport < first || l4.dport > last {
        return false;
    }
    match &packet.ip {
        Ip::V4 { src, dst } => reverse_family::<FlowKey4>(packet, &l4, (src, dst), ifindex, out),
        Ip::V6 { src, dst } => reverse_family::<FlowKey6>(packet, &l4, (src, dst), ifindex, out),
    }
}

/// Tunnel egress: whether a packet forwarded from `ingress` is a masqueraded flow's reply
/// (translated back on its arrival); anything else from the LAN side is recorded as a
/// connection into the tunnel, whose replies the masquerade leaves alone.
#[inline(always)]
pub fn record_inbound(packet: &Packet, bytes: Bytes, ingress: u32, tunnel: u32) {
    if let Some(l4) = transport(packet, bytes, false) {
        let translated = match &packet.ip {
            Ip::V4 { src, dst } => forward_key::<FlowKey4>(packet, &l4, (src, dst), ingress).get().is_some(),
            Ip::V6 { src, dst } => forward_key::<FlowKey6>(packet, &l4, (src, dst), ingress).get().is_some(),
        };
        if translated {
            return;
        }
    }
    conntrack::record(packet, bytes, At { zone: zone::INBOUND, ifindex: tunnel });
}

/// The `SNAT` entry a reply (`src` → `dst`) arriving by uplink `ifindex` was translated by.
#[inline(always)]
fn forward_key<K: Family>(packet: &Packet, l4: &L4, (src, dst): (&K::Addr, &K::Addr), ifindex: u32) -> K {
    K::of(*dst, *src, l4.dport, l4.sport, packet.proto, At { zone: zone::SNAT, ifindex })
}

#[inline(always)]
fn snat_family<K: Uplink>(
    packet: &Packet,
    l4: &L4,
    (src, dst): (&K::Addr, &K::Addr),
    inbound: At,
    [first, last]: [u16; 2],
    (skb, ifindex): (*mut core::ffi::c_void, u32),
    out: &mut NatRewrite,
) -> Snat {
    // SAFETY: this CPU's scratch entry, used by one program run at a time.
    let Some(s) = K::scratch().map(|s| unsafe { &mut *s }) else { return Snat::Drop };
    let (proto, flags) = (packet.proto, l4.tcp_flags);
    let at = At { zone: zone::SNAT, ifindex };
    s.key = K::of(*src, *dst, l4.sport, l4.dport, proto, at);
    if let Some((flow, now)) = live(&s.key) {
        // SAFETY: a map value; concurrent writers only race on refresh fields.
        let flow = unsafe { &mut *flow };
        flow.seen(proto, flags, now, false);
        s.nat = flow.nat;
        if partner_due(flow, flags, now) {
            flow.partner_seen = partner_clock(now);
            let (sport, dport) = ports(proto, s.nat.port, l4.dport);
            s.reply = K::of(K::from_nat(&s.nat), *dst, sport, dport, proto, reply_zone(ifindex));
            if let Some(reply) = s.reply.get() {
                // SAFETY: a map value; concurrent writers only race on refresh fields.
                let reply = unsafe { &mut *reply };
                reply.seen(proto, flags, now, false);
            } else {
                // Evicted: put back (no other flow can have taken its tuple: the port was
                // handed out with its reply entry).
                s.reply_flow = Flow { last_seen: now, created: now, state: flow.state, ..Flow::default() };
                s.reply_flow.nat = Nat { addr: K::to_nat(*src), port: l4.sport, flags: 0, backend: 0 };
                if s.reply.insert_new(&s.reply_flow) {
                    count(Counter::FlowCreated);
                }
            }
        }
        *out = rewrite::<K>(packet, l4, *src, &s.nat, true);
        return Snat::To;
    }
    // A reply of a connection from the LAN side (a UDP answer, a TCP segment after the
    // handshake) passes as it is.
    // (Keyed in the scratch entry: `conntrack::reply` would need a stack this program
    // has not. An echo request never answers anything.)
    if proto != K::ICMP {
        s.reply = K::of(*dst, *src, l4.dport, l4.sport, proto, inbound);
        if let Some((flow, now)) = live(&s.reply) {
            // SAFETY: a map value; concurrent writers only race on refresh fields.
            let flow = unsafe { &mut *flow };
            flow.seen(proto, flags, now, true);
            // Its later fragments pass by the datagram (see `conntrack::reply`).
            if packet.fragment {
                let id = packet.fragment_id;
                K::of(*src, *dst, (id >> 16) as u16, id as u16, proto, inbound).remember_fragment(now);
            }
            return Snat::None;
        }
    }
    // A new flow, if this packet can open one (not a SYN-ACK or RST: those answer a
    // connection from elsewhere; never sent out untranslated).
    let Some(state) = opening(proto, flags) else { return Snat::Drop };
    if first == 0 || last < first {
        return Snat::Drop;
    }
    let Some(address) = K::source(skb, &mut s.fib, dst, ifindex) else { return Snat::Drop };
    let span = u32::from(last - first) + 1;
    // The client's own port where it is in the range, else one from the flow's hash; then
    // further ones, spread over the range.
    let start = if l4.sport >= first && l4.sport <= last {
        u32::from(l4.sport - first)
    } else {
        K::hash(src, dst, l4.sport, l4.dport, proto) % span
    };
    let now = now();
    s.reply_flow = Flow { last_seen: now, created: now, state, ..Flow::default() };
    s.reply_flow.nat = Nat { addr: K::to_nat(*src), port: l4.sport, flags: 0, backend: 0 };
    let mut port = 0u16;
    for i in 0..TRIES {
        let candidate = first + ((start + i * STRIDE) % span) as u16;
        let (sport, dport) = ports(proto, candidate, l4.dport);
        s.reply = K::of(address, *dst, sport, dport, proto, reply_zone(ifindex));
        // The reply entry first, only where none is: it is what reserves the port.
        if s.reply.insert_new(&s.reply_flow)
            || (live(&s.reply).is_none() && s.reply.insert_new(&s.reply_flow))
        {
            port = candidate;
            break;
        }
    }
    if port == 0 {
        return Snat::Drop;
    }
    s.nat = Nat { addr: K::to_nat(address), port, flags: 0, backend: 0 };
    s.flow =
        Flow { last_seen: now, created: now, state, flags_original: flags, nat: s.nat, ..Flow::default() };
    if !s.key.insert(&s.flow) {
        s.reply.remove();
        count(Counter::FlowCreateFailed);
        return Snat::Drop;
    }
    // Both entries.
    count(Counter::FlowCreated);
    count(Counter::FlowCreated);
    count(Counter::MasqueradeNew);
    *out = rewrite::<K>(packet, l4, *src, &s.nat, true);
    Snat::To
}

/// Between two tries: a prime, so that the tries of one flow are distinct ports.
const STRIDE: u32 = 1_009;

#[inline(always)]
fn reverse_family<K: Family>(
    packet: &Packet,
    l4: &L4,
    (src, dst): (&K::Addr, &K::Addr),
    ifindex: u32,
    out: &mut NatRewrite,
) -> bool {
    let proto = packet.proto;
    let key = K::of(*dst, *src, l4.dport, l4.sport, proto, reply_zone(ifindex));
    let forward = |client: &Nat| {
        let (sport, dport) = ports(proto, client.port, l4.sport);
        K::of(K::from_nat(client), *src, sport, dport, proto, At { zone: zone::SNAT, ifindex })
    };
    let Some(client) = nat_reply(&key, l4.tcp_flags, forward) else { return false };
    *out = rewrite::<K>(packet, l4, *dst, &client, false);
    true
}

/// A flow's key ports with the client's side `port`: an ICMP echo's identifier stands for
/// both.
#[inline(always)]
fn ports(proto: u8, port: u16, remote: u16) -> (u16, u16) {
    if proto == proto::ICMP || proto == proto::ICMPV6 {
        (port, port)
    } else {
        (port, remote)
    }
}

#[inline(always)]
fn reply_zone(ifindex: u32) -> At {
    At { zone: zone::SNAT_REPLY, ifindex }
}

/// The address the masquerade gives a flow: the route's preferred source towards `dst` out
/// of the uplink (what MASQUERADE picks), when the route leaves by that uplink.
pub trait Uplink: Family {
    /// `params`: room for the lookup's parameters (per-CPU scratch: they do not fit the
    /// stack).
    fn source(
        skb: *mut core::ffi::c_void,
        params: &mut bpf_fib_lookup,
        dst: &Self::Addr,
        ifindex: u32,
    ) -> Option<Self::Addr>;
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// A route lookup as the uplink's output, without a neighbour (the packet is routed
/// already), that reports the source address.
const FIB_FLAGS: u32 = BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_SRC;
/// Results that carry the source: found, or found but larger than the device's MTU.
const FIB_SUCCESS: i64 = 0;
const FIB_FRAG_NEEDED: i64 = 8;

#[inline(always)]
fn lookup(skb: *mut core::ffi::c_void, params: &mut bpf_fib_lookup, ifindex: u32) -> bool {
    // SAFETY: a zeroed parameter block of the size passed.
    let result = unsafe { fib_lookup(skb, params, core::mem::size_of::<bpf_fib_lookup>() as i32, FIB_FLAGS) };
    (result == FIB_SUCCESS || result == FIB_FRAG_NEEDED) && params.ifindex == ifindex
}

impl Uplink for FlowKey4 {
    #[inline(always)]
    fn source(
        skb: *mut core::ffi::c_void,
        params: &mut bpf_fib_lookup,
        dst: &[u8; 4],
        ifindex: u32,
    ) -> Option<[u8; 4]> {
        // SAFETY: plain data, valid zeroed.
        *params = unsafe { core::mem::zeroed() };
        params.family = AF_INET;
        params.ifindex = ifindex;
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(*dst);
        if !lookup(skb, params, ifindex) {
            return None;
        }
        // SAFETY: the IPv4 member, written by the lookup.
        let source = unsafe { params.__bindgen_anon_3.ipv4_src }.to_ne_bytes();
        (source != [0; 4]).then_some(source)
    }
}

impl Uplink for FlowKey6 {
    #[inline(always)]
    fn source(
        skb: *mut core::ffi::c_void,
        params: &mut bpf_fib_lookup,
        dst: &[u8; 16],
        ifindex: u32,
    ) -> Option<[u8; 16]> {
        // SAFETY: plain data, valid zeroed.
        *params = unsafe { core::mem::zeroed() };
        params.family = AF_INET6;
        params.ifindex = ifindex;
        // SAFETY: 16 bytes into the 16-byte member.
        unsafe { params.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(*dst) };
        if !lookup(skb, params, ifindex) {
            return None;
        }
        // SAFETY: the IPv6 member, written by the lookup.
        let source = unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(params.__bindgen_anon_3.ipv6_src) };
        (source != [0; 16]).then_some(source)
    }
}
