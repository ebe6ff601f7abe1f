//! The flow table (see `tailgate_abi::conntrack`): owning paths record flows, reply paths
//! ask whether a packet belongs to one. Only lookups on the reply paths; an insert only when
//! a flow opens (or its entry had expired).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use tailgate_abi::{
    conntrack::{
        expired, opening, partner_clock, partner_due, proto, zone, Flow, FlowKey4, FlowKey6, Nat,
        FRAG_TIMEOUT_NS,
    },
    counters::Counter,
};

use crate::{
    counters::count,
    maps::{FLOWS4, FLOWS6, FRAGS4, FRAGS6},
    parse::{be16, read, Ip, Packet},
};

/// Where a flow is keyed: the owning path's zone and the device it crossed.
#[derive(Clone, Copy)]
pub struct At {
    pub zone: u8,
    pub ifindex: u32,
}

impl At {
    /// The gateway's own flows out of uplink `ifindex`.
    pub fn own(ifindex: u32) -> Self {
        Self { zone: zone::OWN, ifindex }
    }

    /// Flows opened from the tunnel `ifindex`.
    pub fn tunnel(ifindex: u32) -> Self {
        Self { zone: zone::TUNNEL, ifindex }
    }
}

/// The packet's bytes: `[data, data_end)`.
#[derive(Clone, Copy)]
pub struct Bytes {
    pub data: usize,
    pub data_end: usize,
}

/// On an owning path: records the packet's flow (creates it, or refreshes it in the
/// original direction). Packets that cannot open a flow (echo replies, ICMP errors, a RST
/// without a flow) create nothing.
#[inline(always)]
pub fn record(packet: &Packet, bytes: Bytes, at: At) {
    match packet.ip {
        Ip::V4 { src, dst } => record_key(seen::<FlowKey4>(packet, src, dst, bytes, at)),
        Ip::V6 { src, dst } => record_key(seen::<FlowKey6>(packet, src, dst, bytes, at)),
    }
}

/// On a reply path: whether the packet answers a live flow recorded at `at` (its reversed
/// tuple is one), or is an ICMP error about one. An answer refreshes the flow.
#[inline(always)]
pub fn reply(packet: &Packet, bytes: Bytes, at: At) -> bool {
    match packet.ip {
        Ip::V4 { src, dst } => reply_family::<FlowKey4>(packet, src, dst, bytes, at),
        Ip::V6 { src, dst } => reply_family::<FlowKey6>(packet, src, dst, bytes, at),
    }
}

/// Later fragments carry no ports: they pass when their datagram's first fragment did.
#[inline(always)]
fn reply_family<K: Key>(packet: &Packet, src: K::Addr, dst: K::Addr, bytes: Bytes, at: At) -> bool {
    // Built only for fragments.
    let datagram = || {
        let id = packet.fragment_id;
        K::of(src, dst, (id >> 16) as u16, id as u16, packet.proto, at)
    };
    if packet.fragment && packet.transport == 0 {
        count(Counter::FlowLookups);
        // SAFETY: a map value.
        return datagram()
            .fragment()
            .is_some_and(|seen| now().saturating_sub(unsafe { *seen }) <= FRAG_TIMEOUT_NS);
    }
    let answers = reply_key(seen::<K>(packet, src, dst, bytes, at));
    if answers && packet.fragment {
        datagram().remember_fragment(now());
    }
    answers
}

/// What a packet is to the flow table.
#[derive(Clone, Copy)]
enum Seen<K> {
    /// A packet of a flow, keyed by its own tuple. `opens`: it may open one (all but ICMP
    /// echo replies); `answers`: it may be a reply (all but echo requests).
    Flow { key: K, flags: u8, opens: bool, answers: bool },
    /// An ICMP error, keyed by the tuple of the packet it quotes.
    Error(K),
    /// Nothing to key by (a later fragment, a truncated header, other ICMP types).
    Untracked,
}

