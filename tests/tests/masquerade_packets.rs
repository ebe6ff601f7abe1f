//! The BPF masquerade on crafted packets through BPF_PROG_TEST_RUN, run inside a namespace
//! whose uplink (`eth0`: 192.0.2.1/24, 2001:db8::1/64) the route lookup picks the address
//! from: a marked packet from the tunnel gets the uplink's address and a port of the range
//! (the client's own where it is in the range and free, else one from the flow's hash), its
//! replies go back to the client, checksums (TCP, UDP, UDP without checksum, IPv6) checked
//! by etherparse; what cannot be masqueraded is dropped; unmarked and local traffic passes
//! untouched.

use std::net::SocketAddr;

use tailgate::backend::bpf::{Datapath, Hook};
use tailgate_abi::{conntrack::proto, counters::Counter, services::flow_hash4};
use tailgate_tests::{
    netns::{veth, Netns},
    packets::*,
    testrun::{self, Skb, TcRun, TCX_NEXT, TC_ACT_SHOT},
};

const CLIENT: &str = "100.101.2.3";
const OTHER: &str = "100.101.2.4";
const CLIENT6: &str = "fd7a:115c:a1e0::3";
const SERVER: &str = "192.0.2.2";
const SERVER6: &str = "2001:db8::2";
const UPLINK: &str = "192.0.2.1";
const UPLINK6: &str = "2001:db8::1";
const MARK: u32 = 0x40000;
/// The tunnel's ifindex as the packets' ingress (any device but the uplink).
const FROM_TUNNEL: u32 = 7;
const FIRST: u16 = 61_000;
const SPAN: u32 = 4_536;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A gateway namespace with its uplink, and the datapath (default config: masquerade on).
struct Gateway {
    ns: Netns,
    _lan: Netns,
    uplink: u32,
    dp: Datapath,
}

impl Gateway {
    fn new() -> Self {
        let ns = Netns::new("tg-mq").unwrap();
        let lan = Netns::new("tg-mql").unwrap();
        veth(&ns, "eth0", &lan, "eth0").unwrap();
        ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"]).unwrap();
        ns.ip(&["addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad"]).unwrap();
        // The route lookup answers only where forwarding is on (as on a gateway).
        ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
        ns.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
        let uplink = ns.enter(|| Ok(nix::net::if_::if_nametoindex("eth0")?)).unwrap();
        let dp = testrun::datapath("tunnel = \"tun0\"").unwrap();
        Self { ns, _lan: lan, uplink, dp }
    }

    fn run(&mut self, hook: Hook, frame: &[u8], skb: Skb) -> TcRun {
        let dp = &mut self.dp;
        self.ns.enter(|| testrun::run_tc(dp, hook, frame, skb)).unwrap()
    }

    /// Out of the uplink, from the tunnel with the subnet-route mark.
    fn out(&mut self, frame: &[u8]) -> TcRun {
        let skb = Skb { mark: MARK, ingress_ifindex: FROM_TUNNEL, ifindex: self.uplink };
        self.run(Hook::MasqueradeOut, frame, skb)
    }

    /// Into the uplink.
    fn back(&mut self, frame: &[u8]) -> Transport {
        let skb = Skb { ifindex: self.uplink, ..Skb::default() };
        let run = self.run(Hook::MasqueradeIn, frame, skb);
        assert_eq!(run.verdict, TCX_NEXT);
        transport(&run.frame).unwrap()
    }

    fn masquerade(&mut self, frame: &[u8]) -> Transport {
        let run = self.out(frame);
        assert_eq!(run.verdict, TCX_NEXT, "passed on");
        transport(&run.frame).unwrap()
    }

    fn counted(&mut self, f: impl FnOnce(&mut Self)) -> Vec<(Counter, u64)> {
        let before = testrun::counters(&self.dp).unwrap();
        f(self);
        testrun::changes(&before, &testrun::counters(&self.dp).unwrap())
    }
}

