//! Masquerade (`[subnet_routes] masquerade`): a flow from the tunnel (its packets carry the
//! subnet-route mark) leaving an uplink gets the uplink's address and a source port of
//! `Settings::nat_ports` (the SNAT engine, `crate::snat`); replies arriving on that uplink
//! are translated back. A tailnet source never leaves an uplink untranslated.
//!
//! As netfilter NATs a connection when it opens, the replies of a connection opened from a
//! LAN device into the tunnel (recorded at the tunnel's egress, zone `INBOUND`) are left
//! alone, though marked.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LOOKUP_OUTPUT, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC},
    helpers::bpf_fib_lookup as fib_lookup,
};
use tailgate_abi::{
    conntrack::{zone, FlowKey4, FlowKey6},
    settings::Settings,
};

use crate::{
    conntrack::{At, Bytes},
    parse::Packet,
    snat::{self, Answers, Snat, Source},
    stage::NatRewrite,
};

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
    let answers = Answers(At { zone: zone::INBOUND, ifindex: ingress }, None);
    snat::snat(packet, bytes, settings.nat_ports, (&Route { skb, ifindex }, &answers), ifindex, out)
}

/// Tunnel egress: whether a packet forwarded from `ingress` is a masqueraded flow's reply
/// (translated back on its arrival); anything else from the LAN side is recorded as a
/// connection into the tunnel, whose replies the masquerade leaves alone.
#[inline(always)]
pub fn record_inbound(packet: &Packet, bytes: Bytes, ingress: u32, tunnel: u32) {
    snat::record_opened(packet, bytes, ingress, At { zone: zone::INBOUND, ifindex: tunnel });
}

/// The masquerade's address: the route's preferred source towards the destination out of
/// the uplink (what MASQUERADE picks), when the route leaves by that uplink.
pub struct Route {
    pub skb: *mut core::ffi::c_void,
    pub ifindex: u32,
}

impl<K: Uplink> Source<K> for Route {
    #[inline(always)]
    fn pick(&self, fib: &mut bpf_fib_lookup, dst: &K::Addr) -> Option<K::Addr> {
        K::source(self.skb, fib, dst, self.ifindex)
    }
}

/// The address the masquerade gives a flow: the route's preferred source towards `dst` out
/// of the uplink (what MASQUERADE picks), when the route leaves by that uplink.
pub trait Uplink: crate::services::Family {
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
