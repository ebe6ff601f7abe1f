//! The flow table: connections the datapath tracks itself (the kernel's conntrack kfuncs are
//! out of reach of aya-ebpf 0.2.1). One LRU hash map per family, keyed by the tuple in the
//! direction of the packet that opened the flow (the "original" direction, as the kernel's
//! conntrack names it), the path that opened it and the device it crossed.
//!
//! Flows are created only on a path that owns them:
//! - [`zone::OWN`]: the gateway's own connections, at the TC egress of the uplink they leave
//!   by (after any NAT: as on the wire), and only towards addresses whose replies the CGNAT
//!   policy would drop (`[cgnat] allow_replies`);
//! - [`zone::TUNNEL`]: connections opened from the tunnel side, at the tunnel's TC ingress
//!   (`[subnet_routes] stateful`).
//!
//! A packet on the reply path (uplink XDP for `OWN`, tunnel TC egress for `TUNNEL`) looks up
//! its reversed tuple; an ICMP error looks up the tuple of the packet it quotes as is (that
//! packet went in the original direction). Entries expire lazily: a lookup that finds one
//! older than its state's timeout deletes it and counts the expiry.

/// `LruHashMap<FlowKey4, Flow>`.
pub const MAP_V4: &str = "FLOWS4";
/// `LruHashMap<FlowKey6, Flow>`.
pub const MAP_V6: &str = "FLOWS6";

/// `LruHashMap<FlowKey4, u64>`: fragmented datagrams whose first fragment passed as part of
/// a flow, keyed like a flow with the datagram's identification in place of the ports
/// (`sport`: high 16 bits, `dport`: low), valued by when that fragment passed. Later
/// fragments carry no ports: they pass by this entry.
pub const MAP_FRAGS_V4: &str = "FRAGS4";
/// `LruHashMap<FlowKey6, u64>`.
pub const MAP_FRAGS_V6: &str = "FRAGS6";
/// Datagrams in reassembly remembered per family.
pub const FRAG_ENTRIES: u32 = 8_192;
/// How long the rest of a datagram is let through after its first fragment (the kernel's
/// `ipfrag_time` default).
pub const FRAG_TIMEOUT_NS: u64 = 30 * SECOND;

/// Default capacities. Kernel memory, allocated when the map is created (key, value, the
/// hash table's element header and buckets; memlock as bpftool reports it): 136 bytes per
/// IPv4 entry, 160 per IPv6 entry: 17 MiB and 10 MiB by default.
pub const DEFAULT_ENTRIES_V4: u32 = 131_072;
pub const DEFAULT_ENTRIES_V6: u32 = 65_536;
/// Bounds of the configurable capacity: an LRU map keeps per-CPU free lists, so a table
/// much smaller than a few hundred entries per CPU evicts before it is full.
pub const MIN_ENTRIES: u32 = 1_024;
pub const MAX_ENTRIES: u32 = 16 << 20;

/// Which owning path opened a flow (part of the key: a tuple opened on one path is never a
/// reply on another).
pub mod zone {
    /// The gateway's own connection out of an uplink (`ifindex`: that uplink).
    pub const OWN: u8 = 1;
    /// A connection opened from the tunnel side (`ifindex`: the tunnel).
    pub const TUNNEL: u8 = 2;
    /// A connection to a service, under its original tuple (client → VIP); `Flow::nat`:
    /// the backend (`crate::services`).
    pub const DNAT: u8 = 3;
    /// The same connection under its translated tuple (client → backend); `Flow::nat`: the
    /// VIP, to translate replies back.
    pub const DNAT_REPLY: u8 = 4;
    /// A connection masqueraded out of an uplink (`ifindex`: that uplink), under its
    /// original tuple (tailnet client → remote); `Flow::nat`: the uplink's address and the
    /// port it was given (`crate::nat`).
    pub const SNAT: u8 = 5;
    /// The same connection under its translated tuple (uplink address → remote); `Flow::nat`:
    /// the client's address and port, to translate replies back.
    pub const SNAT_REPLY: u8 = 6;
    /// A connection opened from another device into the tunnel (`ifindex`: the tunnel),
    /// recorded while masquerading: its replies out of an uplink are not masqueraded (as
    /// netfilter NATs only a connection's first packet).
    pub const INBOUND: u8 = 7;

