//! What a stage tells its entry point to do with a packet. Stages only decide; the entry
//! point applies rewrites, counts and returns the verdict, each in one place.

use tailgate_abi::counters::Counter;

/// A filtering stage's answer.
pub enum Verdict {
    /// Let it through; the reason is counted if no later stage drops it.
    Pass(Counter),
    Drop(Counter),
}

/// A change to make to the packet.
#[derive(Clone, Copy)]
pub enum Rewrite {
    /// Set the skb mark to this value.
    Mark(u32),
    /// Replace the 16-bit MSS value at `at` (offset from the packet start; `old` as read,
    /// network order) with `new`; `check` is the TCP checksum's offset (an even distance
    /// from the header start, so `at - check` tells the value's alignment).
    Mss { at: usize, check: usize, old: u16, new: u16 },
    /// Translate an address and port (services).
    Nat(NatRewrite),
}

/// An address of either family, as in the packet.
#[derive(Clone, Copy)]
pub enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// Replace the destination (or with `source`, the source) address and port of a TCP or UDP
/// packet whose IP header is at `l3` and transport header at `l4` (offsets from the packet
/// start); ports in host order.
#[derive(Clone, Copy)]
pub struct NatRewrite {
    pub source: bool,
    pub l3: usize,
    pub l4: usize,
    /// The transport protocol (TCP, UDP, ICMP, ICMPv6): where its checksum is, whether 0
    /// means "none" (UDP), whether the addresses are in it (all but ICMP).
    pub proto: u8,
    pub from: Addr,
    pub to: Addr,
    pub from_port: u16,
    pub to_port: u16,
}

/// Translate an ICMP error about a translated packet back (offsets from the packet start):
/// one end of the quoted packet — its destination (a DNAT's: backend → service) or, with
/// `quoted_source`, its source (an SNAT's: translated → client) — address and port (`from`
/// → `to`), its checksums, the error's checksum, and with `outer` the error's own address
/// on the other side (its source for a DNAT, its destination for an SNAT).
#[derive(Clone, Copy)]
pub struct ErrorRewrite {
    pub l3: usize,
    pub icmp: usize,
    pub inner_l3: usize,
    pub inner_l4: usize,
    /// Where the quoted transport checksum is; 0: not quoted, or a UDP checksum of 0.
    pub inner_check: usize,
    pub quoted_source: bool,
    pub outer: bool,
    pub from: Addr,
    pub to: Addr,
    pub from_port: u16,
    pub to_port: u16,
}

impl ErrorRewrite {
    pub const EMPTY: ErrorRewrite = ErrorRewrite {
        l3: 0,
        icmp: 0,
        inner_l3: 0,
        inner_l4: 0,
        inner_check: 0,
        quoted_source: false,
        outer: false,
        from: Addr::V4([0; 4]),
        to: Addr::V4([0; 4]),
        from_port: 0,
        to_port: 0,
    };
}

impl NatRewrite {
    /// A placeholder to write into.
    pub const EMPTY: NatRewrite = NatRewrite {
        source: false,
        l3: 0,
        l4: 0,
        proto: 0,
        from: Addr::V4([0; 4]),
        to: Addr::V4([0; 4]),
        from_port: 0,
        to_port: 0,
    };
}