#[inline(always)]
fn seen<K: Key>(packet: &Packet, src: K::Addr, dst: K::Addr, bytes: Bytes, at: At) -> Seen<K> {
    if let Some(l4) = packet.l4 {
        let flags = if packet.proto == proto::TCP { l4.tcp_flags } else { 0 };
        let key = K::of(src, dst, l4.sport, l4.dport, packet.proto, at);
        return Seen::Flow { key, flags, opens: true, answers: true };
    }
    if packet.proto == proto::TCP || packet.proto == proto::UDP {
        return Seen::Untracked;
    }
    if packet.proto != K::ICMP {
        // Tracked by addresses alone; a later fragment belongs to the same flow.
        let key = K::of(src, dst, 0, 0, packet.proto, at);
        return Seen::Flow { key, flags: 0, opens: true, answers: true };
    }
    // The mask bounds the offset for the verifier; an ICMP header further in than it can
    // express (behind huge extension headers) is not read at all (a wrapped offset would
    // read the attacker's bytes).
    if packet.transport == 0 || packet.transport > MAX_TRANSPORT {
        return Seen::Untracked;
    }
    let header = bytes.data + usize::from(packet.transport & MAX_TRANSPORT);
    if header + 8 > bytes.data_end {
        return Seen::Untracked;
    }
    let kind = read::<u8>(header);
    if kind == K::ECHO_REQUEST || kind == K::ECHO_REPLY {
        let id = be16(header + 4);
        let key = K::of(src, dst, id, id, packet.proto, at);
        let request = kind == K::ECHO_REQUEST;
        return Seen::Flow { key, flags: 0, opens: request, answers: !request };
    }
    if K::is_error(kind) {
        // The quoted packet was sent by the one receiving the error (as conntrack checks).
        if let Some(key) = K::quoted(bytes, header + 8, dst, at) {
            return Seen::Error(key);
        }
    }
    Seen::Untracked
}

#[inline(always)]
fn record_key<K: Key>(seen: Seen<K>) {
    let Seen::Flow { key, flags, opens: true, .. } = seen else { return };
    let proto = key.proto();
    if let Some((flow, now)) = live(&key) {
        // SAFETY: a map value; concurrent writers only race on refresh fields.
        let flow = unsafe { &mut *flow };
        flow.seen(proto, flags, now, false);
        return;
    }
    let Some(state) = opening(proto, flags) else { return };
    let now = now();
    let flow = Flow { last_seen: now, created: now, state, flags_original: flags, ..Flow::default() };
    count(if key.insert(&flow) { Counter::FlowCreated } else { Counter::FlowCreateFailed });
}

#[inline(always)]
fn reply_key<K: Key>(seen: Seen<K>) -> bool {
    match seen {
        Seen::Flow { key, flags, answers: true, .. } => {
            let key = key.reversed();
            let Some((flow, now)) = live(&key) else { return false };
            // SAFETY: a map value; concurrent writers only race on refresh fields.
            let flow = unsafe { &mut *flow };
            flow.seen(key.proto(), flags, now, true);
            true
        }
        // Related, not part of the flow: no refresh (as conntrack).
        Seen::Error(key) => live(&key).is_some(),
        _ => false,
    }
}

/// The entry of `key` and the time, unless it has expired (then it is deleted). The clock
/// is read only after a hit: a miss (every unsolicited packet) costs the lookup alone.
#[inline(always)]
pub fn live<K: Key>(key: &K) -> Option<(*mut Flow, u64)> {
    count(Counter::FlowLookups);
    let flow = key.get()?;
    let now = now();
    // SAFETY: a map value.
    if expired(unsafe { &*flow }, key.proto(), now) {
        key.remove();
        count(Counter::FlowExpired);
        return None;
    }
    Some((flow, now))
}