    pub const fn name(zone: u8) -> &'static str {
        match zone {
            OWN => "own",
            TUNNEL => "tunnel",
            DNAT => "dnat",
            DNAT_REPLY => "dnat-reply",
            SNAT => "snat",
            SNAT_REPLY => "snat-reply",
            INBOUND => "inbound",
            _ => "?",
        }
    }
}

/// Protocol numbers the table knows; any other protocol is tracked by addresses alone.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// TCP flag bits as in byte 13 of the header.
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// A flow key of one family: the tuple in the original direction (ports in host order;
/// ICMP echo: the identifier in both), the zone and the device.
macro_rules! flow_key {
    ($(#[$doc:meta])* $name:ident, $addr:ty) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name {
            pub src: $addr,
            pub dst: $addr,
            pub sport: u16,
            pub dport: u16,
            pub proto: u8,
            pub zone: u8,
            pub pad: u16,
            pub ifindex: u32,
        }

        impl $name {
            /// The key of a flow opened by a packet from `src` to `dst`, seen at `zone` on
            /// device `ifindex`.
            #[inline(always)]
            pub const fn new(src: $addr, dst: $addr, ports: (u16, u16), proto: u8, zone: u8, ifindex: u32) -> Self {
                Self { src, dst, sport: ports.0, dport: ports.1, proto, zone, pad: 0, ifindex }
            }

            /// The tuple a reply carries.
            #[inline(always)]
            pub const fn reversed(self) -> Self {
                Self { src: self.dst, dst: self.src, sport: self.dport, dport: self.sport, ..self }
            }
        }
    };
}

flow_key!(
    /// An IPv4 flow.
    FlowKey4,
    [u8; 4]
);
flow_key!(
    /// An IPv6 flow.
    FlowKey6,
    [u8; 16]
);

/// What the table knows of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet either way.
    pub last_seen: u64,
    /// When the entry was created (same clock).
    pub created: u64,
    /// [`state`].
    pub state: u8,
    /// TCP flags seen in the original and the reply direction (ORed).
    pub flags_original: u8,
    pub flags_reply: u8,
    pub pad: u8,
    /// NAT entries (zones `DNAT`, `DNAT_REPLY`, `SNAT`, `SNAT_REPLY`): when this entry last refreshed its partner
    /// (the other direction's entry), in units of 2^30 ns (~1.07 s); see [`partner_due`].
    pub partner_seen: u32,
    /// The address and port the flow is translated to (NAT zones); zero elsewhere.
    pub nat: Nat,
}

impl Flow {
    /// A packet with TCP flags `flags` (0 for other protocols) at `now`, in the reply
    /// direction (`reply`) or the original one: the entry's clock, flags and state follow.
    #[inline(always)]
    pub fn seen(&mut self, proto: u8, flags: u8, now: u64, reply: bool) {
        self.last_seen = now;
        if reply {
            self.flags_reply |= flags;
        } else {
            self.flags_original |= flags;
        }
        self.state = advance(proto, self.state, flags, reply);
    }
}

/// The NAT engine's part of a flow: the address (IPv4: first 4 bytes) and port a packet of
/// the flow is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Nat {
    pub addr: [u8; 16],
    pub port: u16,
    pub flags: u16,
    /// Zone `DNAT`: the backend's id (`crate::services::MAP_BACKENDS`).
    pub backend: u32,
}

/// A flow's state, from what was seen each way.
pub mod state {
    /// Seen in the original direction only (TCP: the handshake has not been answered).
    pub const NEW: u8 = 1;
    /// Seen both ways.
    pub const ESTABLISHED: u8 = 2;
    /// TCP: a FIN was seen.
    pub const CLOSING: u8 = 3;
    /// TCP: a RST was seen.
    pub const CLOSED: u8 = 4;

    pub const fn name(state: u8) -> &'static str {
        match state {
            NEW => "new",
            ESTABLISHED => "established",
            CLOSING => "closing",
            CLOSED => "closed",
            _ => "?",
        }
    }
}

const SECOND: u64 = 1_000_000_000;

