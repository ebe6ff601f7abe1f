//! How the model reads a packet: what the README says the datapath looks at. Ethernet with up
//! to two VLAN tags (802.1Q, 802.1ad) on uplinks, raw IP at a fixed offset on the tunnel;
//! IPv4 (header length checked, options skipped, fragments by flags and offset), IPv6 (up to
//! four extension headers walked); the TCP or UDP header when the packet holds it whole.

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// A packet the datapath can classify.
#[derive(Debug, Clone)]
pub struct Ip {
    /// Where the IP header starts in the frame.
    pub l3: usize,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The protocol after the extension headers walked.
    pub proto: u8,
    /// Any fragment of a fragmented datagram, the first included.
    pub fragment: bool,
    /// The IPv4 identification, the IPv6 fragment header's.
    pub fragment_id: u32,
    /// Where the transport header starts; `None` for a later fragment.
    pub transport: Option<usize>,
    /// The TCP/UDP header, when it is whole in the frame (and the packet is not a later
    /// fragment).
    pub ports: Option<Ports>,
}

#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub at: usize,
    pub sport: u16,
    pub dport: u16,
    /// TCP: the flags byte; UDP: 0.
    pub flags: u8,
    /// TCP: the data offset in bytes (options included).
    pub tcp_len: usize,
}

#[derive(Debug, Clone)]
pub enum Parsed {
    /// Not IPv4 or IPv6.
    NotIp,
    /// Too short, or a header that contradicts itself.
    Malformed,
    Ip(Ip),
}

fn u16_at(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

/// An Ethernet frame (an uplink).
pub fn ethernet(f: &[u8]) -> Parsed {
    if f.len() < 14 {
        return Parsed::Malformed;
    }
    let mut at = 12;
    let mut ethertype = u16_at(f, at);
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        at += 4;
        if f.len() < at + 2 {
            return Parsed::Malformed;
        }
        ethertype = u16_at(f, at);
    }
    match ethertype {
        0x0800 => v4(f, at + 2),
        0x86dd => v6(f, at + 2),
        _ => Parsed::NotIp,
    }
}

/// A packet whose IP header is at `l3` (the tunnel), the family by the version nibble.
pub fn ip(f: &[u8], l3: usize) -> Parsed {
    // Less than an IPv4 header is malformed whatever the version says.
    if f.len() < l3 + 20 {
        return Parsed::Malformed;
    }
    match f[l3] >> 4 {
        4 => v4(f, l3),
        6 => v6(f, l3),
        _ => Parsed::NotIp,
    }
}

fn v4(f: &[u8], l3: usize) -> Parsed {
    if f.len() < l3 + 20 || f[l3] >> 4 != 4 || usize::from(f[l3] & 0xf) < 5 {
        return Parsed::Malformed;
    }
    let ihl = usize::from(f[l3] & 0xf) * 4;
    let frag = u16_at(f, l3 + 6);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    let proto = f[l3 + 9];
    let addr = |at: usize| IpAddr::from(<[u8; 4]>::try_from(&f[at..at + 4]).unwrap());
    let transport = (offset == 0).then_some(l3 + ihl);
    Parsed::Ip(Ip {
        l3,
        src: addr(l3 + 12),
        dst: addr(l3 + 16),
        proto,
        fragment: more || offset != 0,
        fragment_id: u32::from(u16_at(f, l3 + 4)),
        transport,
        ports: transport.and_then(|at| ports(f, at, proto)),
    })
}

fn v6(f: &[u8], l3: usize) -> Parsed {
    if f.len() < l3 + 40 || f[l3] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let addr = |at: usize| IpAddr::from(<[u8; 16]>::try_from(&f[at..at + 16]).unwrap());
    let (src, dst) = (addr(l3 + 8), addr(l3 + 24));
    let ip = |proto: u8, (fragment, fragment_id): (bool, u32), transport: Option<usize>| {
        let ports = transport.and_then(|at| ports(f, at, proto));
        Parsed::Ip(Ip { l3, src, dst, proto, fragment, fragment_id, transport, ports })
    };
    let mut proto = f[l3 + 6];
    let mut at = l3 + 40;
    let (mut fragment, mut fragment_id, mut later) = (false, 0, false);
    for _ in 0..4 {
        if !matches!(proto, 0 | 43 | 44 | 60) {
            break;
        }
        if f.len() < at + 8 {
            // Cut inside the extension headers: no transport header to read.
            return ip(proto, (fragment, fragment_id), None);
        }
        let len = if proto == 44 {
            fragment = true;
            fragment_id = u32::from_be_bytes(f[at + 4..at + 8].try_into().unwrap());
            later = u16_at(f, at + 2) & 0xfff8 != 0;
            8
        } else {
            (usize::from(f[at + 1]) + 1) * 8
        };
        proto = f[at];
        at += len;
    }
    ip(proto, (fragment, fragment_id), (!later).then_some(at))
}

fn ports(f: &[u8], at: usize, proto: u8) -> Option<Ports> {
    match proto {
        TCP if f.len() >= at + 20 => Some(Ports {
            at,
            sport: u16_at(f, at),
            dport: u16_at(f, at + 2),
            flags: f[at + 13],
            tcp_len: usize::from(f[at + 12] >> 4) * 4,
        }),
        UDP if f.len() >= at + 8 => {
            Some(Ports { at, sport: u16_at(f, at), dport: u16_at(f, at + 2), flags: 0, tcp_len: 0 })
        }
        _ => None,
    }
}

impl Ip {
    pub fn v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The family's ICMP protocol number.
    pub fn icmp(&self) -> u8 {
        if self.v6() {
            ICMPV6
        } else {
            ICMP
        }
    }
}
