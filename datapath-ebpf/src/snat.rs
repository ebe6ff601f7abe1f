//! The NAT engine's SNAT, shared by the masquerade (uplinks) and the egress proxy (tunnel):
//! a flow leaving by device `ifindex` gets an address (the [`Source`]'s) and a source port
//! of `Settings::nat_ports`; both directions of the flow are recorded together (zones
//! `SNAT`, `SNAT_REPLY`, keyed to that device), or the packet is dropped. Replies arriving
//! on the device are translated back.

use aya_ebpf::bindings::bpf_fib_lookup;
use tailgate_abi::{
    conntrack::{opening, partner_clock, partner_due, proto, zone, Flow, FlowKey4, FlowKey6, Nat},
    counters::Counter,
};

use crate::{
    conntrack::{self, live, nat_reply, now, At, Bytes, Table},
    counters::count,
    parse::{Ip, Packet, L4},
    services::{rewrite, transport, Family, Room},
    stage::NatRewrite,
};

/// What the SNAT does with a packet. (Fieldless, as `services::Dnat`.)
#[repr(u8)]
pub enum Snat {
    /// Not to be translated (a reply of a connection opened from the other side).
    None,
    /// The rewrite was written (an established flow).
    To,
    /// The rewrite was written for a flow it opened.
    New,
    /// Cannot be translated: dropped rather than sent with its original source.
    Drop,
}

/// Where a translated flow's address comes from.
pub trait Source<K: Family> {
    /// `fib`: room for a route lookup's parameters (per-CPU scratch).
    fn pick(&self, fib: &mut bpf_fib_lookup, dst: &K::Addr) -> Option<K::Addr>;
}

/// One address for every flow (the egress proxy: the gateway's tailnet address; IPv4 in the
/// first 4 bytes).
pub struct Fixed(pub [u8; 16]);

impl<K: Family> Source<K> for Fixed {
    #[inline(always)]
    fn pick(&self, _fib: &mut bpf_fib_lookup, _dst: &K::Addr) -> Option<K::Addr> {
        Some(K::from_nat(&Nat { addr: self.0, port: 0, flags: 0, backend: 0 }))
    }
}

/// Where the replies of connections opened from the other side are recorded: their packets
/// pass untranslated (netfilter NATs a connection only when it opens). A second zone is
/// checked when the first has no entry.
pub struct Answers(pub At, pub Option<At>);

/// Tries for a free port before a new flow is refused.
const TRIES: u32 = 8;
/// Between two tries: a prime, so that the tries of one flow are distinct ports.
const STRIDE: u32 = 1_009;

/// The translation of a packet leaving by `ifindex`.
#[inline(always)]
pub fn snat<S: Source<FlowKey4> + Source<FlowKey6>>(
    packet: &Packet,
    bytes: Bytes,
    ports: [u16; 2],
    (source, answers): (&S, &Answers),
    ifindex: u32,
    out: &mut NatRewrite,
) -> Snat {
    match (&packet.ip, transport(packet, bytes, true)) {
        (Ip::V4 { src, dst }, Some(l4)) => {
            translate::<FlowKey4, S>(packet, &l4, (src, dst), (source, answers), ports, ifindex, out)
        }
        (Ip::V6 { src, dst }, Some(l4)) => {
            translate::<FlowKey6, S>(packet, &l4, (src, dst), (source, answers), ports, ifindex, out)
        }
        // Not a flow it can translate (an echo reply, an ICMP error, a later fragment): a
        // reply of a connection from the other side passes as it is, anything else is dropped.
        _ if conntrack::reply(packet, bytes, answers.0) => Snat::None,
        _ if answers.1.is_some_and(|at| conntrack::reply(packet, bytes, at)) => Snat::None,
        _ => Snat::Drop,
    }
}