/// The port a flow from a client port outside the range gets first.
fn hashed_port(src: &str, dst: &str, sport: u16, dport: u16, proto: u8) -> u16 {
    let (s, d) = (src.parse::<std::net::Ipv4Addr>().unwrap(), dst.parse::<std::net::Ipv4Addr>().unwrap());
    FIRST + (flow_hash4(u32::from(s), u32::from(d), sport, dport, proto) % SPAN) as u16
}

#[test]
fn a_new_flow_gets_the_uplinks_address_and_a_port_and_its_replies_go_back() {
    let mut gw = Gateway::new();
    let port = hashed_port(CLIENT, SERVER, 40_000, 80, proto::TCP);
    let counted = gw.counted(|gw| {
        let out = gw.masquerade(&tcp(CLIENT, SERVER, 40_000, 80, Tcp::Syn));
        assert_eq!((out.src, out.dst), (SocketAddr::new(UPLINK.parse().unwrap(), port), sa("192.0.2.2:80")));
        assert!(out.checksums_ok, "{out:?}");
    });
    assert!(counted.contains(&(Counter::MasqueradeNew, 1)) && counted.contains(&(Counter::Masqueraded, 1)));
    assert!(counted.contains(&(Counter::FlowCreated, 2)), "both directions recorded: {counted:?}");
    let back = gw.back(&tcp(SERVER, UPLINK, 80, port, Tcp::SynAck));
    assert_eq!((back.src, back.dst), (sa("192.0.2.2:80"), sa("100.101.2.3:40000")));
    assert!(back.checksums_ok);
    // The flow keeps its port; no new flow.
    let counted = gw.counted(|gw| {
        let out = gw.masquerade(&tcp(CLIENT, SERVER, 40_000, 80, Tcp::Data));
        assert_eq!(out.src.port(), port);
    });
    assert!(!counted.iter().any(|(c, _)| *c == Counter::MasqueradeNew), "{counted:?}");

    // UDP, with and without a checksum (0 stays 0).
    let port = hashed_port(CLIENT, SERVER, 40_001, 53, proto::UDP);
    let out = gw.masquerade(&udp(CLIENT, SERVER, 40_001, 53));
    assert_eq!((out.src.port(), out.checksums_ok), (port, true));
    let out = gw.masquerade(&without_udp_checksum(udp(CLIENT, SERVER, 40_002, 53)));
    assert!(out.no_udp_checksum && out.src.ip().to_string() == UPLINK);
    let back = gw.back(&without_udp_checksum(udp(SERVER, UPLINK, 53, out.src.port())));
    assert_eq!((back.dst, back.no_udp_checksum), (sa("100.101.2.3:40002"), true));

    // IPv6: the uplink's global address.
    let out = gw.masquerade(&tcp(CLIENT6, SERVER6, 40_003, 443, Tcp::Syn));
    assert_eq!(out.src.ip().to_string(), UPLINK6);
    assert!((FIRST..=u16::MAX).contains(&out.src.port()) && out.checksums_ok, "{out:?}");
    let back = gw.back(&tcp(SERVER6, UPLINK6, 443, out.src.port(), Tcp::SynAck));
    assert_eq!((back.dst, back.checksums_ok), (sa("[fd7a:115c:a1e0::3]:40003"), true));
}

#[test]
fn a_client_port_in_the_range_is_kept_unless_another_flow_has_it() {
    let mut gw = Gateway::new();
    let first = gw.masquerade(&udp(CLIENT, SERVER, 62_000, 9000));
    assert_eq!(first.src.port(), 62_000, "kept");
    // Another client, same port, same server: the port is taken, the next try is 1009 on.
    let second = gw.masquerade(&udp(OTHER, SERVER, 62_000, 9000));
    assert_eq!(second.src.port(), 62_000 + 1_009);
    // Each reply reaches its own client.
    assert_eq!(gw.back(&udp(SERVER, UPLINK, 9000, 62_000)).dst, sa("100.101.2.3:62000"));
    assert_eq!(gw.back(&udp(SERVER, UPLINK, 9000, 63_009)).dst, sa("100.101.2.4:62000"));
    // To another server the same client port is free again.
    assert_eq!(gw.masquerade(&udp(OTHER, SERVER, 62_000, 9001)).src.port(), 62_000);
}

