//! Differential testing: random policies and random packets (valid and malformed) through
//! the kernel programs (BPF_PROG_TEST_RUN on the real object, maps filled by the daemon's map
//! sync) and through the reference model (`model`), compared field by field: verdict,
//! counters, the prefix rule hit, mark, bytes out, flow and fragment tables after.
//! `tests/differential.rs` runs it in the suite; `tailgate-fuzz` (`cargo xtask fuzz`) for
//! as long as asked.

pub mod iptables;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use ipnet::IpNet;
use proptest::{collection::vec, prelude::*, sample::Index};
use tailgate::{
    backend::bpf::{cgnat as bpf_cgnat, testrun, Datapath, Hook as BpfHook},
    config::Config,
    policy::{self, DesiredState},
};
use tailgate_abi::{
    cgnat::{MAP_FWD_V4, MAP_FWD_V6, MAP_IN_V4, MAP_IN_V6},
    conntrack::{zone, Flow, FlowKey4, FlowKey6, MAP_FRAGS_V4, MAP_FRAGS_V6, MAP_V4, MAP_V6},
    counters::Counter,
    generation::MAP_ACTIVE,
    MAP_COUNTERS, MAP_RULE_HITS,
};

use crate::{
    model::{
        self,
        flows::{Entry, Flows, Key},
        packet::Parsed,
        Env, Hook, Outcome, Skb, Verdict,
    },
    testrun as tr,
};

/// Where the tunnel hooks' packets start: the test run hands them Ethernet frames.
const TUNNEL_L3: usize = 14;
/// The device of every hook in a test run: `lo`.
const LO: u32 = 1;
/// Another device packets are forwarded from.
const LAN: u32 = 7;
const SECOND: u64 = 1_000_000_000;

/// A random policy: the config fields the modelled stages read.
#[derive(Debug, Clone)]
pub struct Policy {
    pub cgnat_off: bool,
    pub allow_replies: bool,
    pub allow: Vec<IpNet>,
    pub drop: Vec<IpNet>,
    pub mark: (u32, u32),
    pub stateful: bool,
    pub masquerade: bool,
    /// `None`: off; `Some(0)`: the tunnel's path MTU; else a fixed MSS.
    pub mss: Option<u16>,
}

impl Policy {
    pub fn toml(&self) -> String {
        let list =
            |v: &[IpNet]| v.iter().map(|p| format!("{:?}", p.to_string())).collect::<Vec<_>>().join(", ");
        let clamp = match self.mss {
            None => "\"off\"".to_string(),
            Some(0) => "\"pmtu\"".to_string(),
            Some(n) => n.to_string(),
        };
        format!(
            "[cgnat]\nmode = {:?}\nallow_replies = {}\nallow = [{}]\ndrop = [{}]\n\
             [subnet_routes]\nmark = \"{:#x}/{:#x}\"\nstateful = {}\nmasquerade = {}\n[mss]\nclamp = {clamp}\n",
            if self.cgnat_off { "off" } else { "drop" },
            self.allow_replies,
            list(&self.allow),
            list(&self.drop),
            self.mark.0,
            self.mark.1,
            self.stateful,
            self.masquerade,
        )
    }

    pub fn state(&self) -> Result<DesiredState> {
        let config = Config::parse(&self.toml(), &HashMap::new()).context("the random policy's config")?;
        Ok(policy::compile(&config, tr::system()))
    }

    /// Addresses worth sending from and to: every prefix's edges inside and out, a host in
    /// it, the built-in ranges' edges, addresses outside every range.
    fn pool(&self) -> Vec<IpAddr> {
        let mut pool: Vec<IpAddr> = [
            "100.64.0.0",
            "100.63.255.255",
            "100.127.255.255",
            "100.128.0.0",
            "100.115.92.0",
            "100.115.93.255",
            "100.115.91.255",
            "100.115.94.0",
            "100.100.100.100",
            "192.0.2.1",
            "10.1.2.3",
            "fd7a:115c:a1e0::",
            "fd7a:115c:a1e0:ffff:ffff:ffff:ffff:ffff",
            "fd7a:115c:a1df:ffff:ffff:ffff:ffff:ffff",
            "fd7a:115c:a1e1::",
            "2001:db8::1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for p in self.allow.iter().chain(&self.drop) {
            let (first, last) = (p.network(), p.broadcast());
            pool.extend([first, last, step(first, -1), step(last, 1), step(first, 1)]);
        }
        pool
    }
}

fn step(a: IpAddr, by: i128) -> IpAddr {
    match a {
        IpAddr::V4(v) => IpAddr::V4(Ipv4Addr::from((u32::from(v) as i64 + by as i64) as u32)),
        IpAddr::V6(v) => IpAddr::V6(Ipv6Addr::from((u128::from(v) as i128).wrapping_add(by) as u128)),
    }
}

