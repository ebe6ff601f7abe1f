//! Crafted packets (etherparse) for packet tests and TUN injection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, IpFragOffset, IpNumber, Ipv4Header, PacketBuilder,
    SlicedPacket, VlanId,
};

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

pub fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Ethernet + IPv4 + UDP from `src` to `dst`.
pub fn eth_udp4(src: &str, dst: &str) -> Vec<u8> {
    let b =
        PacketBuilder::ethernet2(SRC_MAC, DST_MAC).ipv4(v4(src).octets(), v4(dst).octets(), 64).udp(4000, 53);
    write(b, b"hello")
}

/// Ethernet + IPv6 + UDP.
pub fn eth_udp6(src: &str, dst: &str) -> Vec<u8> {
    let b =
        PacketBuilder::ethernet2(SRC_MAC, DST_MAC).ipv6(v6(src).octets(), v6(dst).octets(), 64).udp(4000, 53);
    write(b, b"hello")
}

/// 802.1Q-tagged Ethernet + IPv4 + UDP.
pub fn vlan_udp4(src: &str, dst: &str) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .single_vlan(VlanId::try_new(42).unwrap())
        .ipv4(v4(src).octets(), v4(dst).octets(), 64)
        .udp(4000, 53);
    write(b, b"hello")
}

/// 802.1ad + 802.1Q (QinQ) Ethernet + IPv4 + UDP.
pub fn qinq_udp4(src: &str, dst: &str) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
        .double_vlan(VlanId::try_new(100).unwrap(), VlanId::try_new(42).unwrap())
        .ipv4(v4(src).octets(), v4(dst).octets(), 64)
        .udp(4000, 53);
    write(b, b"hello")
}

/// Ethernet ARP request.
pub fn arp() -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &SRC_MAC,
        &v4("100.64.0.2").octets(),
        &[0; 6],
        &v4("100.64.0.1").octets(),
    )
    .unwrap();
    let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC).arp(arp);
    let mut out = Vec::new();
    b.write(&mut out).unwrap();
    out
}

/// Ethernet + IPv4 with 8 bytes of options (IHL 7) + UDP.
pub fn eth_udp4_options(src: &str, dst: &str) -> Vec<u8> {
    let mut ip = Ipv4Header::new(8 + 5, 64, IpNumber::UDP, v4(src).octets(), v4(dst).octets()).unwrap();
    // Four NOPs and a router alert option.
    ip.options = [1u8, 1, 1, 1, 148, 4, 0, 0][..].try_into().unwrap();
    raw_ipv4(ip, &udp_bytes(b"hello"))
}

/// Ethernet + a non-first IPv4 fragment (offset 8 x 8 bytes, more fragments).
pub fn eth_fragment4(src: &str, dst: &str) -> Vec<u8> {
    let payload = [0xabu8; 16];
    let mut ip =
        Ipv4Header::new(payload.len() as u16, 64, IpNumber::UDP, v4(src).octets(), v4(dst).octets()).unwrap();
    ip.more_fragments = true;
    ip.fragment_offset = IpFragOffset::try_new(8).unwrap();
    raw_ipv4(ip, &payload)
}

/// Ethernet + IPv4 whose IHL field says 4 (less than the minimum 5).
pub fn eth_bad_ihl4(src: &str, dst: &str) -> Vec<u8> {
    let mut frame = eth_udp4(src, dst);
    frame[14] = 0x44;
    frame
}

/// Raw IPv4 ICMP echo request (no link-layer header), as a TUN device carries it.
pub fn ip_echo4(src: &str, dst: &str, id: u16, seq: u16) -> Vec<u8> {
    let b = PacketBuilder::ipv4(v4(src).octets(), v4(dst).octets(), 64).icmpv4_echo_request(id, seq);
    write(b, b"tailgate")
}

/// Source and destination of a raw IP packet, and its ICMP type if it is ICMPv4.
pub fn ip_summary(packet: &[u8]) -> Option<(IpAddr, IpAddr, Option<u8>)> {
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let (src, dst) = match sliced.net? {
        etherparse::NetSlice::Ipv4(ip) => {
            (IpAddr::V4(ip.header().source_addr()), IpAddr::V4(ip.header().destination_addr()))
        }
        etherparse::NetSlice::Ipv6(ip) => {
            (IpAddr::V6(ip.header().source_addr()), IpAddr::V6(ip.header().destination_addr()))
        }
        _ => return None,
    };
    let icmp_type = match sliced.transport {
        Some(etherparse::TransportSlice::Icmpv4(icmp)) => Some(icmp.type_u8()),
        _ => None,
    };
    Some((src, dst, icmp_type))
}