/// A reply to a translated flow, keyed by its translated tuple reversed (`key`, a NAT
/// reply zone): the translation back, once the entry — and, at most about once a second and
/// at once on SYN/FIN/RST, its partner (`partner`: the flow's original entry, from the
/// translation) — followed the reply. (The original entry only sees the client's packets
/// otherwise: answered UDP lives 120 s, a RST or FIN from the other side ends the flow.)
#[inline(always)]
pub fn nat_reply<K: Key>(key: &K, flags: u8, partner: impl FnOnce(&Nat) -> K) -> Option<Nat> {
    let (flow, now) = live(key)?;
    // SAFETY: a map value; concurrent writers only race on refresh fields.
    let flow = unsafe { &mut *flow };
    let proto = key.proto();
    flow.seen(proto, flags, now, true);
    let nat = flow.nat;
    if partner_due(flow, flags, now) {
        flow.partner_seen = partner_clock(now);
        if let Some(original) = partner(&nat).get() {
            // SAFETY: a map value; concurrent writers only race on refresh fields.
            unsafe { &mut *original }.seen(proto, flags, now, true);
        }
    }
    Some(nat)
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// A family's key: its tuple, its ICMP, its table.
pub trait Key: Table {
    type Addr: Copy + PartialEq;
    /// The family's ICMP protocol and echo types.
    const ICMP: u8;
    const ECHO_REQUEST: u8;
    const ECHO_REPLY: u8;
    fn of(src: Self::Addr, dst: Self::Addr, sport: u16, dport: u16, proto: u8, at: At) -> Self;
    /// ICMP types that quote the packet they are about.
    fn is_error(kind: u8) -> bool;
    /// The key of the packet quoted from `inner` (its IP header) on, if that packet's source
    /// is `receiver` (the error's destination).
    fn quoted(bytes: Bytes, inner: usize, receiver: Self::Addr, at: At) -> Option<Self>;
}

/// The tables a key type lives in, and what every key is.
pub trait Table: Copy {
    fn reversed(self) -> Self;
    fn proto(&self) -> u8;
    fn get(&self) -> Option<*mut Flow>;
    fn insert(&self, flow: &Flow) -> bool;
    /// Inserts only where no entry is (`BPF_NOEXIST`).
    fn insert_new(&self, flow: &Flow) -> bool;
    fn remove(&self);
    /// When the first fragment of the datagram this key names passed.
    fn fragment(&self) -> Option<*const u64>;
    fn remember_fragment(&self, now: u64);
}

macro_rules! table {
    ($key:ty, $map:ident, $frags:ident) => {
        impl Table for $key {
            #[inline(always)]
            fn reversed(self) -> Self {
                <$key>::reversed(self)
            }

            #[inline(always)]
            fn proto(&self) -> u8 {
                self.proto
            }

            #[inline(always)]
            fn get(&self) -> Option<*mut Flow> {
                $map.get_ptr_mut(self)
            }

            #[inline(always)]
            fn insert(&self, flow: &Flow) -> bool {
                $map.insert(self, flow, 0).is_ok()
            }

            #[inline(always)]
            fn insert_new(&self, flow: &Flow) -> bool {
                const BPF_NOEXIST: u64 = 1;
                $map.insert(self, flow, BPF_NOEXIST).is_ok()
            }

            #[inline(always)]
            fn remove(&self) {
                let _ = $map.remove(self);
            }

            #[inline(always)]
            fn fragment(&self) -> Option<*const u64> {
                $frags.get_ptr(self)
            }

            #[inline(always)]
            fn remember_fragment(&self, now: u64) {
                let _ = $frags.insert(self, now, 0);
            }
        }
    };
}

table!(FlowKey4, FLOWS4, FRAGS4);
table!(FlowKey6, FLOWS6, FRAGS6);

/// The quoted transport header's ports (or echo identifier) at `l4`, for `proto`.
#[inline(always)]
fn quoted_ports(bytes: Bytes, l4: usize, proto: u8, icmp: u8, echo_request: u8) -> Option<(u16, u16)> {
    // ICMP errors quote at least 8 bytes of the transport header (RFC 792): the ports, or
    // the echo's type and identifier.
    if l4 + 8 > bytes.data_end {
        return None;
    }
    if proto == proto::TCP || proto == proto::UDP {
        return Some((be16(l4), be16(l4 + 2)));
    }
    if proto == icmp && read::<u8>(l4) == echo_request {
        let id = be16(l4 + 4);
        return Some((id, id));
    }
    None
}

/// The largest transport-header offset read (see `seen`).
pub const MAX_TRANSPORT: u16 = 0x3ff;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_SOURCE_QUENCH: u8 = 4;
const ICMP_REDIRECT: u8 = 5;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

impl Key for FlowKey4 {
    type Addr = [u8; 4];
    const ICMP: u8 = proto::ICMP;
    const ECHO_REQUEST: u8 = ICMP_ECHO;
    const ECHO_REPLY: u8 = ICMP_ECHO_REPLY;

    #[inline(always)]
    fn of(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8, at: At) -> Self {
        Self::new(src, dst, (sport, dport), proto, at.zone, at.ifindex)
    }

    #[inline(always)]
    fn is_error(kind: u8) -> bool {
        matches!(
            kind,
            ICMP_DEST_UNREACH | ICMP_SOURCE_QUENCH | ICMP_REDIRECT | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
        )
    }

    #[inline(always)]
    fn quoted(bytes: Bytes, inner: usize, receiver: [u8; 4], at: At) -> Option<Self> {
        if inner + 20 > bytes.data_end || read::<[u8; 4]>(inner + 12) != receiver {
            return None;
        }
        let ver_ihl = read::<u8>(inner);
        let ihl = usize::from(ver_ihl & 0x0f) * 4;
        // A quoted fragment other than the first has no ports.
        if ver_ihl >> 4 != 4 || ihl < 20 || be16(inner + 6) & 0x1fff != 0 {
            return None;
        }
        let proto = read::<u8>(inner + 9);
        let (sport, dport) = quoted_ports(bytes, inner + ihl, proto, proto::ICMP, ICMP_ECHO)?;
        Some(Self::of(read(inner + 12), read(inner + 16), sport, dport, proto, at))
    }
}

const IPPROTO_FRAGMENT: u8 = 44;
const IPV6_FRAG_OFFSET: u16 = 0xfff8;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAMPROB: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

impl Key for FlowKey6 {
    type Addr = [u8; 16];
    const ICMP: u8 = proto::ICMPV6;
    const ECHO_REQUEST: u8 = ICMPV6_ECHO_REQUEST;
    const ECHO_REPLY: u8 = ICMPV6_ECHO_REPLY;

    #[inline(always)]
    fn of(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, proto: u8, at: At) -> Self {
        Self::new(src, dst, (sport, dport), proto, at.zone, at.ifindex)
    }

    #[inline(always)]
    fn is_error(kind: u8) -> bool {
        matches!(kind, ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG | ICMPV6_TIME_EXCEED | ICMPV6_PARAMPROB)
    }

    #[inline(always)]
    fn quoted(bytes: Bytes, inner: usize, receiver: [u8; 16], at: At) -> Option<Self> {
        if inner + 40 > bytes.data_end
            || read::<u8>(inner) >> 4 != 6
            || read::<[u8; 16]>(inner + 8) != receiver
        {
            return None;
        }
        // The transport header right after the fixed header, or after a fragment header (a
        // Packet Too Big about a fragmented datagram quotes its first fragment); other
        // extension headers are not walked.
        let mut proto = read::<u8>(inner + 6);
        let mut l4 = inner + 40;
        if proto == IPPROTO_FRAGMENT {
            if l4 + 8 > bytes.data_end || be16(l4 + 2) & IPV6_FRAG_OFFSET != 0 {
                return None;
            }
            proto = read::<u8>(l4);
            l4 += 8;
        }
        let (sport, dport) = quoted_ports(bytes, l4, proto, proto::ICMPV6, ICMPV6_ECHO_REQUEST)?;
        Some(Self::of(read(inner + 8), read(inner + 24), sport, dport, proto, at))
    }
}