/// How long a flow lives after its last packet, by protocol and state: the kernel's
/// conntrack defaults (`nf_conntrack_tcp_timeout_syn_sent` 120 s, `_established` 5 days,
/// `_fin_wait`/`_time_wait` 120 s, `_close` 10 s; `nf_conntrack_udp_timeout` 30 s,
/// `_stream` 120 s; `nf_conntrack_icmp_timeout` 30 s; `nf_conntrack_generic_timeout`
/// 600 s).
pub const fn timeout_ns(proto: u8, state: u8) -> u64 {
    match (proto, state) {
        (proto::TCP, state::ESTABLISHED) => 5 * 24 * 3600 * SECOND,
        (proto::TCP, state::CLOSED) => 10 * SECOND,
        (proto::TCP, _) => 120 * SECOND,
        (proto::UDP, state::ESTABLISHED) => 120 * SECOND,
        (proto::UDP, _) => 30 * SECOND,
        (proto::ICMP | proto::ICMPV6, _) => 30 * SECOND,
        _ => 600 * SECOND,
    }
}

/// Whether a NAT entry should refresh its partner with a packet of TCP flags `flags` at
/// `now`: at most about once a second (the shortest timeout is 10 s), and at once for a
/// SYN, FIN or RST (a state change the partner must follow). Most packets then cost one
/// lookup, not two.
pub const fn partner_due(flow: &Flow, flags: u8, now: u64) -> bool {
    flags & (tcp_flag::SYN | tcp_flag::FIN | tcp_flag::RST) != 0 || partner_clock(now) != flow.partner_seen
}

/// `now` in the units of [`Flow::partner_seen`].
pub const fn partner_clock(now: u64) -> u32 {
    (now >> 30) as u32
}

/// Whether a flow last seen at `last_seen` has expired at `now`.
pub const fn expired(flow: &Flow, proto: u8, now: u64) -> bool {
    now.saturating_sub(flow.last_seen) > timeout_ns(proto, flow.state)
}

/// The state after a packet with TCP flags `flags` (0 for other protocols) in the reply
/// direction (`reply`) or the original one.
pub const fn advance(proto: u8, current: u8, flags: u8, reply: bool) -> u8 {
    if proto != proto::TCP {
        return if reply { state::ESTABLISHED } else { current };
    }
    if flags & tcp_flag::RST != 0 {
        return state::CLOSED;
    }
    // A new SYN from the opener on a closed tuple reuses it (the port came round again).
    let syn = flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN;
    if !reply && syn && (current == state::CLOSING || current == state::CLOSED) {
        return state::NEW;
    }
    if current == state::CLOSED {
        return state::CLOSED;
    }
    if flags & tcp_flag::FIN != 0 {
        return state::CLOSING;
    }
    if reply && current == state::NEW {
        return state::ESTABLISHED;
    }
    // The opener acknowledging without SYN: the handshake was answered (an entry that only
    // sees the original direction, as a NAT entry, learns it this way).
    if !reply && current == state::NEW && flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::ACK {
        return state::ESTABLISHED;
    }
    current
}

/// The state a flow starts in when a packet with TCP flags `flags` (0 for other protocols)
/// opens it on an owning path; `None`: this packet opens nothing.
///
/// TCP: the opener's SYN opens a new flow. A segment of a connection already established
/// (ACK, no SYN) is picked up mid-stream, as conntrack's default does: the owning side's
/// stack only sends one inside a connection it has, which the filter let through when it
/// was set up — this keeps connections alive across a daemon restart, a reload that turns
/// tracking on, or a device re-created with a new ifindex. A SYN-ACK (the answer to a
/// connection from elsewhere) and a RST never open anything. Any other protocol: any packet.
pub const fn opening(proto: u8, flags: u8) -> Option<u8> {
    if proto != proto::TCP {
        return Some(state::NEW);
    }
    if flags & tcp_flag::RST != 0 {
        return None;
    }
    match flags & (tcp_flag::SYN | tcp_flag::ACK) {
        tcp_flag::SYN => Some(state::NEW),
        tcp_flag::ACK if flags & tcp_flag::FIN != 0 => Some(state::CLOSING),
        tcp_flag::ACK => Some(state::ESTABLISHED),
        _ => None,
    }
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::FlowKey4 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::Flow {}
}

#[cfg(test)]
mod tests {
    use super::{state::*, tcp_flag::*, *};

    fn tcp(states: &[(u8, bool)]) -> u8 {
        states.iter().fold(NEW, |s, &(flags, reply)| advance(proto::TCP, s, flags, reply))
    }