fn prefix() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 10u8..=32).prop_map(|(bits, len)| {
            let addr = Ipv4Addr::from(0x6440_0000 | (bits & 0x003f_ffff));
            IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc())
        }),
        // Around the ChromeOS carve-out and the cloud DNS range: overlaps with the built-ins.
        (prop::sample::select(vec![0x6473_5c00u32, 0x6464_0000, 0x6464_6400]), 14u8..=32).prop_map(
            |(base, len)| IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(base), len).unwrap().trunc())
        ),
        (any::<u128>(), 48u8..=128).prop_map(|(bits, len)| {
            let base = 0xfd7a_115c_a1e0u128 << 80;
            let addr = Ipv6Addr::from(base | (bits & ((1u128 << 80) - 1)));
            IpNet::V6(ipnet::Ipv6Net::new(addr, len).unwrap().trunc())
        }),
    ]
}

pub fn policy() -> impl Strategy<Value = Policy> {
    let marks = prop::sample::select(vec![
        (0x40000u32, 0xff0000u32),
        (0x1, 0x1),
        (0x10, 0xf0),
        (0x80000000, 0xffffffff),
    ]);
    // Fixed values the MSS options below sit around (the path MTU's are 1240 and 1220).
    let mss = prop_oneof![
        Just(None),
        Just(Some(0)),
        prop::sample::select(vec![536u16, 1200, 1400]).prop_map(Some),
        (536u16..=1500).prop_map(Some)
    ];
    (
        prop::bool::weighted(0.1),
        any::<bool>(),
        vec(prefix(), 0..6),
        vec(prefix(), 0..6),
        marks,
        any::<bool>(),
        any::<bool>(),
        mss,
    )
        .prop_map(|(cgnat_off, allow_replies, allow, mut drop, mark, stateful, masquerade, mss)| {
            // A prefix in both lists is refused by the config: keep it allowed.
            drop.retain(|p| !allow.contains(p));
            Policy { cgnat_off, allow_replies, allow, drop, mark, stateful, masquerade, mss }
        })
}

/// An address: one of the policy's interesting ones, or any of the family.
#[derive(Debug, Clone)]
pub enum Pick {
    Pool(Index),
    Any(u128),
}

/// The transport part of a packet.
#[derive(Debug, Clone)]
pub enum Transport {
    /// `options`: raw option bytes (MSS where the generator put it, NOPs, odd lengths);
    /// `doff`: the data offset to write instead of the right one.
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        options: Vec<u8>,
        doff: Option<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// `quote`: an error about a TCP/UDP packet the packet's destination sent.
    Icmp {
        kind: u8,
        id: u16,
        quote: Option<(u8, u16, u16)>,
    },
    Other(u8),
}

/// How the IP layer is dressed.
#[derive(Debug, Clone)]
pub struct IpDress {
    /// IPv4 option words (IHL - 5).
    pub options: u8,
    /// IPv6 extension headers before the transport (hop-by-hop, routing, destination
    /// options, fragment).
    pub ext: Vec<u8>,
    /// Fragment: (id, offset in 8-byte units, more fragments).
    pub fragment: Option<(u32, u16, bool)>,
}

/// A change that breaks the packet.
#[derive(Debug, Clone)]
pub enum Damage {
    None,
    /// Cut the frame at this point (at least the Ethernet header stays).
    Truncate(Index),
    /// Overwrite one byte.
    Byte(Index, u8),
}

