//! One bounds-checked walk of the headers per packet, into the description every stage
//! reads. Header layouts come from `network-types`; offsets are kept relative to the start
//! of the packet data, so they stay valid after a helper call that invalidates pointers.

use core::mem::{offset_of, size_of};

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags we look through (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked to find the transport header; past that, no L4.
const MAX_IPV6_EXT: usize = 4;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv4 flags/fragment offset: "more fragments" and the offset bits.
const IPV4_MF_OFFSET: u16 = 0x3fff;
/// IPv4 fragment offset bits only (non-zero: not the first fragment).
const IPV4_OFFSET: u16 = 0x1fff;
/// IPv6 fragment header: offset bits of its second 16-bit word.
const IPV6_FRAG_OFFSET: u16 = 0xfff8;

pub use tailgate_abi::conntrack::tcp_flag;
/// Offset of the flags byte in the TCP header (after the data offset byte).
const TCP_FLAGS: usize = offset_of!(TcpHdr, _bitfield_1) + 1;
/// Offset of the data offset byte (upper nibble: header length in 32-bit words).
const TCP_DOFF: usize = offset_of!(TcpHdr, _bitfield_1);
pub const TCP_CHECK: usize = offset_of!(TcpHdr, check);
pub const TCP_HLEN: usize = size_of::<TcpHdr>();

/// The addresses, by family.
#[derive(Clone, Copy)]
pub enum Ip {
    V4 { src: [u8; 4], dst: [u8; 4] },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

/// The transport header, when the packet carries one we can read (a TCP or UDP header of a
/// packet that is not a later fragment).
#[derive(Clone, Copy)]
pub struct L4 {
    /// Offset of the header from the start of the packet data.
    pub offset: u16,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags ([`tcp_flag`]); 0 for UDP.
    pub tcp_flags: u8,
    /// TCP header length in bytes (options included); 0 for UDP.
    pub tcp_len: u16,
}

/// What every stage knows about a packet.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the IP header from the start of the packet data.
    pub l3: usize,
    pub ip: Ip,
    /// The transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Part of a fragmented datagram (any fragment, first included).
    pub fragment: bool,
    /// The datagram's identification (IPv4 header; IPv6 fragment header), for fragments.
    pub fragment_id: u32,
    /// Offset of the transport header (whatever the protocol) from the start of the packet
    /// data; 0 when there is none to read (a later fragment, too many extension headers).
    pub transport: u16,
    pub l4: Option<L4>,
}

/// Why a packet has no description.
pub enum NoPacket {
    /// Not IPv4/IPv6 (ARP, LLDP, ...).
    NotIp,
    /// Too short or malformed to classify; the IP stack discards these itself.
    Malformed,
}

/// Parses an Ethernet frame (optionally VLAN-tagged) in `[data, data_end)`.
#[inline(always)]
pub fn ethernet(data: usize, data_end: usize) -> Result<Packet, NoPacket> {
    if data + size_of::<EthHdr>() > data_end {
        return Err(NoPacket::Malformed);
    }
    let mut ethertype = be16(data + offset_of!(EthHdr, ether_type));
    let mut l3 = size_of::<EthHdr>();
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        if data + l3 + size_of::<VlanHdr>() > data_end {
            return Err(NoPacket::Malformed);
        }
        ethertype = be16(data + l3 + offset_of!(VlanHdr, ether_type));
        l3 += size_of::<VlanHdr>();
    }
    match ethertype {
        ETH_P_IP => ipv4(data, data_end, l3),
        ETH_P_IPV6 => ipv6(data, data_end, l3),
        _ => Err(NoPacket::NotIp),
    }
}

/// Parses a packet whose IP header starts at `l3` (a TUN device: 0), telling the family by
/// the version nibble.
#[inline(always)]
pub fn ip(data: usize, data_end: usize, l3: usize) -> Result<Packet, NoPacket> {
    // Shorter than the smallest IP header: malformed whatever the version. (Checking one
    // byte would compile to a test the verifier learns nothing from at offset 0.)
    if data + l3 + size_of::<Ipv4Hdr>() > data_end {
        return Err(NoPacket::Malformed);
    }
    match read::<u8>(data + l3) >> 4 {
        4 => ipv4(data, data_end, l3),
        6 => ipv6(data, data_end, l3),
        _ => Err(NoPacket::NotIp),
    }
}

#[inline(always)]
fn ipv4(data: usize, data_end: usize, l3: usize) -> Result<Packet, NoPacket> {
    let h = data + l3;
    if h + size_of::<Ipv4Hdr>() > data_end {
        return Err(NoPacket::Malformed);
    }
    let ver_ihl = read::<u8>(h);
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() {
        return Err(NoPacket::Malformed);
    }
    let frags = be16(h + offset_of!(Ipv4Hdr, frags));
    let proto = read::<u8>(h + offset_of!(Ipv4Hdr, proto));
    let ip =
        Ip::V4 { src: read(h + offset_of!(Ipv4Hdr, src_addr)), dst: read(h + offset_of!(Ipv4Hdr, dst_addr)) };
    // Fragments carry the addresses in every fragment; only the first has the ports.
    let fragment = frags & IPV4_MF_OFFSET != 0;
    let fragment_id = u32::from(be16(h + offset_of!(Ipv4Hdr, id)));
    let first = frags & IPV4_OFFSET == 0;
    let l4 = if first { transport(data, data_end, l3 + ihl, proto) } else { None };
    let transport = if first { offset16(l3 + ihl) } else { 0 };
    Ok(Packet { l3, ip, proto, fragment, fragment_id, transport, l4 })
}