    #[test]
    fn tcp_handshake_data_and_close() {
        assert_eq!(tcp(&[(SYN, false)]), NEW);
        assert_eq!(tcp(&[(SYN, false), (SYN | ACK, true)]), ESTABLISHED);
        assert_eq!(tcp(&[(SYN, false), (SYN | ACK, true), (ACK, false), (ACK, true)]), ESTABLISHED);
        assert_eq!(tcp(&[(SYN, false), (SYN | ACK, true), (FIN | ACK, false)]), CLOSING);
        assert_eq!(tcp(&[(SYN, false), (SYN | ACK, true), (FIN | ACK, true), (ACK, false)]), CLOSING);
        assert_eq!(tcp(&[(SYN, false), (RST | ACK, true)]), CLOSED);
        assert_eq!(tcp(&[(SYN, false), (RST, true), (ACK, false), (FIN, true)]), CLOSED);
        // The port comes round again: a fresh SYN reopens the tuple.
        assert_eq!(tcp(&[(SYN, false), (RST, true), (SYN, false)]), NEW);
        assert_eq!(tcp(&[(SYN, false), (SYN | ACK, true), (FIN, true), (SYN, false)]), NEW);
        // A SYN in the reply direction does not.
        assert_eq!(tcp(&[(SYN, false), (RST, true), (SYN, true)]), CLOSED);
    }

    #[test]
    fn udp_and_icmp_are_established_once_answered() {
        assert_eq!(advance(proto::UDP, NEW, 0, false), NEW);
        assert_eq!(advance(proto::UDP, NEW, 0, true), ESTABLISHED);
        assert_eq!(advance(proto::ICMP, NEW, 0, true), ESTABLISHED);
        assert_eq!(advance(proto::UDP, ESTABLISHED, 0, false), ESTABLISHED);
    }

    #[test]
    fn timeouts_follow_the_kernel_defaults() {
        assert_eq!(timeout_ns(proto::TCP, NEW), 120 * SECOND);
        assert_eq!(timeout_ns(proto::TCP, ESTABLISHED), 432_000 * SECOND);
        assert_eq!(timeout_ns(proto::TCP, CLOSED), 10 * SECOND);
        assert_eq!(timeout_ns(proto::UDP, NEW), 30 * SECOND);
        assert_eq!(timeout_ns(proto::UDP, ESTABLISHED), 120 * SECOND);
        assert_eq!(timeout_ns(proto::ICMPV6, NEW), 30 * SECOND);
        assert_eq!(timeout_ns(47, NEW), 600 * SECOND);
        let flow = Flow { last_seen: 100 * SECOND, state: NEW, ..Default::default() };
        assert!(!expired(&flow, proto::UDP, 130 * SECOND));
        assert!(expired(&flow, proto::UDP, 130 * SECOND + 1));
        // A clock read before the entry was written (another CPU) is not an expiry.
        assert!(!expired(&flow, proto::UDP, 0));
    }

    #[test]
    fn what_opens_a_flow() {
        assert_eq!(opening(proto::TCP, SYN), Some(NEW));
        // Mid-stream: a segment of a connection the owning side has.
        assert_eq!(opening(proto::TCP, ACK), Some(ESTABLISHED));
        assert_eq!(opening(proto::TCP, ACK | 0x08), Some(ESTABLISHED));
        assert_eq!(opening(proto::TCP, FIN | ACK), Some(CLOSING));
        // The answer to someone else's connection, resets, odd flag sets: nothing.
        for flags in [SYN | ACK, RST, RST | ACK, SYN | RST, 0, FIN] {
            assert_eq!(opening(proto::TCP, flags), None, "{flags:#x}");
        }
        assert_eq!(opening(proto::UDP, 0), Some(NEW));
        assert_eq!(opening(47, 0), Some(NEW));
    }

    #[test]
    fn a_reply_reverses_addresses_and_ports_only() {
        let key = FlowKey4::new([192, 0, 2, 1], [100, 100, 2, 136], (5000, 53), proto::UDP, zone::OWN, 4);
        let reply = key.reversed();
        assert_eq!((reply.src, reply.dst, reply.sport, reply.dport), (key.dst, key.src, 53, 5000));
        assert_eq!((reply.proto, reply.zone, reply.ifindex), (proto::UDP, zone::OWN, 4));
        assert_eq!(reply.reversed(), key);
    }

    #[test]
    fn key_layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey4>(), 20);
        assert_eq!(size_of::<FlowKey6>(), 44);
        assert_eq!(size_of::<Flow>(), 48);
    }
}