/// A flow-table entry the case starts with, relative to the packet.
#[derive(Debug, Clone)]
pub struct Seed {
    pub kind: SeedKind,
    /// 0: the zone of the packet's hook.
    pub zone: u8,
    pub state: u8,
    pub flags: u8,
    pub expired: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum SeedKind {
    /// The flow the packet answers (its tuple reversed).
    Answered,
    /// The packet's own flow.
    Own,
    /// The flow an ICMP error quotes.
    Quoted,
    /// The datagram a later fragment belongs to (fragment table).
    Datagram,
}

/// One packet on one hook.
#[derive(Debug, Clone)]
pub struct Packet {
    pub hook: Hook,
    pub v6: bool,
    pub src: Pick,
    pub dst: Pick,
    pub transport: Transport,
    pub dress: IpDress,
    pub vlans: u8,
    pub payload: u8,
    pub mark: u32,
    /// 0: generated by this host; 1: from the tunnel itself; else forwarded from the LAN.
    pub ingress: u8,
    pub seeds: Vec<Seed>,
    pub damage: Damage,
}

fn transport() -> impl Strategy<Value = Transport> {
    let option = prop_oneof![
        4 => prop_oneof![
            any::<u16>(),
            prop::sample::select(vec![535u16, 536, 537, 1199, 1200, 1201, 1219, 1220, 1221, 1239, 1240, 1241, 1399, 1400, 1401, 1460]),
        ]
        .prop_map(|mss| vec![2, 4, (mss >> 8) as u8, mss as u8]),
        2 => Just(vec![1]),
        1 => Just(vec![0]),
        1 => Just(vec![3, 3, 7]),
        1 => Just(vec![4, 2]),
        1 => Just(vec![8, 10, 0, 0, 0, 1, 0, 0, 0, 0]),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(k, l)| vec![k, l]),
    ];
    let flags = prop_oneof![
        Just(0x02u8),
        Just(0x12),
        Just(0x10),
        Just(0x11),
        Just(0x04),
        Just(0x14),
        Just(0x06),
        any::<u8>()
    ];
    prop_oneof![
        5 => (any::<u16>(), any::<u16>(), flags, vec(option, 0..8), prop::option::weighted(0.1, 0u8..16))
            .prop_map(|(sport, dport, flags, options, doff)| Transport::Tcp {
                sport, dport, flags, options: options.concat(), doff
            }),
        3 => (any::<u16>(), any::<u16>()).prop_map(|(sport, dport)| Transport::Udp { sport, dport }),
        2 => (prop::sample::select(vec![0u8, 8, 3, 11, 13, 128, 129, 1, 2, 4]), any::<u16>(),
              prop::option::of((prop::sample::select(vec![6u8, 17]), any::<u16>(), any::<u16>())))
            .prop_map(|(kind, id, quote)| Transport::Icmp { kind, id, quote }),
        1 => prop::sample::select(vec![47u8, 50, 132, 0, 43, 60]).prop_map(Transport::Other),
    ]
}

fn dress() -> impl Strategy<Value = IpDress> {
    let fragment =
        prop::option::weighted(0.25, (any::<u32>(), prop_oneof![Just(0u16), 1u16..200], any::<bool>()));
    (
        prop_oneof![4 => Just(0u8), 1 => 1u8..=10],
        vec(prop::sample::select(vec![0u8, 43, 60, 44]), 0..6),
        fragment,
    )
        .prop_map(|(options, ext, fragment)| IpDress { options, ext, fragment })
}

fn seed() -> impl Strategy<Value = Seed> {
    (
        prop::sample::select(vec![
            SeedKind::Answered,
            SeedKind::Answered,
            SeedKind::Own,
            SeedKind::Quoted,
            SeedKind::Datagram,
        ]),
        // 0: the zone of the hook the packet goes to (most seeds are meant to be found).
        prop::sample::select(vec![0, 0, 0, zone::OWN, zone::TUNNEL, zone::INBOUND]),
        1u8..=4,
        any::<u8>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(kind, zone, state, flags, expired)| Seed { kind, zone, state, flags, expired })
}

/// An address pick: mostly from the policy's pool.
fn picks() -> impl Strategy<Value = Pick> {
    prop_oneof![4 => any::<Index>().prop_map(Pick::Pool), 1 => any::<u128>().prop_map(Pick::Any)]
}

pub fn packet() -> impl Strategy<Value = Packet> {
    let damage = prop_oneof![
        6 => Just(Damage::None),
        2 => any::<Index>().prop_map(Damage::Truncate),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Byte(i, b)),
    ];
    let headers = (
        prop::sample::select(Hook::ALL.to_vec()),
        any::<bool>(),
        picks(),
        picks(),
        transport(),
        dress(),
        prop_oneof![6 => Just(0u8), 1 => 1u8..=3],
    );
    let rest = (any::<u8>(), any::<u32>(), 0u8..3, vec(seed(), 0..3), damage);
    (headers, rest).prop_map(
        |((hook, v6, src, dst, transport, dress, vlans), (payload, mark, ingress, seeds, damage))| Packet {
            hook,
            v6,
            src,
            dst,
            transport,
            dress,
            vlans,
            payload,
            mark,
            ingress,
            seeds,
            damage,
        },
    )
}

/// A case: a policy and packets sent under it.
pub fn case(packets: usize) -> impl Strategy<Value = (Policy, Vec<Packet>)> {
    (policy(), vec(packet(), 1..=packets))
}

impl Packet {
    fn address(&self, pick: &Pick, pool: &[IpAddr]) -> IpAddr {
        self::address(pick, pool, self.v6)
    }

