//! The packet `explain` describes: built from the command line as an Ethernet frame (what
//! BPF_PROG_TEST_RUN takes on every hook, the tunnel's too), and read back after the
//! programs rewrote it.

use std::{fmt, net::IpAddr};

use anyhow::{bail, Result};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use serde::Serialize;

/// The transport protocol of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// An echo request (ICMP or ICMPv6 by the addresses' family).
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

/// TCP flags, as `syn,ack` on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Flags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
    pub psh: bool,
}

impl std::str::FromStr for Flags {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut flags = Flags::default();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name.to_ascii_lowercase().as_str() {
                "syn" => flags.syn = true,
                "ack" => flags.ack = true,
                "fin" => flags.fin = true,
                "rst" => flags.rst = true,
                "psh" => flags.psh = true,
                other => return Err(format!("unknown TCP flag {other:?} (syn, ack, fin, rst, psh)")),
            }
        }
        Ok(flags)
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names =
            [(self.syn, "syn"), (self.ack, "ack"), (self.fin, "fin"), (self.rst, "rst"), (self.psh, "psh")];
        let set: Vec<&str> = names.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect();
        f.write_str(if set.is_empty() { "none".to_string() } else { set.join(",") }.as_str())
    }
}

/// The packet as the command line describes it.
#[derive(Debug, Clone, Serialize)]
pub struct Described {
    pub proto: Proto,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP/UDP ports; the echo identifier for ICMP (`sport`).
    pub sport: u16,
    pub dport: u16,
    /// TCP only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flags: Option<Flags>,
    /// The MSS option a TCP SYN carries (none on other segments).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mss: Option<u16>,
}

impl Described {
    /// Checks what the command line gave; errors name the option.
    pub fn check(&self) -> Result<()> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            bail!("--src {} and --dst {} are of different families", self.src, self.dst);
        }
        match self.proto {
            Proto::Tcp | Proto::Udp if self.dport == 0 => {
                bail!("--dport (1-65535) is required for {}", self.proto)
            }
            Proto::Icmp if self.dport != 0 => {
                bail!("--dport is for TCP and UDP (ICMP: --sport is the echo id)")
            }
            Proto::Udp | Proto::Icmp if self.flags.is_some() => bail!("--flags is for TCP only"),
            _ => Ok(()),
        }
    }
}

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const PAYLOAD: &[u8] = b"tailgate explain";

/// The Ethernet frame of `p`, checksums right.
pub fn build(p: &Described) -> Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
    let ip = match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => bail!("mixed address families"),
    };
    let mut out = Vec::new();
    match p.proto {
        Proto::Udp => ip.udp(p.sport, p.dport).write(&mut out, PAYLOAD)?,
        Proto::Icmp if p.src.is_ipv4() => ip.icmpv4_echo_request(p.sport, 1).write(&mut out, PAYLOAD)?,
        Proto::Icmp => ip.icmpv6_echo_request(p.sport, 1).write(&mut out, PAYLOAD)?,
        Proto::Tcp => {
            let flags = p.flags.unwrap_or_default();
            let mut tcp = ip.tcp(p.sport, p.dport, 1000, 64240);
            if flags.syn {
                tcp = tcp.syn();
            }
            if flags.ack {
                tcp = tcp.ack(1);
            }
            if flags.fin {
                tcp = tcp.fin();
            }
            if flags.rst {
                tcp = tcp.rst();
            }
            if flags.psh {
                tcp = tcp.psh();
            }
            if let Some(mss) = p.mss.filter(|_| flags.syn) {
                tcp = tcp.options(&[TcpOptionElement::MaximumSegmentSize(mss)])?;
            }
            // A SYN carries no data; other segments some.
            tcp.write(&mut out, if flags.syn { &[] } else { PAYLOAD })?;
        }
    }
    Ok(out)
}

/// What a frame says, as `explain` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seen {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports (TCP/UDP), the echo identifier (ICMP, `sport`).
    pub sport: u16,
    pub dport: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mss: Option<u16>,
    /// IPv4 header and TCP/UDP/ICMP checksums all right (UDP without a checksum counts).
    pub checksums_ok: bool,
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {}",
            std::net::SocketAddr::new(self.src, self.sport),
            std::net::SocketAddr::new(self.dst, self.dport)
        )?;
        match self.mss {
            Some(mss) => write!(f, " (mss {mss})"),
            None => Ok(()),
        }
    }
}

