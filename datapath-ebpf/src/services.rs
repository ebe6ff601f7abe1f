//! Services (see `tailgate_abi::services`): a TCP or UDP packet to a service's address and
//! port arriving from the tunnel goes to a backend: its flow's backend when the flow table
//! has one that is still in service, else the one the service's Maglev table names for the
//! flow's hash. Replies from the backend are translated back on their way into the tunnel.
//! Both directions of a flow are recorded together, or the packet is dropped.

use aya_ebpf::bindings::bpf_fib_lookup;
use tailgate_abi::{
    conntrack::{opening, partner_clock, partner_due, proto, tcp_flag, zone, Flow, FlowKey4, FlowKey6, Nat},
    counters::Counter,
    services::{family, flow_hash4, flow_hash6, scope, ServiceKey},
    settings::stage,
};

use crate::{
    conntrack::{live, nat_reply, now, At, Bytes, Key, MAX_TRANSPORT},
    counters::count,
    maps::{settings, Scratch4, Scratch6, BACKENDS, SCRATCH4, SCRATCH6, SERVICES, SERVICE_TABLES},
    parse::{be16, read, Ip, Packet, IPPROTO_TCP, IPPROTO_UDP, L4},
    stage::{Addr, NatRewrite},
};

/// What the service stage does with a packet arriving from the tunnel. (Fieldless: a
/// function of its own returns it, and BTF cannot describe an enum whose tag sits in a
/// payload's niche; the rewrite goes to an out-parameter.)
#[repr(u8)]
pub enum Dnat {
    /// Not addressed to a service.
    None,
    /// To the backend: the rewrite was written.
    To,
    /// Addressed to a service that cannot take it (no backend, or the flow could not be
    /// recorded, so its replies could not be translated back).
    Drop,
}

/// Tunnel or (`uplink`) uplink ingress: the backend a packet to a service goes to.
#[inline(always)]
pub fn dnat(
    packet: &Packet,
    bytes: Bytes,
    (generation, uplink): (u8, bool),
    ifindex: u32,
    out: &mut NatRewrite,
) -> Dnat {
    let Some(l4) = transport(packet, bytes, true) else { return Dnat::None };
    let at = (generation, uplink, ifindex);
    match &packet.ip {
        Ip::V4 { src, dst } => dnat_family::<FlowKey4>(packet, &l4, (src, dst), at, out),
        Ip::V6 { src, dst } => dnat_family::<FlowKey6>(packet, &l4, (src, dst), at, out),
    }
}

/// Tunnel egress: a reply from a backend, translated back to the service's address.
#[inline(always)]
pub fn reverse(packet: &Packet, bytes: Bytes, ifindex: u32, out: &mut NatRewrite) -> bool {
    let Some(l4) = transport(packet, bytes, false) else { return false };
    match &packet.ip {
        Ip::V4 { src, dst } => reverse_family::<FlowKey4>(packet, &l4, (src, dst), ifindex, out),
        Ip::V6 { src, dst } => reverse_family::<FlowKey6>(packet, &l4, (src, dst), ifindex, out),
    }
}

/// What the stage translates: TCP and UDP (a first fragment or whole datagram), and ICMP
/// echo (the ingress proxy: an echo request on the way in, a reply on the way out), whose
/// identifier stands in for both ports.
#[inline(always)]
pub fn transport(packet: &Packet, bytes: Bytes, request: bool) -> Option<L4> {
    if packet.proto == IPPROTO_TCP || packet.proto == IPPROTO_UDP {
        return packet.l4;
    }
    let (echo_request, echo_reply) = match (&packet.ip, packet.proto) {
        (Ip::V4 { .. }, proto::ICMP) => (FlowKey4::ECHO_REQUEST, FlowKey4::ECHO_REPLY),
        (Ip::V6 { .. }, proto::ICMPV6) => (FlowKey6::ECHO_REQUEST, FlowKey6::ECHO_REPLY),
        _ => return None,
    };
    // The mask bounds the offset for the verifier (as in `conntrack::seen`).
    if packet.transport == 0 || packet.transport > MAX_TRANSPORT {
        return None;
    }
    let offset = packet.transport & MAX_TRANSPORT;
    let h = bytes.data + usize::from(offset);
    if h + 8 > bytes.data_end {
        return None;
    }
    let kind = read::<u8>(h);
    if kind != if request { echo_request } else { echo_reply } {
        return None;
    }
    let id = be16(h + 4);
    Some(L4 { offset, sport: id, dport: id, tcp_flags: 0, tcp_len: 0 })
}