    /// The frame: Ethernet (VLAN tags on the uplink hooks), IP, transport, damage.
    pub fn frame(&self, pool: &[IpAddr]) -> Vec<u8> {
        let (src, dst) = (self.address(&self.src, pool), self.address(&self.dst, pool));
        let (proto, l4) = self.l4(src, dst);
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        let uplink = matches!(self.hook, Hook::Uplink | Hook::UplinkEgress);
        for i in 0..if uplink { self.vlans } else { 0 } {
            f.extend_from_slice(&[
                if i == 0 && self.vlans > 1 { 0x88 } else { 0x81 },
                if i == 0 && self.vlans > 1 { 0xa8 } else { 0 },
                0,
                10 + i,
            ]);
        }
        f.extend_from_slice(if self.v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let options = usize::from(self.dress.options) * 4;
                let total = 20 + options + l4.len();
                let (id, offset, more) = self.dress.fragment.unwrap_or((0, 0, false));
                let frag = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
                let mut h = vec![0x45 + self.dress.options, 0];
                h.extend_from_slice(&(total as u16).to_be_bytes());
                h.extend_from_slice(&(id as u16).to_be_bytes());
                h.extend_from_slice(&frag.to_be_bytes());
                h.extend_from_slice(&[64, proto, 0, 0]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend(std::iter::repeat_n(1u8, options)); // NOP options
                let check =
                    etherparse::Ipv4HeaderSlice::from_slice(&h).map(|s| s.to_header().calc_header_checksum());
                if let Ok(check) = check {
                    h[10..12].copy_from_slice(&check.to_be_bytes());
                }
                f.extend(h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ext = Vec::new();
                let chain: Vec<u8> = self.dress.ext.iter().copied().chain(std::iter::once(proto)).collect();
                for pair in chain.windows(2) {
                    match pair[0] {
                        44 => {
                            let (id, offset, more) = self.dress.fragment.unwrap_or((0, 0, false));
                            ext.extend_from_slice(&[pair[1], 0]);
                            ext.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                            ext.extend_from_slice(&id.to_be_bytes());
                        }
                        _ => ext.extend_from_slice(&[pair[1], 0, 1, 4, 0, 0, 0, 0]),
                    }
                }
                let mut h = vec![0x60, 0, 0, 0];
                h.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[chain[0], 64]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                f.extend(h);
                f.extend(ext);
            }
            _ => unreachable!("one family"),
        }
        f.extend(l4);
        match &self.damage {
            Damage::None => {}
            Damage::Truncate(i) => f.truncate(14 + i.index(f.len() - 13)),
            Damage::Byte(i, b) => {
                let at = i.index(f.len());
                f[at] = *b;
            }
        }
        // A TC test run refuses a frame whose EtherType says IP without a whole IP header
        // after it (a device would not deliver one either): such a frame goes as another
        // EtherType. The tunnel programs read the version nibble, not the EtherType: to them
        // it is the same packet.
        let whole = match (f[12], f[13]) {
            (0x08, 0x00) => 34,
            (0x86, 0xdd) => 54,
            _ => 14,
        };
        if self.hook != Hook::Uplink && f.len() < whole {
            f[12..14].copy_from_slice(&[0x88, 0xb5]);
        }
        f
    }

    /// The transport protocol and header + payload, checksum right where it can be.
    fn l4(&self, src: IpAddr, dst: IpAddr) -> (u8, Vec<u8>) {
        let payload: Vec<u8> = (0..self.payload % 64).collect();
        let (src_b, dst_b) = (octets(src), octets(dst));
        match &self.transport {
            Transport::Tcp { sport, dport, flags, options, doff } => {
                let mut options = options.clone();
                while options.len() % 4 != 0 {
                    options.push(0);
                }
                options.truncate(40);
                let right = (20 + options.len()) / 4;
                let mut h = Vec::new();
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
                h.push((doff.unwrap_or(right as u8) & 0xf) << 4);
                h.push(*flags);
                h.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]);
                h.extend(options);
                if let Ok(slice) = etherparse::TcpHeaderSlice::from_slice(&h) {
                    let check = if self.v6 {
                        slice.calc_checksum_ipv6_raw(
                            src_b.try_into().unwrap(),
                            dst_b.try_into().unwrap(),
                            &payload,
                        )
                    } else {
                        slice.calc_checksum_ipv4_raw(
                            src_b[..4].try_into().unwrap(),
                            dst_b[..4].try_into().unwrap(),
                            &payload,
                        )
                    };
                    if let Ok(check) = check {
                        h[16..18].copy_from_slice(&check.to_be_bytes());
                    }
                }
                h.extend(payload);
                (6, h)
            }
            Transport::Udp { sport, dport } => {
                let header = etherparse::UdpHeader {
                    source_port: *sport,
                    destination_port: *dport,
                    length: (8 + payload.len()) as u16,
                    checksum: 0,
                };
                let check = if self.v6 {
                    header.calc_checksum_ipv6_raw(
                        src_b.try_into().unwrap(),
                        dst_b.try_into().unwrap(),
                        &payload,
                    )
                } else {
                    header.calc_checksum_ipv4_raw(
                        src_b[..4].try_into().unwrap(),
                        dst_b[..4].try_into().unwrap(),
                        &payload,
                    )
                };
                let mut h = header.to_bytes().to_vec();
                h[6..8].copy_from_slice(&check.unwrap_or(0).to_be_bytes());
                h.extend(payload);
                (17, h)
            }
            Transport::Icmp { kind, id, quote } => {
                let mut h = vec![*kind, 0, 0, 0];
                h.extend_from_slice(&id.to_be_bytes());
                h.extend_from_slice(&[0, 1]);
                match quote {
                    // The packet the error is about: sent by this packet's destination.
                    Some((proto, sport, dport)) => {
                        if self.v6 {
                            let mut q = vec![0x60, 0, 0, 0, 0, 8, *proto, 64];
                            q.extend_from_slice(&dst_b);
                            q.extend_from_slice(&src_b);
                            h.extend(q);
                        } else {
                            let mut q = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, *proto, 0, 0];
                            q.extend_from_slice(&dst_b[..4]);
                            q.extend_from_slice(&src_b[..4]);
                            h.extend(q);
                        }
                        h.extend_from_slice(&sport.to_be_bytes());
                        h.extend_from_slice(&dport.to_be_bytes());
                        h.extend_from_slice(&[0, 8, 0, 0]);
                    }
                    None => h.extend(payload),
                }
                (if self.v6 { 58 } else { 1 }, h)
            }
            Transport::Other(proto) => (*proto, payload),
        }
    }

    fn skb(&self) -> Skb {
        let ingress = match self.ingress {
            0 => 0,
            1 => LO,
            _ => LAN,
        };
        match self.hook {
            // XDP runs on lo's receive queue; the uplink egress sees the host's own packets.
            Hook::Uplink => Skb { mark: 0, ingress_ifindex: LO, ifindex: LO },
            _ => Skb { mark: self.mark, ingress_ifindex: ingress, ifindex: LO },
        }
    }
}