fn udp_bytes(payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut out = vec![0x0f, 0xa0, 0, 53];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    out
}

fn raw_ipv4(mut ip: Ipv4Header, payload: &[u8]) -> Vec<u8> {
    ip.total_len = (ip.header_len() + payload.len()) as u16;
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    etherparse::Ethernet2Header { source: SRC_MAC, destination: DST_MAC, ether_type: EtherType::IPV4 }
        .write(&mut out)
        .unwrap();
    ip.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    out
}

fn write<B: BuilderWrite>(b: B, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    b.write_to(&mut out, payload);
    out
}

/// The final step of an etherparse builder, whatever the transport.
pub trait BuilderWrite {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]);
}

impl BuilderWrite for etherparse::PacketBuilderStep<etherparse::UdpHeader> {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
        self.write(out, payload).unwrap()
    }
}

impl BuilderWrite for etherparse::PacketBuilderStep<etherparse::Icmpv4Header> {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
        self.write(out, payload).unwrap()
    }
}

impl BuilderWrite for etherparse::PacketBuilderStep<etherparse::Icmpv6Header> {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
        self.write(out, payload).unwrap()
    }
}

impl BuilderWrite for etherparse::PacketBuilderStep<etherparse::TcpHeader> {
    fn write_to(self, out: &mut Vec<u8>, payload: &[u8]) {
        self.write(out, payload).unwrap()
    }
}

/// TCP flags of a crafted segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tcp {
    Syn,
    SynAck,
    /// A data segment (ACK, PSH).
    Data,
    SynRst,
    /// FIN, ACK.
    Fin,
    /// RST, ACK.
    Rst,
}

/// The IP layer of an Ethernet frame from `src` to `dst` (the family by the addresses).
fn eth_ip(src: &str, dst: &str) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
    match (src.parse::<IpAddr>().unwrap(), dst.parse::<IpAddr>().unwrap()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    }
}

/// Ethernet + IPv4/IPv6 + UDP with the given ports.
pub fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    write(eth_ip(src, dst).udp(sport, dport), b"flow")
}

/// Ethernet + IPv4/IPv6 + a TCP segment with the given ports and flags.
pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: Tcp) -> Vec<u8> {
    write(with_flags(eth_ip(src, dst).tcp(sport, dport, 1000, 64240), flags), &[])
}

/// Ethernet + an ICMP (v4 or v6, by the addresses) echo request or reply.
pub fn echo(src: &str, dst: &str, id: u16, reply: bool) -> Vec<u8> {
    let ip = eth_ip(src, dst);
    match (src.parse::<IpAddr>().unwrap(), reply) {
        (IpAddr::V4(_), false) => write(ip.icmpv4_echo_request(id, 1), b"ping"),
        (IpAddr::V4(_), true) => write(ip.icmpv4_echo_reply(id, 1), b"ping"),
        (IpAddr::V6(_), false) => write(ip.icmpv6_echo_request(id, 1), b"ping"),
        (IpAddr::V6(_), true) => write(ip.icmpv6_echo_reply(id, 1), b"ping"),
    }
}

/// Ethernet + an ICMP "port unreachable" from `src` to `dst` quoting `about` (an Ethernet
/// frame: its IP header and the first 8 bytes after it, as routers quote).
pub fn port_unreachable(src: &str, dst: &str, about: &[u8]) -> Vec<u8> {
    let sliced = SlicedPacket::from_ethernet(about).unwrap();
    let ip_len = match sliced.net.unwrap() {
        etherparse::NetSlice::Ipv4(ip) => ip.header().slice().len(),
        etherparse::NetSlice::Ipv6(ip) => ip.header().slice().len(),
        _ => panic!("not IP"),
    };
    let quoted = &about[14..14 + ip_len + 8];
    let ip = eth_ip(src, dst);
    match src.parse::<IpAddr>().unwrap() {
        IpAddr::V4(_) => write(
            ip.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            )),
            quoted,
        ),
        IpAddr::V6(_) => write(
            ip.icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                etherparse::icmpv6::DestUnreachableCode::Port,
            )),
            quoted,
        ),
    }
}