#[inline(always)]
fn dnat_family<K: Family>(
    packet: &Packet,
    l4: &L4,
    (src, dst): (&K::Addr, &K::Addr),
    (generation, uplink, ifindex): (u8, bool, u32),
    out: &mut NatRewrite,
) -> Dnat {
    // Addresses by reference, copied only where used: an IPv6 address in locals takes 16
    // registers, spilled a byte per stack slot.
    // SAFETY: this CPU's scratch entry, used by one program run at a time. (Fetched before
    // the service lookup: its key on the stack instead costs the frame 32 bytes it has not.)
    let Some(s) = K::scratch().map(|s| unsafe { &mut *s }) else { return Dnat::None };
    let (proto, flags) = (packet.proto, l4.tcp_flags);
    // The service first: traffic for no service costs this one lookup. (A flow of a service
    // that was removed is not translated any more.)
    s.service = K::service(*dst, l4.dport, proto, generation);
    // SAFETY: map values, read only.
    let mut egress = false;
    let service = match unsafe { SERVICES.get(&s.service) } {
        Some(service) => service,
        // The proxies: every port of an address (port 0 entries). The ingress proxy's (the
        // gateway's tailnet address) first, as its iptables rule comes first; the egress
        // proxy's (any of the gateway's addresses) only for traffic from the LAN side.
        None => {
            let stages = settings(generation).stages;
            s.service.port = 0;
            let ingress =
                if stages & stage::INGRESS_PROXY != 0 { unsafe { SERVICES.get(&s.service) } } else { None };
            match ingress {
                Some(service) => service,
                None if uplink && stages & stage::EGRESS_PROXY != 0 => {
                    s.service.scope = scope::UPLINKS;
                    let Some(service) = (unsafe { SERVICES.get(&s.service) }) else { return Dnat::None };
                    egress = true;
                    service
                }
                None => return Dnat::None,
            }
        }
    };
    s.key = K::of(*src, *dst, l4.sport, l4.dport, proto, At { zone: zone::DNAT, ifindex });
    s.vip = back_to::<K>(*dst, l4.dport);
    let mut rebalanced = false;
    if let Some((flow, now)) = live(&s.key) {
        // SAFETY: a map value; concurrent writers only race on refresh fields.
        let flow = unsafe { &mut *flow };
        if in_service::<K>(&flow.nat, &s.service) {
            flow.seen(proto, flags, now, false);
            s.nat = flow.nat;
            // The reply entry lives as long as the flow does (put back if it was evicted)
            // and follows the client's FIN or RST.
            if partner_due(flow, flags, now) {
                flow.partner_seen = partner_clock(now);
                s.reply = K::of(*src, K::from_nat(&s.nat), l4.sport, s.nat.port, proto, reply_zone(ifindex));
                if let Some(reply) = s.reply.get() {
                    // SAFETY: a map value; concurrent writers only race on refresh fields.
                    let reply = unsafe { &mut *reply };
                    reply.seen(proto, flags, now, false);
                } else {
                    s.reply_flow = Flow {
                        last_seen: now,
                        created: now,
                        state: flow.state,
                        nat: s.vip,
                        ..Flow::default()
                    };
                    if s.reply.insert(&s.reply_flow) {
                        count(Counter::FlowCreated);
                    }
                }
            }
            *out = rewrite::<K>(packet, l4, *dst, &s.nat, false);
            return Dnat::To;
        }
        rebalanced = true;
    }
    // The egress proxy takes connections that open for the gateway: a TCP segment of one
    // that was there before (the gateway's own, one to its own sockets) stays the gateway's,
    // as conntrack keeps it; so do UDP replies to the gateway's own flows out of this uplink
    // (recorded at its egress while the proxy is on).
    if egress {
        if proto == IPPROTO_TCP && flags & (tcp_flag::SYN | tcp_flag::ACK | tcp_flag::RST) != tcp_flag::SYN {
            return Dnat::None;
        }
        if proto == IPPROTO_UDP {
            s.reply = K::of(*dst, *src, l4.dport, l4.sport, proto, At::own(ifindex));
            if let Some((flow, now)) = live(&s.reply) {
                // SAFETY: a map value; concurrent writers only race on refresh fields.
                unsafe { &mut *flow }.seen(proto, flags, now, true);
                return Dnat::None;
            }
        }
    }
    let size = service.size;
    let Some(table) = SERVICE_TABLES.get(service.table) else { return Dnat::Drop };
    if size == 0 {
        return Dnat::Drop;
    }
    let slot = K::hash(src, dst, l4.sport, l4.dport, proto) % size;
    let Some(pair) = table.get(slot / 2) else { return Dnat::Drop };
    let id = pair[(slot & 1) as usize];
    let Some(backend) = BACKENDS.get(id) else { return Dnat::Drop };
    if backend.family != K::FAMILY {
        return Dnat::Drop;
    }
    // Port 0: the packet's own (the ingress proxy keeps ports).
    let port = if backend.port == 0 { l4.dport } else { backend.port };
    s.nat = Nat { addr: backend.addr, port, flags: 0, backend: id };
    count(if rebalanced { Counter::ServiceRebalanced } else { Counter::ServiceBalanced });
    // A packet that cannot open a flow (a SYN-ACK, a RST) is sent on unrecorded.
    if let Some(state) = opening(proto, flags) {
        let now = now();
        s.reply = K::of(*src, K::from_nat(&s.nat), l4.sport, s.nat.port, proto, reply_zone(ifindex));
        s.reply_flow = Flow { last_seen: now, created: now, state, nat: s.vip, ..Flow::default() };
        s.flow = Flow {
            last_seen: now,
            created: now,
            state,
            flags_original: flags,
            nat: s.nat,
            ..Flow::default()
        };
        // The reply entry first: a forward entry is never without it. A live reply entry of
        // another flow with the same translated tuple (two services sending one client port
        // to one backend) is not overwritten: this flow is refused, as conntrack refuses a
        // clashing tuple.
        let mut reply_created = true;
        if !s.reply.insert_new(&s.reply_flow) {
            match live(&s.reply) {
                Some((existing, _)) => {
                    // SAFETY: a map value.
                    let existing = unsafe { &mut *existing };
                    if existing.nat != s.vip {
                        return Dnat::Drop;
                    }
                    // This flow's own entry, outliving its forward entry: renewed.
                    existing.last_seen = now;
                    existing.state = state;
                    reply_created = false;
                }
                // Expired (and deleted by the lookup), or evicted meanwhile.
                None if s.reply.insert(&s.reply_flow) => {}
                None => {
                    count(Counter::FlowCreateFailed);
                    return Dnat::Drop;
                }
            }
        }
        if !s.key.insert(&s.flow) {
            s.reply.remove();
            count(Counter::FlowCreateFailed);
            return Dnat::Drop;
        }
        // Entries created (a rebalanced flow's forward entry was overwritten, not created:
        // `status` derives evictions from these counts).
        if reply_created {
            count(Counter::FlowCreated);
        }
        if !rebalanced {
            count(Counter::FlowCreated);
        }
    }
    *out = rewrite::<K>(packet, l4, *dst, &s.nat, false);
    Dnat::To
}