/// The address `pick` names, of the family `v6` says.
fn address(pick: &Pick, pool: &[IpAddr], v6: bool) -> IpAddr {
    let family: Vec<IpAddr> = pool.iter().copied().filter(|a| a.is_ipv6() == v6).collect();
    match pick {
        Pick::Pool(i) => family[i.index(family.len())],
        Pick::Any(bits) if v6 => IpAddr::V6(Ipv6Addr::from(*bits)),
        Pick::Any(bits) => IpAddr::V4(Ipv4Addr::from(*bits as u32)),
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

/// The kernel's side: the datapath loaded once, a policy synced per case.
pub struct Kernel {
    dp: Datapath,
    /// Rule ids in force: prefix, drop.
    ids: HashMap<u32, (IpNet, bool)>,
    state: Option<DesiredState>,
    pool: Vec<IpAddr>,
    /// How many packets bumped each counter, took each verdict, hit a rule, were rewritten
    /// (what the random cases covered).
    pub tally: BTreeMap<String, u64>,
}

/// What differed, with everything needed to replay it.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub policy: String,
    pub hook: Hook,
    pub skb: Skb,
    pub frame: Vec<u8>,
    pub seeds: Vec<(Key, Entry)>,
    pub model: Seen,
    pub kernel: Seen,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the kernel and the model differ\npolicy:\n{}", self.policy)?;
        writeln!(f, "hook: {:?}, skb: {:?}", self.hook, self.skb)?;
        writeln!(f, "frame ({} bytes): {}", self.frame.len(), hex(&self.frame))?;
        for (key, entry) in &self.seeds {
            writeln!(f, "flow table before: {key:?} {entry:?}")?;
        }
        writeln!(f, "model:  {:?}", self.model)?;
        write!(f, "kernel: {:?}", self.kernel)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Flow entries as compared: key → (state, flags original, flags reply, touched in this run).
pub type FlowView = BTreeMap<String, (u8, u8, u8, bool)>;

/// A hook's result as compared: counters as a sorted multiset, flows without clocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub verdict: Verdict,
    pub counters: BTreeMap<&'static str, u64>,
    /// The prefix rule whose hit counter moved, and whether it drops. (Rule ids are per
    /// prefix and verdict, shared by both directions: the hook says which list it was.)
    pub rule: Option<(IpNet, bool)>,
    pub mark: u32,
    pub frame: String,
    /// key → (state, flags original, flags reply, touched in this run).
    pub flows: FlowView,
    pub fragments: Vec<String>,
}

impl Kernel {
    pub fn new() -> Result<Self> {
        let dp = tr::datapath("")?;
        Ok(Self { dp, ids: HashMap::new(), state: None, pool: Vec::new(), tally: BTreeMap::new() })
    }

    /// Puts `policy` in force.
    pub fn policy(&mut self, policy: &Policy) -> Result<()> {
        let state = policy.state()?;
        self.dp.sync(&state)?;
        self.ids.clear();
        let active =
            aya::maps::Array::<&MapData, u32>::try_from(self.dp.ebpf.map(MAP_ACTIVE).unwrap())?.get(&0, 0)?;
        for (v6, name) in [(false, MAP_IN_V4), (true, MAP_IN_V6), (false, MAP_FWD_V4), (true, MAP_FWD_V6)] {
            for (prefix, rule) in bpf_cgnat::rules(self.dp.ebpf.map(name).unwrap(), v6, active & 1)? {
                let drop = rule.verdict == tailgate_abi::verdict::DROP;
                self.ids.insert(rule.rule_id, (prefix, drop));
            }
        }
        self.state = Some(state);
        self.pool = policy.pool();
        Ok(())
    }

    /// Sends `packet` through the kernel and the model; the mismatch, if any.
    pub fn check(&mut self, policy: &Policy, packet: &Packet) -> Result<Option<Box<Mismatch>>> {
        let state = self.state.clone().context("no policy")?;
        let frame = packet.frame(&self.pool);
        let skb = packet.skb();
        let now = monotonic();
        let seeds = seeds(packet, &frame, now);
        let mut flows = Flows::default();
        for (key, entry, fragment) in &seeds {
            if *fragment {
                flows.fragments.insert(*key, entry.last_seen);
            } else {
                flows.flows.insert(*key, *entry);
            }
        }
        self.set_tables(&flows)?;
        let env = Env { tunnel_l3: TUNNEL_L3, now };
        let expect = model::run(&state, &mut flows, env, packet.hook, &frame, skb);
        let kernel = self.run(packet.hook, &frame, skb, now)?;
        let model = seen_of(&expect, &flows, now);
        let mut covered: Vec<String> = kernel.counters.keys().map(|c| c.to_string()).collect();
        covered.push(format!("{:?} {:?}", packet.hook, kernel.verdict));
        if kernel.rule.is_some() {
            covered.push("rule hit".into());
        }
        if kernel.frame != hex(&frame) {
            covered.push("rewritten".into());
        }
        for name in covered {
            *self.tally.entry(name).or_insert(0) += 1;
        }
        if model == kernel {
            return Ok(None);
        }
        Ok(Some(Box::new(Mismatch {
            policy: policy.toml(),
            hook: packet.hook,
            skb,
            frame,
            seeds: seeds.iter().map(|(k, e, _)| (*k, *e)).collect(),
            model,
            kernel,
        })))
    }

    fn run(&mut self, hook: Hook, frame: &[u8], skb: Skb, now: u64) -> Result<Seen> {
        let before = self.counters()?;
        let hits_before = self.hits()?;
        let run = match hook {
            Hook::Uplink => testrun::xdp(&mut self.dp.ebpf, frame, 0)?,
            _ => {
                let hook = match hook {
                    Hook::UplinkEgress => BpfHook::UplinkEgress,
                    Hook::TunnelIngress => BpfHook::TcIngress,
                    _ => BpfHook::TcEgress,
                };
                // ifindex 0: the test run puts the packet on lo.
                let ctx = testrun::Skb { mark: skb.mark, ingress_ifindex: skb.ingress_ifindex, ifindex: 0 };
                testrun::tc(&mut self.dp.ebpf, hook, frame, ctx)?
            }
        };
        let after = self.counters()?;
        let hits_after = self.hits()?;
        let verdict = match (hook, run.verdict) {
            (Hook::Uplink, 1) => Verdict::Drop,
            (Hook::Uplink, 2) => Verdict::Pass,
            (Hook::Uplink, other) => anyhow::bail!("XDP action {other}"),
            (_, 0) => Verdict::Pass,
            (_, 2) => Verdict::Drop,
            (_, u32::MAX) => Verdict::Next,
            (_, other) => anyhow::bail!("return code {other} of {hook:?}"),
        };
        let counters = Counter::ALL
            .iter()
            .filter(|c| after[c] != before[c])
            .map(|c| (c.name(), after[c] - before[c]))
            .collect();
        let moved: Vec<u32> =
            hits_after.iter().filter(|(id, n)| hits_before.get(id) != Some(n)).map(|(id, _)| *id).collect();
        anyhow::ensure!(moved.len() <= 1, "rule hits {moved:?} moved");
        let rule = moved.first().map(|id| self.ids[id]);
        let (flows, fragments) = self.tables(now)?;
        let mark = if hook == Hook::Uplink { 0 } else { run.mark };
        Ok(Seen { verdict, counters, rule, mark, frame: hex(&run.frame), flows, fragments })
    }

    fn counters(&self) -> Result<HashMap<Counter, u64>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.dp.ebpf.map(MAP_COUNTERS).unwrap())?;
        Counter::ALL.iter().map(|c| Ok((*c, map.get(&(*c as u32), 0)?.iter().sum()))).collect()
    }

    fn hits(&self) -> Result<HashMap<u32, u64>> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.dp.ebpf.map(MAP_RULE_HITS).unwrap())?;
        self.ids.keys().map(|id| Ok((*id, map.get(id, 0)?.iter().sum()))).collect()
    }

    /// Empties the flow and fragment tables and writes `flows` into them.
    fn set_tables(&mut self, flows: &Flows) -> Result<()> {
        clear::<FlowKey4, Flow>(&mut self.dp, MAP_V4)?;
        clear::<FlowKey6, Flow>(&mut self.dp, MAP_V6)?;
        clear::<FlowKey4, u64>(&mut self.dp, MAP_FRAGS_V4)?;
        clear::<FlowKey6, u64>(&mut self.dp, MAP_FRAGS_V6)?;
        for (key, e) in &flows.flows {
            let flow = Flow {
                last_seen: e.last_seen,
                created: e.last_seen,
                state: e.state,
                flags_original: e.flags_original,
                flags_reply: e.flags_reply,
                ..Flow::default()
            };
            match key {
                Key::V4(k) => map::<FlowKey4, Flow>(&mut self.dp, MAP_V4)?.insert(k, flow, 0)?,
                Key::V6(k) => map::<FlowKey6, Flow>(&mut self.dp, MAP_V6)?.insert(k, flow, 0)?,
            }
        }
        for (key, t) in &flows.fragments {
            match key {
                Key::V4(k) => map::<FlowKey4, u64>(&mut self.dp, MAP_FRAGS_V4)?.insert(k, t, 0)?,
                Key::V6(k) => map::<FlowKey6, u64>(&mut self.dp, MAP_FRAGS_V6)?.insert(k, t, 0)?,
            }
        }
        Ok(())
    }

    fn tables(&mut self, now: u64) -> Result<(FlowView, Vec<String>)> {
        let mut flows = BTreeMap::new();
        for (k, f) in entries::<FlowKey4, Flow>(&mut self.dp, MAP_V4)? {
            flows.insert(
                format!("{:?}", Key::V4(k)),
                (f.state, f.flags_original, f.flags_reply, f.last_seen >= now),
            );
        }
        for (k, f) in entries::<FlowKey6, Flow>(&mut self.dp, MAP_V6)? {
            flows.insert(
                format!("{:?}", Key::V6(k)),
                (f.state, f.flags_original, f.flags_reply, f.last_seen >= now),
            );
        }
        let mut fragments: Vec<String> = entries::<FlowKey4, u64>(&mut self.dp, MAP_FRAGS_V4)?
            .into_iter()
            .map(|(k, _)| format!("{:?}", Key::V4(k)))
            .chain(
                entries::<FlowKey6, u64>(&mut self.dp, MAP_FRAGS_V6)?
                    .into_iter()
                    .map(|(k, _)| format!("{:?}", Key::V6(k))),
            )
            .collect();
        fragments.sort();
        Ok((flows, fragments))
    }
}