/// The options of a Linux SYN: MSS `mss`, SACK permitted, timestamps, NOP, window scale.
pub fn linux_syn_options(mss: u16) -> Vec<u8> {
    let [hi, lo] = mss.to_be_bytes();
    vec![2, 4, hi, lo, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7]
}

/// Ethernet + IPv4 or IPv6 (by the addresses) + TCP with raw `options` (padded by the
/// caller to a multiple of 4) and `payload`.
pub fn eth_tcp(src: &str, dst: &str, flags: Tcp, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let tcp = with_flags(eth_ip(src, dst).tcp(40000, 443, 1000, 64240), flags);
    let tcp = tcp.options_raw(options).unwrap();
    write(tcp, payload)
}

fn with_flags(
    tcp: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    flags: Tcp,
) -> etherparse::PacketBuilderStep<etherparse::TcpHeader> {
    match flags {
        Tcp::Syn => tcp.syn(),
        Tcp::SynAck => tcp.syn().ack(1),
        Tcp::Data => tcp.ack(1).psh(),
        Tcp::SynRst => tcp.syn().rst(),
        Tcp::Fin => tcp.fin().ack(1),
        Tcp::Rst => tcp.rst().ack(1),
    }
}

/// The MSS option of an Ethernet frame's TCP header (first one), and whether the TCP
/// checksum is right.
pub fn tcp_mss(frame: &[u8]) -> (Option<u16>, bool) {
    let sliced = SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else { panic!("not TCP") };
    let mss = tcp.options_iterator().find_map(|o| match o {
        Ok(etherparse::TcpOptionElement::MaximumSegmentSize(mss)) => Some(mss),
        _ => None,
    });
    let header = tcp.to_header();
    let checksum = match sliced.net.unwrap() {
        etherparse::NetSlice::Ipv4(ip) => header.calc_checksum_ipv4(&ip.header().to_header(), tcp.payload()),
        etherparse::NetSlice::Ipv6(ip) => header.calc_checksum_ipv6(&ip.header().to_header(), tcp.payload()),
        _ => panic!("not IP"),
    }
    .unwrap();
    (mss, checksum == header.checksum)
}

/// Sets the IPv4 fragment fields (more fragments, offset 0) of an Ethernet + IPv4 frame and
/// fixes the header checksum: the first fragment of a datagram.
pub fn first_fragment4(mut frame: Vec<u8>) -> Vec<u8> {
    let (ip, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    let mut ip = ip;
    ip.more_fragments = true;
    ip.header_checksum = ip.calc_header_checksum();
    let mut bytes = Vec::new();
    ip.write(&mut bytes).unwrap();
    frame[14..14 + bytes.len()].copy_from_slice(&bytes);
    frame
}

/// Sets the IPv4 identification of an Ethernet + IPv4 frame (and fixes the header checksum).
pub fn with_ip_id(mut frame: Vec<u8>, id: u16) -> Vec<u8> {
    let (mut ip, _) = Ipv4Header::from_slice(&frame[14..]).unwrap();
    ip.identification = id;
    ip.header_checksum = ip.calc_header_checksum();
    let mut bytes = Vec::new();
    ip.write(&mut bytes).unwrap();
    frame[14..14 + bytes.len()].copy_from_slice(&bytes);
    frame
}

/// A TCP or UDP packet as a NAT test reads it: addresses and ports, and whether every
/// checksum in it (IPv4 header, TCP/UDP over the pseudo-header) is right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub checksums_ok: bool,
    /// UDP sent without a checksum (0).
    pub no_udp_checksum: bool,
}