#[inline(always)]
fn reverse_family<K: Family>(
    packet: &Packet,
    l4: &L4,
    (src, dst): (&K::Addr, &K::Addr),
    ifindex: u32,
    out: &mut NatRewrite,
) -> bool {
    let proto = packet.proto;
    // The reply's tuple reversed is the translated one (client → backend).
    let key = K::of(*dst, *src, l4.dport, l4.sport, proto, reply_zone(ifindex));
    let forward = |vip: &Nat| {
        K::of(*dst, K::from_nat(vip), l4.dport, vip.port, proto, At { zone: zone::DNAT, ifindex })
    };
    let Some(vip) = nat_reply(&key, l4.tcp_flags, forward) else { return false };
    *out = rewrite::<K>(packet, l4, *src, &vip, true);
    true
}

#[inline(always)]
fn reply_zone(ifindex: u32) -> At {
    At { zone: zone::DNAT_REPLY, ifindex }
}

/// The service's address and port, as a reply entry holds them.
#[inline(always)]
fn back_to<K: Family>(vip: K::Addr, port: u16) -> Nat {
    Nat { addr: K::to_nat(vip), port, flags: 0, backend: 0 }
}

/// Whether the backend a flow was sent to still serves its service (its id names the same
/// address, in this service: an id freed and handed out again is another backend's).
#[inline(always)]
fn in_service<K: Family>(nat: &Nat, service: &ServiceKey) -> bool {
    BACKENDS.get(nat.backend).is_some_and(|b| {
        b.family == K::FAMILY
            && (b.port == 0 || b.port == nat.port)
            && b.addr == nat.addr
            && b.service.addr == service.addr
            && b.service.port == service.port
            && b.service.proto == service.proto
            && b.service.scope == service.scope
    })
}