#[inline(always)]
fn ipv6(data: usize, data_end: usize, l3: usize) -> Result<Packet, NoPacket> {
    let h = data + l3;
    if h + size_of::<Ipv6Hdr>() > data_end {
        return Err(NoPacket::Malformed);
    }
    if read::<u8>(h) >> 4 != 6 {
        return Err(NoPacket::Malformed);
    }
    let ip =
        Ip::V6 { src: read(h + offset_of!(Ipv6Hdr, src_addr)), dst: read(h + offset_of!(Ipv6Hdr, dst_addr)) };
    let mut proto = read::<u8>(h + offset_of!(Ipv6Hdr, next_hdr));
    let mut next = l3 + size_of::<Ipv6Hdr>();
    let mut fragment = false;
    let mut fragment_id = 0;
    let mut later_fragment = false;
    for _ in 0..MAX_IPV6_EXT {
        match proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT => {}
            _ => break,
        }
        // Every extension header starts with (next header, length); the fragment header's
        // second byte is reserved and its length fixed at 8.
        if data + next + 8 > data_end {
            return Ok(Packet { l3, ip, proto, fragment, fragment_id, transport: 0, l4: None });
        }
        let len = if proto == IPPROTO_FRAGMENT {
            fragment = true;
            fragment_id = u32::from_be(read::<u32>(data + next + 4));
            later_fragment = be16(data + next + 2) & IPV6_FRAG_OFFSET != 0;
            8
        } else {
            (usize::from(read::<u8>(data + next + 1)) + 1) * 8
        };
        proto = read::<u8>(data + next);
        next += len;
    }
    let l4 = if later_fragment { None } else { transport(data, data_end, next, proto) };
    let transport = if later_fragment { 0 } else { offset16(next) };
    Ok(Packet { l3, ip, proto, fragment, fragment_id, transport, l4 })
}

/// The TCP or UDP header at `l4`, when whole in the packet.
#[inline(always)]
fn transport(data: usize, data_end: usize, l4: usize, proto: u8) -> Option<L4> {
    let h = data + l4;
    match proto {
        IPPROTO_TCP => {
            if h + size_of::<TcpHdr>() > data_end {
                return None;
            }
            Some(L4 {
                offset: offset16(l4),
                sport: be16(h + offset_of!(TcpHdr, source)),
                dport: be16(h + offset_of!(TcpHdr, dest)),
                tcp_flags: read::<u8>(h + TCP_FLAGS),
                tcp_len: u16::from(read::<u8>(h + TCP_DOFF) >> 4) * 4,
            })
        }
        IPPROTO_UDP => {
            if h + size_of::<UdpHdr>() > data_end {
                return None;
            }
            Some(L4 {
                offset: offset16(l4),
                sport: be16(h + offset_of!(UdpHdr, src)),
                dport: be16(h + offset_of!(UdpHdr, dst)),
                tcp_flags: 0,
                tcp_len: 0,
            })
        }
        _ => None,
    }
}

/// Callers have checked `addr + size_of::<T>() <= data_end`.
#[inline(always)]
pub fn read<T: Copy>(addr: usize) -> T {
    // SAFETY: bounds checked by the caller; unaligned because packets are.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// An offset as a plain number: read back through a volatile load so the compiler cannot
/// keep it as "pointer minus packet start" (pointer arithmetic the verifier refuses).
#[inline(always)]
fn offset16(offset: usize) -> u16 {
    let offset = offset as u16;
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&offset) }
}

#[inline(always)]
pub fn be16(addr: usize) -> u16 {
    u16::from_be(read::<u16>(addr))
}

/// What a TC program's packets start with.
#[derive(Clone, Copy)]
pub enum Link {
    /// An Ethernet header (an uplink).
    Ethernet,
    /// The IP header, at this offset (a TUN device: 0).
    Ip(usize),
}

/// Parses the packet of a TC program. Headers not in the linear part of the buffer (rare: a
/// large packet from a device with scatter-gather) are pulled in once and parsed again.
#[inline(always)]
pub fn skb(ctx: &aya_ebpf::programs::TcContext, link: Link) -> Result<Packet, NoPacket> {
    // One call site of the parse, in a loop of at most two rounds: two call sites made LLVM
    // merge their results with registers the verifier sees as uninitialized.
    let l3 = match link {
        Link::Ethernet => MAX_L2_LEN,
        Link::Ip(l3) => l3,
    };
    let mut pulled = false;
    loop {
        let parsed = match link {
            Link::Ethernet => ethernet(ctx.data(), ctx.data_end()),
            Link::Ip(l3) => ip(ctx.data(), ctx.data_end(), l3),
        };
        let short = ctx.len() as usize > ctx.data_end() - ctx.data();
        if pulled || !short || !matches!(parsed, Err(NoPacket::Malformed)) {
            return parsed;
        }
        // Enough for the IPv6 header, extension headers and a TCP header with options.
        let want = core::cmp::min(ctx.len(), (l3 + PULL_LEN) as u32);
        if ctx.pull_data(want).is_err() {
            return Err(NoPacket::Malformed);
        }
        pulled = true;
    }
}

/// The longest link-layer header parsed: Ethernet and two VLAN tags.
pub const MAX_L2_LEN: usize = size_of::<EthHdr>() + MAX_VLAN_TAGS * size_of::<VlanHdr>();

/// Bytes past the IP header start worth pulling into the linear buffer.
pub const PULL_LEN: usize = 256;