/// Reads an Ethernet frame carrying TCP or UDP; `None` for anything else.
pub fn transport(frame: &[u8]) -> Option<Transport> {
    use std::net::SocketAddr;

    use etherparse::{NetSlice, TransportSlice};
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst, ip_ok) = match sliced.net.as_ref()? {
        NetSlice::Ipv4(ip) => {
            let h = ip.header().to_header();
            (
                IpAddr::V4(h.source.into()),
                IpAddr::V4(h.destination.into()),
                h.calc_header_checksum() == h.header_checksum,
            )
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header().to_header();
            (IpAddr::V6(h.source.into()), IpAddr::V6(h.destination.into()), true)
        }
        _ => return None,
    };
    let (ports, l4_ok, no_udp_checksum) = match (sliced.transport.as_ref()?, sliced.net.as_ref()?) {
        (TransportSlice::Tcp(tcp), net) => {
            let h = tcp.to_header();
            let want = match net {
                NetSlice::Ipv4(ip) => h.calc_checksum_ipv4(&ip.header().to_header(), tcp.payload()).ok()?,
                NetSlice::Ipv6(ip) => h.calc_checksum_ipv6(&ip.header().to_header(), tcp.payload()).ok()?,
                _ => return None,
            };
            ((h.source_port, h.destination_port), want == h.checksum, false)
        }
        (TransportSlice::Udp(udp), net) => {
            let h = udp.to_header();
            let want = match net {
                NetSlice::Ipv4(ip) => h.calc_checksum_ipv4(&ip.header().to_header(), udp.payload()).ok()?,
                NetSlice::Ipv6(ip) => h.calc_checksum_ipv6(&ip.header().to_header(), udp.payload()).ok()?,
                _ => return None,
            };
            let zero = h.checksum == 0;
            ((h.source_port, h.destination_port), zero || want == h.checksum, zero)
        }
        _ => return None,
    };
    Some(Transport {
        src: SocketAddr::new(src, ports.0),
        dst: SocketAddr::new(dst, ports.1),
        checksums_ok: ip_ok && l4_ok,
        no_udp_checksum,
    })
}

/// The same frame with its UDP checksum set to 0 ("none", IPv4 only).
pub fn without_udp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let at = 14 + ihl + 6;
    frame[at..at + 2].copy_from_slice(&[0, 0]);
    frame
}

/// An ICMP error as a NAT test reads it: the error's addresses, whether its checksum is
/// right, and the packet it quotes (raw bytes, from its IP header on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpError {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub checksum_ok: bool,
    pub quote: Vec<u8>,
}

/// Reads an Ethernet frame carrying an ICMP or ICMPv6 message; `None` for anything else.
pub fn icmp_error(frame: &[u8]) -> Option<IcmpError> {
    use etherparse::{NetSlice, TransportSlice};
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    match (sliced.net.as_ref()?, sliced.transport.as_ref()?) {
        (NetSlice::Ipv4(ip), TransportSlice::Icmpv4(icmp)) => {
            let h = ip.header().to_header();
            Some(IcmpError {
                src: IpAddr::V4(h.source.into()),
                dst: IpAddr::V4(h.destination.into()),
                checksum_ok: icmp.icmp_type().calc_checksum(icmp.payload()) == icmp.checksum(),
                quote: icmp.payload().to_vec(),
            })
        }
        (NetSlice::Ipv6(ip), TransportSlice::Icmpv6(icmp)) => {
            let h = ip.header().to_header();
            let want = icmp.icmp_type().calc_checksum(h.source, h.destination, icmp.payload()).ok()?;
            Some(IcmpError {
                src: IpAddr::V6(h.source.into()),
                dst: IpAddr::V6(h.destination.into()),
                checksum_ok: want == icmp.checksum(),
                quote: icmp.payload().to_vec(),
            })
        }
        _ => None,
    }
}

/// What an error about `frame` (an Ethernet frame) quotes of it: the IP header and `len`
/// bytes after it.
pub fn quote_of(frame: &[u8], len: usize) -> Vec<u8> {
    let ip_len = match frame[14] >> 4 {
        4 => usize::from(frame[14] & 0x0f) * 4,
        _ => 40,
    };
    frame[14..(14 + ip_len + len).min(frame.len())].to_vec()
}

/// Ethernet + an ICMP error (port unreachable; IPv6: packet too big when `too_big`) from
/// `src` to `dst` quoting `quote` as given.
pub fn icmp_error_quoting(src: &str, dst: &str, quote: &[u8], too_big: bool) -> Vec<u8> {
    let ip = eth_ip(src, dst);
    match (src.parse::<IpAddr>().unwrap(), too_big) {
        (IpAddr::V4(_), false) => write(
            ip.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::Port,
            )),
            quote,
        ),
        (IpAddr::V4(_), true) => write(
            ip.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1200 },
            )),
            quote,
        ),
        (IpAddr::V6(_), false) => write(
            ip.icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                etherparse::icmpv6::DestUnreachableCode::Port,
            )),
            quote,
        ),
        (IpAddr::V6(_), true) => write(ip.icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 }), quote),
    }
}
