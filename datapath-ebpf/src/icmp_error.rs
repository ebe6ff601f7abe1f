//! ICMP errors about translated packets (a backend's or an SNAT target's port unreachable,
//! a router's "fragmentation needed" on the way), for every NAT of the datapath: the flow
//! the quoted packet belongs to, found by its reply entry, and the rewrite that makes the
//! error one about the packet the client sent (applied by `nat::translate_error`).

use tailgate_abi::conntrack::{proto, zone, FlowKey4, FlowKey6};

use crate::{
    conntrack::{live, At, Bytes, Key, MAX_TRANSPORT},
    parse::{be16, read, Ip, Packet, IPPROTO_TCP, IPPROTO_UDP},
    services::Family,
    stage::ErrorRewrite,
};

/// An ICMP error about a translated packet (a backend's or target's port unreachable, a
/// router's "fragmentation needed" on the way), to be translated back so that the client
/// recognises the packet it sent. `reply`: where the flows' reply entries are — zone
/// `DNAT_REPLY` (tunnel or uplink egress: the quote's destination was a service's backend)
/// or `SNAT_REPLY` (where the SNAT's replies arrive: the quote's source was translated).
#[inline(always)]
pub fn reverse(packet: &Packet, bytes: Bytes, reply: At, out: &mut ErrorRewrite) -> bool {
    // The mask bounds the offset for the verifier (as in `conntrack::seen`).
    if packet.transport == 0 || packet.transport > MAX_TRANSPORT || packet.l4.is_some() {
        return false;
    }
    let icmp = usize::from(packet.transport & MAX_TRANSPORT);
    match (&packet.ip, packet.proto) {
        (Ip::V4 { src, dst }, proto::ICMP) => error4(packet.l3, icmp, (src, dst), bytes, reply, out),
        (Ip::V6 { src, dst }, proto::ICMPV6) => error6(packet.l3, icmp, (src, dst), bytes, reply, out),
        _ => false,
    }
}

/// What an error quotes of a transport header at least: its ports and (UDP) checksum.
const QUOTED_L4: usize = 8;

#[inline(always)]
fn error4(
    l3: usize,
    icmp: usize,
    (src, dst): (&[u8; 4], &[u8; 4]),
    bytes: Bytes,
    reply: At,
    out: &mut ErrorRewrite,
) -> bool {
    // Every read from one pointer, checked once per extent (the verifier tracks bounds per
    // pointer).
    let h = bytes.data + icmp;
    if h + 8 + 20 > bytes.data_end {
        return false;
    }
    if !FlowKey4::is_error(read::<u8>(h)) {
        return false;
    }
    let ver_ihl = read::<u8>(h + 8);
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    let proto = read::<u8>(h + 8 + 9);
    // The quoted packet was sent by the error's receiver, is a first fragment, TCP or UDP.
    if ver_ihl >> 4 != 4
        || ihl < 20
        || be16(h + 8 + 6) & 0x1fff != 0
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        || read::<[u8; 4]>(h + 8 + 12) != *dst
    {
        return false;
    }
    let backend = read::<[u8; 4]>(h + 8 + 16);
    let l4 = h + 8 + ihl;
    if l4 + QUOTED_L4 > bytes.data_end {
        return false;
    }
    let quote = Quote { proto, ports: (be16(l4), be16(l4 + 2)), l4: icmp + 8 + ihl };
    quoted_flow::<FlowKey4>((l3, icmp), (src, dst), backend, quote, (bytes, reply), out)
}

#[inline(always)]
fn error6(
    l3: usize,
    icmp: usize,
    (src, dst): (&[u8; 16], &[u8; 16]),
    bytes: Bytes,
    reply: At,
    out: &mut ErrorRewrite,
) -> bool {
    let h = bytes.data + icmp;
    if h + 8 + 40 + QUOTED_L4 > bytes.data_end {
        return false;
    }
    if !FlowKey6::is_error(read::<u8>(h)) {
        return false;
    }
    // The transport header right after the fixed header (extension headers are not walked).
    let proto = read::<u8>(h + 8 + 6);
    if read::<u8>(h + 8) >> 4 != 6
        || (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        || read::<[u8; 16]>(h + 8 + 8) != *dst
    {
        return false;
    }
    let backend = read::<[u8; 16]>(h + 8 + 24);
    let quote = Quote { proto, ports: (be16(h + 48), be16(h + 48 + 2)), l4: icmp + 48 };
    quoted_flow::<FlowKey6>((l3, icmp), (src, dst), backend, quote, (bytes, reply), out)
}

/// The quoted packet's transport: protocol, ports, where its header is.
struct Quote {
    proto: u8,
    ports: (u16, u16),
    l4: usize,
}

/// The rewrite of an error whose quote (sent by `dst`, the error's receiver, to `remote`)
/// is a flow's translated packet, by its reply entry. Related, not part of the flow: no
/// refresh (as conntrack).
#[inline(always)]
fn quoted_flow<K: Family>(
    (l3, icmp): (usize, usize),
    (src, dst): (&K::Addr, &K::Addr),
    remote: K::Addr,
    quote: Quote,
    (bytes, reply): (Bytes, At),
    out: &mut ErrorRewrite,
) -> bool {
    let key = K::of(*dst, remote, quote.ports.0, quote.ports.1, quote.proto, reply);
    let Some((flow, _)) = live(&key) else { return false };
    // SAFETY: a map value, read only.
    let original = unsafe { (*flow).nat };
    let snat = reply.zone == zone::SNAT_REPLY;
    *out = ErrorRewrite {
        l3,
        icmp,
        inner_l3: icmp + 8,
        inner_l4: quote.l4,
        inner_check: quoted_check(bytes, quote.l4, quote.proto),
        // DNAT: the backend becomes the service, in the quote's destination and, when the
        // backend sent the error, its source. SNAT: the translated address becomes the
        // client's, in the quote's source and the error's destination.
        quoted_source: snat,
        outer: snat || *src == remote,
        from: K::addr(if snat { *dst } else { remote }),
        to: K::addr(K::from_nat(&original)),
        from_port: if snat { quote.ports.0 } else { quote.ports.1 },
        to_port: original.port,
    };
    true
}

/// Where the quoted transport checksum is, when the quote holds it and it is in use (a UDP
/// checksum of 0 means none); 0 otherwise.
#[inline(always)]
fn quoted_check(bytes: Bytes, l4: usize, proto: u8) -> usize {
    let check = if proto == IPPROTO_TCP { l4 + 16 } else { l4 + 6 };
    let at = bytes.data + check;
    if at + 2 > bytes.data_end || (proto == IPPROTO_UDP && be16(at) == 0) {
        return 0;
    }
    check
}