/// The rewrite from `addr:port` (as in the packet; the destination, or with `source` the
/// source) to the flow's translation.
#[inline(always)]
pub fn rewrite<K: Family>(packet: &Packet, l4: &L4, addr: K::Addr, nat: &Nat, source: bool) -> NatRewrite {
    let port = if source { l4.sport } else { l4.dport };
    NatRewrite {
        source,
        l3: packet.l3,
        l4: usize::from(l4.offset),
        proto: packet.proto,
        from: K::addr(addr),
        to: K::addr(K::from_nat(nat)),
        from_port: port,
        to_port: nat.port,
    }
}

/// What the service stage builds of one packet, in a per-CPU map value (`maps::Scratch4`
/// and `Scratch6` have this layout, without the generic parameter BTF cannot name).
#[repr(C)]
pub struct Room<K> {
    pub key: K,
    pub reply: K,
    pub flow: Flow,
    pub reply_flow: Flow,
    pub nat: Nat,
    pub vip: Nat,
    pub service: ServiceKey,
    /// The masquerade's route lookup (`masquerade::Uplink`).
    pub fib: bpf_fib_lookup,
}

/// What the service stage needs of a family besides its flow key.
pub trait Family: Key {
    const FAMILY: u8;
    /// This CPU's room for the keys and entries of one packet: they do not fit the stack.
    fn scratch() -> Option<*mut Room<Self>>;
    fn service(addr: Self::Addr, port: u16, proto: u8, generation: u8) -> ServiceKey;
    fn hash(src: &Self::Addr, dst: &Self::Addr, sport: u16, dport: u16, proto: u8) -> u32;
    fn from_nat(nat: &Nat) -> Self::Addr;
    fn to_nat(addr: Self::Addr) -> [u8; 16];
    fn addr(addr: Self::Addr) -> Addr;
}

impl Family for FlowKey4 {
    const FAMILY: u8 = family::V4;

    #[inline(always)]
    fn scratch() -> Option<*mut Room<Self>> {
        SCRATCH4.get_ptr_mut(0).map(|room: *mut Scratch4| room.cast())
    }

    #[inline(always)]
    fn service(addr: [u8; 4], port: u16, proto: u8, generation: u8) -> ServiceKey {
        ServiceKey {
            addr: Self::to_nat(addr),
            port,
            proto,
            family: family::V4,
            generation,
            scope: scope::ANY,
            pad: [0; 2],
        }
    }

    #[inline(always)]
    fn hash(src: &[u8; 4], dst: &[u8; 4], sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash4(u32::from_be_bytes(*src), u32::from_be_bytes(*dst), sport, dport, proto)
    }

    #[inline(always)]
    fn from_nat(nat: &Nat) -> [u8; 4] {
        [nat.addr[0], nat.addr[1], nat.addr[2], nat.addr[3]]
    }

    #[inline(always)]
    fn to_nat(addr: [u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0] = addr[0];
        out[1] = addr[1];
        out[2] = addr[2];
        out[3] = addr[3];
        out
    }

    #[inline(always)]
    fn addr(addr: [u8; 4]) -> Addr {
        Addr::V4(addr)
    }
}

impl Family for FlowKey6 {
    const FAMILY: u8 = family::V6;

    #[inline(always)]
    fn scratch() -> Option<*mut Room<Self>> {
        SCRATCH6.get_ptr_mut(0).map(|room: *mut Scratch6| room.cast())
    }

    #[inline(always)]
    fn service(addr: [u8; 16], port: u16, proto: u8, generation: u8) -> ServiceKey {
        ServiceKey { addr, port, proto, family: family::V6, generation, scope: scope::ANY, pad: [0; 2] }
    }

    #[inline(always)]
    fn hash(src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash6(words(src), words(dst), sport, dport, proto)
    }

    #[inline(always)]
    fn from_nat(nat: &Nat) -> [u8; 16] {
        nat.addr
    }

    #[inline(always)]
    fn to_nat(addr: [u8; 16]) -> [u8; 16] {
        addr
    }

    #[inline(always)]
    fn addr(addr: [u8; 16]) -> Addr {
        Addr::V6(addr)
    }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_be_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_be_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_be_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_be_bytes([a[12], a[13], a[14], a[15]]),
    ]
}