fn map<'a, K: aya::Pod, V: aya::Pod>(
    dp: &'a mut Datapath,
    name: &str,
) -> Result<BpfHashMap<&'a mut MapData, K, V>> {
    Ok(BpfHashMap::try_from(dp.ebpf.map_mut(name).with_context(|| format!("map {name}"))?)?)
}

fn entries<K: aya::Pod, V: aya::Pod>(dp: &mut Datapath, name: &str) -> Result<Vec<(K, V)>> {
    Ok(map::<K, V>(dp, name)?.iter().collect::<Result<_, _>>()?)
}

fn clear<K: aya::Pod, V: aya::Pod>(dp: &mut Datapath, name: &str) -> Result<()> {
    let keys: Vec<K> = map::<K, V>(dp, name)?.keys().collect::<Result<_, _>>()?;
    let mut m = map::<K, V>(dp, name)?;
    for k in keys {
        m.remove(&k)?;
    }
    Ok(())
}

/// The model's outcome as compared.
fn seen_of(o: &Outcome, flows: &Flows, now: u64) -> Seen {
    let mut counters = BTreeMap::new();
    for c in &o.counters {
        *counters.entry(c.name()).or_insert(0) += 1;
    }
    let flows_seen = flows
        .flows
        .iter()
        .map(|(k, e)| (format!("{k:?}"), (e.state, e.flags_original, e.flags_reply, e.last_seen >= now)))
        .collect();
    let mut fragments: Vec<String> = flows.fragments.keys().map(|k| format!("{k:?}")).collect();
    fragments.sort();
    Seen {
        verdict: o.verdict,
        counters,
        rule: o.rule.map(|hit| (hit.prefix, hit.drop)),
        mark: o.mark,
        frame: hex(&o.frame),
        flows: flows_seen,
        fragments,
    }
}

