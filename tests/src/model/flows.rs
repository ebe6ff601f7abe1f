//! The flow table as the README and the conntrack notes state it: an owning path records a
//! flow by its tuple (zone and device included); a reply path asks whether the packet's
//! reversed tuple is a live flow, or whether an ICMP error quotes one; later fragments pass
//! when their datagram's first fragment answered a flow. TCP states as conntrack's, kernel
//! default timeouts; an expired entry found is deleted.

use std::{collections::HashMap, net::IpAddr};

use tailgate_abi::{
    conntrack::{FlowKey4, FlowKey6},
    counters::Counter,
};

use super::packet::{Ip, ICMP, ICMPV6, TCP, UDP};

/// A flow's key, either family (the ABI's key types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    V4(FlowKey4),
    V6(FlowKey6),
}

pub const NEW: u8 = 1;
pub const ESTABLISHED: u8 = 2;
pub const CLOSING: u8 = 3;
pub const CLOSED: u8 = 4;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const S: u64 = 1_000_000_000;

/// What the model keeps of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub state: u8,
    pub flags_original: u8,
    pub flags_reply: u8,
    pub last_seen: u64,
}

/// The flow tables and the fragment tables.
#[derive(Debug, Clone, Default)]
pub struct Flows {
    pub flows: HashMap<Key, Entry>,
    /// Datagrams whose first fragment answered a flow: when.
    pub fragments: HashMap<Key, u64>,
}

/// Where flows are keyed.
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub zone: u8,
    pub ifindex: u32,
}

impl Key {
    pub fn new(src: IpAddr, dst: IpAddr, (sport, dport): (u16, u16), proto: u8, at: At) -> Key {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                Key::V4(FlowKey4::new(s.octets(), d.octets(), (sport, dport), proto, at.zone, at.ifindex))
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                Key::V6(FlowKey6::new(s.octets(), d.octets(), (sport, dport), proto, at.zone, at.ifindex))
            }
            _ => unreachable!("one family per packet"),
        }
    }

    pub fn reversed(self) -> Key {
        match self {
            Key::V4(k) => Key::V4(FlowKey4 { src: k.dst, dst: k.src, sport: k.dport, dport: k.sport, ..k }),
            Key::V6(k) => Key::V6(FlowKey6 { src: k.dst, dst: k.src, sport: k.dport, dport: k.sport, ..k }),
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            Key::V4(k) => k.proto,
            Key::V6(k) => k.proto,
        }
    }
}

/// How long an entry of `proto` in `state` lives without packets (the kernel's conntrack
/// defaults).
pub fn timeout(proto: u8, state: u8) -> u64 {
    match proto {
        TCP => match state {
            ESTABLISHED => 5 * 24 * 3600 * S,
            CLOSED => 10 * S,
            _ => 120 * S,
        },
        UDP if state == ESTABLISHED => 120 * S,
        UDP | ICMP | ICMPV6 => 30 * S,
        _ => 600 * S,
    }
}

/// The state a packet with `flags` opens a flow in, if it can open one: any packet but TCP;
/// for TCP a SYN, or (picked up mid-stream) an ACK — a FIN with it: closing.
fn opening(proto: u8, flags: u8) -> Option<u8> {
    if proto != TCP {
        return Some(NEW);
    }
    let syn = flags & SYN != 0;
    let ack = flags & ACK != 0;
    match (flags & RST != 0, syn, ack) {
        (true, _, _) => None,
        (false, true, false) => Some(NEW),
        (false, false, true) if flags & FIN != 0 => Some(CLOSING),
        (false, false, true) => Some(ESTABLISHED),
        _ => None,
    }
}

/// The state after a packet: non-TCP flows are established once answered; TCP closes on a
/// RST, starts over with a new SYN from the client after a close, is closing after a FIN,
/// established once answered (or once the client ACKs mid-stream).
fn next(proto: u8, state: u8, flags: u8, reply: bool) -> u8 {
    if proto != TCP {
        return if reply { ESTABLISHED } else { state };
    }
    let bare_syn = flags & SYN != 0 && flags & ACK == 0;
    let bare_ack = flags & ACK != 0 && flags & SYN == 0;
    if flags & RST != 0 {
        CLOSED
    } else if !reply && bare_syn && (state == CLOSING || state == CLOSED) {
        NEW
    } else if state == CLOSED {
        CLOSED
    } else if flags & FIN != 0 {
        CLOSING
    } else if state == NEW && (reply || bare_ack) {
        ESTABLISHED
    } else {
        state
    }
}

/// What a packet is to the table.
#[derive(Debug, Clone, Copy)]
pub enum Seen {
    Flow {
        key: Key,
        flags: u8,
        opens: bool,
        answers: bool,
    },
    /// An ICMP error about the flow of this key.
    Error(Key),
    Untracked,
}

/// ICMP types of each family.
const ECHO: [(u8, u8); 2] = [(8, 0), (128, 129)];
const ERRORS_V4: [u8; 5] = [3, 4, 5, 11, 12];
const ERRORS_V6: [u8; 4] = [1, 2, 3, 4];
/// Transport headers further in than this are not read.
const FURTHEST: usize = 0x3ff;