/// A reply to a translated flow arriving by `ifindex`, translated back to its client.
#[inline(always)]
pub fn reverse(packet: &Packet, bytes: Bytes, ports: [u16; 2], ifindex: u32, out: &mut NatRewrite) -> bool {
    let Some(l4) = transport(packet, bytes, false) else { return false };
    // Only ports the engine hands out: the host's own traffic costs no lookup.
    let [first, last] = ports;
    if l4.dport < first || l4.dport > last {
        return false;
    }
    match &packet.ip {
        Ip::V4 { src, dst } => reverse_family::<FlowKey4>(packet, &l4, (src, dst), ifindex, out),
        Ip::V6 { src, dst } => reverse_family::<FlowKey6>(packet, &l4, (src, dst), ifindex, out),
    }
}

/// Records at `at` a connection opened from the other side (its replies are then left
/// alone, see [`Answers`]) — unless the packet is itself the reply of a flow translated on
/// `translated_on` (translated back on its arrival there: its `SNAT` entry).
#[inline(always)]
pub fn record_opened(packet: &Packet, bytes: Bytes, translated_on: u32, at: At) {
    if let Some(l4) = transport(packet, bytes, false) {
        let translated = match &packet.ip {
            Ip::V4 { src, dst } => {
                forward_key::<FlowKey4>(packet, &l4, (src, dst), translated_on).get().is_some()
            }
            Ip::V6 { src, dst } => {
                forward_key::<FlowKey6>(packet, &l4, (src, dst), translated_on).get().is_some()
            }
        };
        if translated {
            return;
        }
    }
    conntrack::record(packet, bytes, at);
}

/// The `SNAT` entry a reply (`src` → `dst`) arriving by `ifindex` was translated by.
#[inline(always)]
fn forward_key<K: Family>(packet: &Packet, l4: &L4, (src, dst): (&K::Addr, &K::Addr), ifindex: u32) -> K {
    K::of(*dst, *src, l4.dport, l4.sport, packet.proto, At { zone: zone::SNAT, ifindex })
}

#[inline(always)]
fn translate<K: Family, S: Source<K>>(
    packet: &Packet,
    l4: &L4,
    (src, dst): (&K::Addr, &K::Addr),
    (source, answers): (&S, &Answers),
    [first, last]: [u16; 2],
    ifindex: u32,
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
    // A reply of a connection from the other side (a UDP answer, a TCP segment after the
    // handshake) passes as it is.
    // (Keyed in the scratch entry: `conntrack::reply` would need a stack these programs
    // have not. An echo request never answers anything.)
    if proto != K::ICMP {
        if answered(s, packet, l4, (src, dst), answers.0) {
            return Snat::None;
        }
        if let Some(at) = answers.1 {
            if answered(s, packet, l4, (src, dst), at) {
                return Snat::None;
            }
        }
    }
    // A new flow, if this packet can open one (not a SYN-ACK or RST: those answer a
    // connection from elsewhere; never sent out untranslated).
    let Some(state) = opening(proto, flags) else { return Snat::Drop };
    if first == 0 || last < first {
        return Snat::Drop;
    }
    let Some(address) = source.pick(&mut s.fib, dst) else { return Snat::Drop };
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
    *out = rewrite::<K>(packet, l4, *src, &s.nat, true);
    Snat::New
}

/// Whether the packet answers a live flow recorded at `at` (refreshed, its later fragments
/// let through as `conntrack::reply` does).
#[inline(always)]
fn answered<K: Family>(
    s: &mut Room<K>,
    packet: &Packet,
    l4: &L4,
    (src, dst): (&K::Addr, &K::Addr),
    at: At,
) -> bool {
    let proto = packet.proto;
    s.reply = K::of(*dst, *src, l4.dport, l4.sport, proto, at);
    let Some((flow, now)) = live(&s.reply) else { return false };
    // SAFETY: a map value; concurrent writers only race on refresh fields.
    unsafe { &mut *flow }.seen(proto, l4.tcp_flags, now, true);
    if packet.fragment {
        let id = packet.fragment_id;
        K::of(*src, *dst, (id >> 16) as u16, id as u16, proto, at).remember_fragment(now);
    }
    true
}

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