/// The entries the packet's seeds stand for (key, entry, in the fragment table?), read off
/// the packet as the model parses it.
fn seeds(packet: &Packet, frame: &[u8], now: u64) -> Vec<(Key, Entry, bool)> {
    let parsed = match packet.hook {
        Hook::Uplink | Hook::UplinkEgress => model::packet::ethernet(frame),
        _ => model::packet::ip(frame, TUNNEL_L3),
    };
    let Parsed::Ip(p) = parsed else { return Vec::new() };
    let mut out = Vec::new();
    for s in &packet.seeds {
        let zone = match (s.zone, packet.hook) {
            (0, Hook::Uplink | Hook::UplinkEgress) => zone::OWN,
            (0, _) => zone::TUNNEL,
            (zone, _) => zone,
        };
        let at = model::flows::At { zone, ifindex: LO };
        let key = match (s.kind, model::flows::seen(&p, frame, at)) {
            (SeedKind::Answered, model::flows::Seen::Flow { key, .. }) => key.reversed(),
            (SeedKind::Own, model::flows::Seen::Flow { key, .. }) => key,
            (SeedKind::Quoted, model::flows::Seen::Error(key)) => key,
            (SeedKind::Datagram, _) if p.fragment => {
                let id = p.fragment_id;
                Key::new(p.src, p.dst, ((id >> 16) as u16, id as u16), p.proto, at)
            }
            _ => continue,
        };
        let fragment = matches!(s.kind, SeedKind::Datagram);
        let timeout = model::flows::timeout(key.proto(), s.state);
        let last_seen = match (fragment, s.expired) {
            (_, false) => now - SECOND,
            (true, true) => now - 40 * SECOND,
            // An entry the clock cannot have aged that far (a young boot) stays live.
            (false, true) => now.checked_sub(timeout + 10 * SECOND).unwrap_or(now - SECOND),
        };
        let entry = Entry { state: s.state, flags_original: s.flags, flags_reply: 0, last_seen };
        out.push((key, entry, fragment));
    }
    out
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * SECOND + ts.tv_nsec as u64
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct Report {
    pub cases: u32,
    /// Packets compared (shrinking a failure included).
    pub packets: u64,
    pub elapsed: std::time::Duration,
    /// See [`Kernel::tally`].
    pub tally: BTreeMap<String, u64>,
}

/// Runs `cases` random cases of up to `packets` packets each; a mismatch comes back as the
/// shrunk case's report (proptest shrinks the policy and the packets to a minimal one).
pub fn fuzz(cases: u32, packets: usize) -> Result<Report, String> {
    use std::cell::{Cell, RefCell};

    use proptest::test_runner::TestCaseError;
    let kernel = RefCell::new(Kernel::new().map_err(|e| format!("loading the datapath: {e:#}"))?);
    let count = Cell::new(0u64);
    let mut runner = runner(cases);
    let start = std::time::Instant::now();
    let result = runner.run(&case(packets), |(policy, list)| {
        let mut kernel = kernel.borrow_mut();
        kernel.policy(&policy).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        for packet in &list {
            count.set(count.get() + 1);
            match kernel.check(&policy, packet) {
                Ok(None) => {}
                Ok(Some(mismatch)) => return Err(TestCaseError::fail(mismatch.to_string())),
                Err(e) => return Err(TestCaseError::fail(format!("{e:#}"))),
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            let tally = std::mem::take(&mut kernel.borrow_mut().tally);
            Ok(Report { cases, packets: count.get(), elapsed: start.elapsed(), tally })
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The iptables side: `cases` random policies with up to `packets` first packets each,
/// evaluated on the rendered rules and the model; the packets compared, or the shrunk
/// mismatch.
pub fn fuzz_iptables(cases: u32, packets: usize) -> Result<u64, String> {
    use std::cell::Cell;

    use proptest::test_runner::TestCaseError;
    let count = Cell::new(0u64);
    let mut runner = runner(cases);
    let result = runner.run(&(policy(), vec(iptables::first(), 1..=packets)), |(policy, list)| {
        for first in &list {
            count.set(count.get() + 1);
            match iptables::check(&policy, first) {
                Ok(None) => {}
                Ok(Some(mismatch)) => return Err(TestCaseError::fail(mismatch.to_string())),
                Err(e) => return Err(TestCaseError::fail(format!("{e:#}"))),
            }
        }
        Ok(())
    });
    result.map(|()| count.get()).map_err(|e| e.to_string())
}

/// A proptest runner for `cases` cases that shrinks a failure far (a minimal reproducer)
/// and writes no regression files.
fn runner(cases: u32) -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, TestRunner};
    TestRunner::new(Config { cases, failure_persistence: None, max_shrink_iters: 4_096, ..Config::default() })
}