#[test]
fn what_cannot_be_masqueraded_is_dropped_and_other_traffic_passes_untouched() {
    let mut gw = Gateway::new();
    // A SYN-ACK from the tunnel opens nothing, and answers no connection from the LAN.
    let counted = gw.counted(|gw| {
        assert_eq!(gw.out(&tcp(CLIENT, SERVER, 40_000, 80, Tcp::SynAck)).verdict, TC_ACT_SHOT);
    });
    assert!(counted.contains(&(Counter::MasqueradeDrop, 1)), "{counted:?}");
    // Unmarked (forwarded from elsewhere), or the host's own: not the masquerade's.
    let syn = tcp(CLIENT, SERVER, 40_000, 80, Tcp::Syn);
    let uplink = gw.uplink;
    for skb in [
        Skb { mark: 0, ingress_ifindex: FROM_TUNNEL, ifindex: uplink },
        Skb { mark: 0x80000, ingress_ifindex: FROM_TUNNEL, ifindex: uplink },
        Skb { mark: MARK, ingress_ifindex: 0, ifindex: uplink },
    ] {
        let run = gw.run(Hook::MasqueradeOut, &syn, skb);
        assert_eq!((run.verdict, &run.frame), (TCX_NEXT, &syn), "{skb:?}");
    }
    // Into the uplink: only ports of the range are looked at; unknown ones pass as they are.
    for frame in [tcp(SERVER, UPLINK, 80, 40_000, Tcp::SynAck), tcp(SERVER, UPLINK, 80, 62_000, Tcp::SynAck)]
    {
        let skb = Skb { ifindex: uplink, ..Skb::default() };
        let run = gw.run(Hook::MasqueradeIn, &frame, skb);
        assert_eq!((run.verdict, &run.frame), (TCX_NEXT, &frame));
    }
}

/// An ICMP error from the LAN side about a masqueraded packet (the server's port
/// unreachable, a router's "packet too big") goes to the client as an error about the
/// packet it sent: the quote's source and the error's destination back, checksums right.
#[test]
fn icmp_errors_about_a_masqueraded_packet_go_back_to_the_client() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let mut gw = Gateway::new();
    for (client, server, uplink, from, len) in
        [(CLIENT, SERVER, UPLINK, SERVER, 8), (CLIENT6, SERVER6, UPLINK6, "2001:db8::fe", 20)]
    {
        let sent = if len == 8 {
            udp(client, server, 40_000, 53)
        } else {
            tcp(client, server, 40_000, 443, Tcp::Syn)
        };
        let out = gw.out(&sent);
        assert_eq!(out.verdict, TCX_NEXT);
        let error = icmp_error_quoting(from, uplink, &quote_of(&out.frame, len), len == 20);
        let skb = Skb { ifindex: gw.uplink, ..Skb::default() };
        let counted = gw.counted(|gw| {
            let run = gw.run(Hook::MasqueradeIn, &error, skb);
            assert_eq!(run.verdict, TCX_NEXT);
            let got = icmp_error(&run.frame).unwrap();
            assert_eq!((got.src, got.dst), (ip(from), ip(client)));
            assert!(got.checksum_ok, "{got:?}");
            assert_eq!(got.quote, quote_of(&sent, len), "about the packet the client sent");
        });
        assert_eq!(counted, [(Counter::FlowLookups, 1), (Counter::Unmasqueraded, 1)], "{counted:?}");
    }
    // An error about the host's own packet: untouched.
    let own = udp(UPLINK, SERVER, 62_500, 53);
    let error = icmp_error_quoting(SERVER, UPLINK, &quote_of(&own, 8), false);
    let skb = Skb { ifindex: gw.uplink, ..Skb::default() };
    let run = gw.run(Hook::MasqueradeIn, &error, skb);
    assert_eq!((run.verdict, &run.frame), (TCX_NEXT, &error));
}