/// How the table sees `p` (in frame `f`) at `at`.
pub fn seen(p: &Ip, f: &[u8], at: At) -> Seen {
    if let Some(ports) = p.ports {
        let flags = if p.proto == TCP { ports.flags } else { 0 };
        let key = Key::new(p.src, p.dst, (ports.sport, ports.dport), p.proto, at);
        return Seen::Flow { key, flags, opens: true, answers: true };
    }
    if p.proto == TCP || p.proto == UDP {
        return Seen::Untracked;
    }
    if p.proto != p.icmp() {
        let key = Key::new(p.src, p.dst, (0, 0), p.proto, at);
        return Seen::Flow { key, flags: 0, opens: true, answers: true };
    }
    let Some(h) = p.transport.filter(|&t| t <= FURTHEST && f.len() >= t + 8) else { return Seen::Untracked };
    let (request, reply) = ECHO[usize::from(p.v6())];
    let kind = f[h];
    if kind == request || kind == reply {
        let id = u16::from_be_bytes([f[h + 4], f[h + 5]]);
        let key = Key::new(p.src, p.dst, (id, id), p.proto, at);
        return Seen::Flow { key, flags: 0, opens: kind == request, answers: kind == reply };
    }
    let error = if p.v6() { ERRORS_V6.contains(&kind) } else { ERRORS_V4.contains(&kind) };
    match quoted(p, f, h + 8, at).filter(|_| error) {
        Some(key) => Seen::Error(key),
        None => Seen::Untracked,
    }
}

/// The key of the packet an ICMP error quotes from `inner` on: sent by the error's receiver,
/// not a later fragment, its ports (or echo request id) within the frame.
fn quoted(p: &Ip, f: &[u8], inner: usize, at: At) -> Option<Key> {
    let u16_at = |i: usize| u16::from_be_bytes([f[i], f[i + 1]]);
    let (src, dst, proto, l4) = if p.v6() {
        if f.len() < inner + 40 || f[inner] >> 4 != 6 {
            return None;
        }
        let addr = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&f[i..i + 16]).unwrap());
        let (mut proto, mut l4) = (f[inner + 6], inner + 40);
        if proto == 44 {
            if f.len() < l4 + 8 || u16_at(l4 + 2) & 0xfff8 != 0 {
                return None;
            }
            proto = f[l4];
            l4 += 8;
        }
        (addr(inner + 8), addr(inner + 24), proto, l4)
    } else {
        if f.len() < inner + 20 {
            return None;
        }
        let ihl = usize::from(f[inner] & 0xf) * 4;
        if f[inner] >> 4 != 4 || ihl < 20 || u16_at(inner + 6) & 0x1fff != 0 {
            return None;
        }
        let addr = |i: usize| IpAddr::from(<[u8; 4]>::try_from(&f[i..i + 4]).unwrap());
        (addr(inner + 12), addr(inner + 16), f[inner + 9], inner + ihl)
    };
    if src != p.dst || f.len() < l4 + 8 {
        return None;
    }
    let ports = match proto {
        TCP | UDP => (u16_at(l4), u16_at(l4 + 2)),
        x if x == p.icmp() && f[l4] == ECHO[usize::from(p.v6())].0 => (u16_at(l4 + 4), u16_at(l4 + 4)),
        _ => return None,
    };
    Some(Key::new(src, dst, ports, proto, at))
}

impl Flows {
    /// The live entry of `key`; an expired one is deleted.
    fn live(&mut self, key: &Key, now: u64, counted: &mut Vec<Counter>) -> Option<&mut Entry> {
        counted.push(Counter::FlowLookups);
        let entry = self.flows.get(key)?;
        if now.saturating_sub(entry.last_seen) > timeout(key.proto(), entry.state) {
            self.flows.remove(key);
            counted.push(Counter::FlowExpired);
            return None;
        }
        self.flows.get_mut(key)
    }

    /// An owning path: creates the packet's flow or refreshes it.
    pub fn record(&mut self, seen: Seen, now: u64, counted: &mut Vec<Counter>) {
        let Seen::Flow { key, flags, opens: true, .. } = seen else { return };
        if let Some(entry) = self.live(&key, now, counted) {
            entry.last_seen = now;
            entry.flags_original |= flags;
            entry.state = next(key.proto(), entry.state, flags, false);
            return;
        }
        let Some(state) = opening(key.proto(), flags) else { return };
        self.flows.insert(key, Entry { state, flags_original: flags, flags_reply: 0, last_seen: now });
        counted.push(Counter::FlowCreated);
    }

    /// A reply path: whether `p` answers a live flow recorded at `at` (refreshing it), is an
    /// ICMP error about one, or is a later fragment of a datagram that did.
    pub fn reply(&mut self, p: &Ip, f: &[u8], at: At, now: u64, counted: &mut Vec<Counter>) -> bool {
        let id = p.fragment_id;
        let datagram = Key::new(p.src, p.dst, ((id >> 16) as u16, id as u16), p.proto, at);
        if p.fragment && p.transport.is_none() {
            counted.push(Counter::FlowLookups);
            return self.fragments.get(&datagram).is_some_and(|&t| now.saturating_sub(t) <= 30 * S);
        }
        let answers = match seen(p, f, at) {
            Seen::Flow { key, flags, answers: true, .. } => {
                let key = key.reversed();
                match self.live(&key, now, counted) {
                    Some(entry) => {
                        entry.last_seen = now;
                        entry.flags_reply |= flags;
                        entry.state = next(key.proto(), entry.state, flags, true);
                        true
                    }
                    None => false,
                }
            }
            Seen::Error(key) => self.live(&key, now, counted).is_some(),
            _ => false,
        };
        if answers && p.fragment {
            self.fragments.insert(datagram, now);
        }
        answers
    }

    /// Whether any entry, live or not, has `key` (no lookup counted: a presence check).
    pub fn holds(&self, key: &Key) -> bool {
        self.flows.contains_key(key)
    }
}