/// Reads an Ethernet frame back; `None` when it is not one `build` could have made.
pub fn read(frame: &[u8]) -> Option<Seen> {
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    let net = sliced.net.as_ref()?;
    let (src, dst, ip_ok) = match net {
        NetSlice::Ipv4(ip) => {
            let h = ip.header().to_header();
            (
                IpAddr::from(h.source),
                IpAddr::from(h.destination),
                h.calc_header_checksum() == h.header_checksum,
            )
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header().to_header();
            (IpAddr::from(h.source), IpAddr::from(h.destination), true)
        }
        _ => return None,
    };
    let (sport, dport, mss, l4_ok) = match (sliced.transport.as_ref()?, net) {
        (TransportSlice::Tcp(tcp), net) => {
            let h = tcp.to_header();
            let want = match net {
                NetSlice::Ipv4(ip) => h.calc_checksum_ipv4(&ip.header().to_header(), tcp.payload()).ok()?,
                NetSlice::Ipv6(ip) => h.calc_checksum_ipv6(&ip.header().to_header(), tcp.payload()).ok()?,
                _ => return None,
            };
            let mss = tcp.options_iterator().find_map(|o| match o {
                Ok(TcpOptionElement::MaximumSegmentSize(mss)) => Some(mss),
                _ => None,
            });
            (h.source_port, h.destination_port, mss, want == h.checksum)
        }
        (TransportSlice::Udp(udp), net) => {
            let h = udp.to_header();
            let want = match net {
                NetSlice::Ipv4(ip) => h.calc_checksum_ipv4(&ip.header().to_header(), udp.payload()).ok()?,
                NetSlice::Ipv6(ip) => h.calc_checksum_ipv6(&ip.header().to_header(), udp.payload()).ok()?,
                _ => return None,
            };
            (h.source_port, h.destination_port, None, h.checksum == 0 || want == h.checksum)
        }
        (TransportSlice::Icmpv4(icmp), _) => {
            let h = icmp.header();
            let id = match h.icmp_type {
                etherparse::Icmpv4Type::EchoRequest(e) | etherparse::Icmpv4Type::EchoReply(e) => e.id,
                _ => 0,
            };
            (id, 0, None, h.icmp_type.calc_checksum(icmp.payload()) == h.checksum)
        }
        (TransportSlice::Icmpv6(icmp), NetSlice::Ipv6(ip)) => {
            let h = icmp.header();
            let id = match h.icmp_type {
                etherparse::Icmpv6Type::EchoRequest(e) | etherparse::Icmpv6Type::EchoReply(e) => e.id,
                _ => 0,
            };
            let ip = ip.header().to_header();
            let want = h.icmp_type.calc_checksum(ip.source, ip.destination, icmp.payload()).ok()?;
            (id, 0, None, want == h.checksum)
        }
        _ => return None,
    };
    Some(Seen { src, dst, sport, dport, mss, checksums_ok: ip_ok && l4_ok })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(proto: Proto, src: &str, dst: &str) -> Described {
        Described {
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: 40000,
            dport: 443,
            flags: (proto == Proto::Tcp).then(|| "syn".parse().unwrap()),
            mss: Some(1460),
        }
    }

    #[test]
    fn built_packets_read_back() {
        for (proto, src, dst) in [
            (Proto::Tcp, "100.64.0.2", "192.0.2.1"),
            (Proto::Udp, "2001:db8::2", "fd7a:115c:a1e0::1"),
            (Proto::Icmp, "100.64.0.2", "192.0.2.1"),
            (Proto::Icmp, "2001:db8::2", "2001:db8::1"),
        ] {
            let p = described(proto, src, dst);
            let seen = read(&build(&p).unwrap()).unwrap();
            assert_eq!((seen.src, seen.dst), (p.src, p.dst), "{proto:?}");
            assert!(seen.checksums_ok, "{proto:?}");
            assert_eq!(seen.sport, 40000, "{proto:?}");
            assert_eq!(seen.mss, (proto == Proto::Tcp).then_some(1460));
        }
    }

    #[test]
    fn flags_parse_and_print() {
        let f: Flags = "SYN, ack".parse().unwrap();
        assert!(f.syn && f.ack && !f.fin);
        assert_eq!(f.to_string(), "syn,ack");
        assert!("syn,urg".parse::<Flags>().unwrap_err().contains("urg"));
        let mut p = described(Proto::Udp, "192.0.2.2", "192.0.2.1");
        p.flags = Some(f);
        assert!(p.check().unwrap_err().to_string().contains("--flags"));
        p.flags = None;
        p.dport = 0;
        assert!(p.check().unwrap_err().to_string().contains("--dport"));
    }
}
