//! The BPF egress proxy on crafted packets through BPF_PROG_TEST_RUN (inside a namespace
//! with an uplink `eth0` and a tunnel `tun0`, whose ifindexes the programs key on): a LAN
//! client's packet for the gateway's address goes to the target (uplink ingress), leaves the
//! tunnel from the gateway's tailnet address and a port of `[nat] ports` (tunnel egress);
//! the target's reply comes back to the client (tunnel ingress) from the address it called
//! (uplink egress); checksums checked by etherparse. Replies to the gateway's own
//! connections, tunnel traffic and the target's own connections are left alone; what cannot
//! be translated is dropped.

use std::net::SocketAddr;

use tailgate::backend::bpf::{Datapath, Hook};
use tailgate_abi::{conntrack::proto, counters::Counter, services::flow_hash4};
use tailgate_tests::{
    netns::{veth, Netns},
    packets::*,
    testrun::{self, Skb, TcRun, TCX_NEXT, TC_ACT_SHOT},
    tun::Tun,
};

const CLIENT: &str = "192.0.2.2";
const GW: &str = "192.0.2.1";
const TARGET: &str = "100.101.2.3";
const GW_TAILNET: &str = "100.101.0.1";
const CLIENT6: &str = "2001:db8::2";
const GW6: &str = "2001:db8::1";
const TARGET6: &str = "fd7a:115c:a1e0::3";
const GW_TAILNET6: &str = "fd7a:115c:a1e0::1";
const FIRST: u16 = 61_000;
const SPAN: u32 = 4_536;

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A gateway namespace with its uplink and tunnel, and the datapath with the egress proxy
/// to `target` (the packet tests' system: the gateway's addresses 192.0.2.1, 2001:db8::1;
/// tailnet addresses 100.101.0.1, fd7a:115c:a1e0::1).
struct Gateway {
    _tun: Tun,
    ns: Netns,
    _lan: Netns,
    uplink: u32,
    tunnel: u32,
    dp: Datapath,
}

impl Gateway {
    fn new(target: &str) -> Self {
        let ns = Netns::new("tg-ep").unwrap();
        let lan = Netns::new("tg-epl").unwrap();
        veth(&ns, "eth0", &lan, "eth0").unwrap();
        let tun = Tun::open(&ns, "tun0").unwrap();
        let index = |name: &'static str| ns.enter(move || Ok(nix::net::if_::if_nametoindex(name)?)).unwrap();
        let (uplink, tunnel) = (index("eth0"), index("tun0"));
        let dp = testrun::datapath(&format!("tunnel = \"tun0\"\n[proxy]\negress_to = \"{target}\"")).unwrap();
        Self { _tun: tun, ns, _lan: lan, uplink, tunnel, dp }
    }

    fn run(&mut self, hook: Hook, frame: &[u8], skb: Skb) -> TcRun {
        let dp = &mut self.dp;
        self.ns.enter(|| testrun::run_tc(dp, hook, frame, skb)).unwrap()
    }

    /// Arrives by the uplink (services' DNAT).
    fn uplink_in(&mut self, frame: &[u8]) -> TcRun {
        let skb = Skb { ifindex: self.uplink, ..Skb::default() };
        self.run(Hook::ServiceUplinkIn, frame, skb)
    }

    /// Forwarded from the uplink out of the tunnel (the proxy's SNAT).
    fn tunnel_out(&mut self, frame: &[u8]) -> TcRun {
        let skb = Skb { ingress_ifindex: self.uplink, ifindex: self.tunnel, ..Skb::default() };
        self.run(Hook::ProxyOut, frame, skb)
    }

    /// Arrives by the tunnel (replies back, services' DNAT).
    fn tunnel_in(&mut self, frame: &[u8]) -> TcRun {
        let skb = Skb { ifindex: self.tunnel, ..Skb::default() };
        self.run(Hook::ServiceIn, frame, skb)
    }

    /// Forwarded out of the uplink (services' reverse NAT).
    fn uplink_out(&mut self, frame: &[u8]) -> TcRun {
        let skb = Skb { ingress_ifindex: self.tunnel, ifindex: self.uplink, ..Skb::default() };
        self.run(Hook::ServiceUplinkOut, frame, skb)
    }

    /// The four steps of a proxied packet and its reply: what the target sees, what the
    /// client gets back (the reply built from what the target saw by `reply`).
    fn round_trip(
        &mut self,
        request: &[u8],
        reply: impl Fn(&Transport) -> Vec<u8>,
    ) -> (Transport, Transport) {
        let to_target = passed(self.uplink_in(request));
        let seen = passed(self.tunnel_out(&to_target));
        let back = passed(self.tunnel_in(&reply(&transport(&seen).unwrap())));
        let answer = passed(self.uplink_out(&back));
        (transport(&seen).unwrap(), transport(&answer).unwrap())
    }

    fn counted(&mut self, f: impl FnOnce(&mut Self)) -> Vec<(Counter, u64)> {
        let before = testrun::counters(&self.dp).unwrap();
        f(self);
        testrun::changes(&before, &testrun::counters(&self.dp).unwrap())
    }
}

/// The frame of a run that passed the packet on.
fn passed(run: TcRun) -> Vec<u8> {
    assert_eq!(run.verdict, TCX_NEXT, "passed on");
    run.frame
}

/// The port a flow from a client port outside the range gets first.
fn hashed_port(src: &str, dst: &str, sport: u16, dport: u16, proto: u8) -> u16 {
    let (s, d) = (src.parse::<std::net::Ipv4Addr>().unwrap(), dst.parse::<std::net::Ipv4Addr>().unwrap());
    FIRST + (flow_hash4(u32::from(s), u32::from(d), sport, dport, proto) % SPAN) as u16
}

#[test]
fn a_lan_client_reaches_the_target_from_the_gateways_tailnet_address_and_back() {
    let mut gw = Gateway::new(TARGET);
    let port = hashed_port(CLIENT, TARGET, 40_000, 5432, proto::TCP);
    let counted = gw.counted(|gw| {
        let (seen, answer) = gw.round_trip(&tcp(CLIENT, GW, 40_000, 5432, Tcp::Syn), |seen| {
            tcp(TARGET, GW_TAILNET, 5432, seen.src.port(), Tcp::SynAck)
        });
        assert_eq!((seen.src, seen.dst), (sa(GW_TAILNET, port), sa(TARGET, 5432)));
        assert_eq!((answer.src, answer.dst), (sa(GW, 5432), sa(CLIENT, 40_000)));
        assert!(seen.checksums_ok && answer.checksums_ok, "{seen:?} {answer:?}");
    });
    for expected in [
        (Counter::ServiceDnat, 1),
        (Counter::ServiceBalanced, 1),
        (Counter::EgressProxyNew, 1),
        (Counter::EgressProxied, 1),
        (Counter::EgressProxyReplies, 1),
        (Counter::ServiceReverseNat, 1),
    ] {
        assert!(counted.contains(&expected), "{expected:?} in {counted:?}");
    }
    // The flow keeps its translation; nothing new.
    let counted = gw.counted(|gw| {
        let (seen, _) = gw.round_trip(&tcp(CLIENT, GW, 40_000, 5432, Tcp::Data), |seen| {
            tcp(TARGET, GW_TAILNET, 5432, seen.src.port(), Tcp::Data)
        });
        assert_eq!(seen.src, sa(GW_TAILNET, port));
    });
    assert!(!counted.iter().any(|(c, _)| matches!(c, Counter::EgressProxyNew | Counter::ServiceBalanced)));

    // UDP without a checksum: 0 stays 0 all the way; a ping's identifier is translated too.
    let (seen, answer) = gw.round_trip(&without_udp_checksum(udp(CLIENT, GW, 40_001, 53)), |seen| {
        without_udp_checksum(udp(TARGET, GW_TAILNET, 53, seen.src.port()))
    });
    assert_eq!((seen.src.ip(), seen.no_udp_checksum), (GW_TAILNET.parse().unwrap(), true));
    assert_eq!((answer.src, answer.dst, answer.no_udp_checksum), (sa(GW, 53), sa(CLIENT, 40_001), true));
    let to_target = passed(gw.uplink_in(&echo(CLIENT, GW, 7, false)));
    let seen = passed(gw.tunnel_out(&to_target));
    let (src, dst, _) = ip_summary(&seen[14..]).unwrap();
    assert_eq!((src.to_string(), dst.to_string()), (GW_TAILNET.to_string(), TARGET.to_string()));
}

#[test]
fn an_ipv6_target() {
    let mut gw = Gateway::new(TARGET6);
    let (seen, answer) = gw.round_trip(&tcp(CLIENT6, GW6, 40_000, 443, Tcp::Syn), |seen| {
        tcp(TARGET6, GW_TAILNET6, 443, seen.src.port(), Tcp::SynAck)
    });
    assert_eq!((seen.src.ip(), seen.dst), (GW_TAILNET6.parse().unwrap(), sa(TARGET6, 443)));
    assert!((FIRST..=u16::MAX).contains(&seen.src.port()));
    assert_eq!((answer.src, answer.dst), (sa(GW6, 443), sa(CLIENT6, 40_000)));
    assert!(seen.checksums_ok && answer.checksums_ok);
    // IPv4 for the gateway is not the proxy's.
    let frame = tcp(CLIENT, GW, 40_000, 22, Tcp::Syn);
    assert_eq!(passed(gw.uplink_in(&frame)), frame);
}

#[test]
fn replies_to_the_gateways_own_connections_and_tunnel_traffic_are_left_alone() {
    let mut gw = Gateway::new(TARGET);
    // The gateway's own UDP flow out of the uplink, recorded on its way out: its answers
    // stay the gateway's; without it the same datagram is the proxy's.
    let skb = Skb { ifindex: gw.uplink, ..Skb::default() };
    assert_eq!(gw.run(Hook::UplinkEgress, &udp(GW, CLIENT, 45_001, 53), skb).verdict, TCX_NEXT);
    let answer = udp(CLIENT, GW, 53, 45_001);
    assert_eq!(passed(gw.uplink_in(&answer)), answer, "an answer to the gateway's own flow");
    let stray = udp(CLIENT, GW, 53, 45_002);
    assert_ne!(passed(gw.uplink_in(&stray)), stray);
    // TCP: only a SYN opens a proxied connection; a segment of one that was there before
    // the proxy (the gateway's own, one to its own sockets) is the gateway's.
    for segment in [Tcp::SynAck, Tcp::Data, Tcp::Rst] {
        let frame = tcp(CLIENT, GW, 80, 45_000, segment);
        assert_eq!(passed(gw.uplink_in(&frame)), frame, "{segment:?}");
    }
    // From the tunnel, the gateway's LAN address is the gateway's (`! -i TUN`).
    let frame = tcp(TARGET, GW, 40_000, 22, Tcp::Syn);
    assert_eq!(passed(gw.tunnel_in(&frame)), frame);
    // Forwarded traffic (not for the gateway) is not the proxy's.
    let frame = tcp(CLIENT, "100.101.2.4", 40_000, 22, Tcp::Syn);
    assert_eq!(passed(gw.uplink_in(&frame)), frame);
}

#[test]
fn the_targets_own_connections_pass_and_what_cannot_be_translated_is_dropped() {
    let mut gw = Gateway::new(TARGET);
    // The target opens a connection through the gateway (recorded out of the tunnel); the
    // LAN host's answer goes back to it untranslated.
    let skb = Skb { ifindex: gw.tunnel, ..Skb::default() };
    gw.run(Hook::TcIngress, &tcp(TARGET, CLIENT, 40_100, 80, Tcp::Syn), skb);
    let answer = tcp(CLIENT, TARGET, 80, 40_100, Tcp::SynAck);
    assert_eq!(passed(gw.tunnel_out(&answer)), answer);
    // A SYN-ACK to the target that answers nothing opens nothing: dropped, not sent with
    // the LAN host's source.
    let counted = gw.counted(|gw| {
        assert_eq!(gw.tunnel_out(&tcp(CLIENT, TARGET, 80, 40_101, Tcp::SynAck)).verdict, TC_ACT_SHOT);
    });
    assert!(counted.contains(&(Counter::EgressProxyDrop, 1)), "{counted:?}");
    // The gateway's own packets to the target (its tailnet source already): untouched.
    let own = tcp(GW_TAILNET, TARGET, 45_000, 5432, Tcp::Syn);
    let skb = Skb { ifindex: gw.tunnel, ..Skb::default() };
    let run = gw.run(Hook::ProxyOut, &own, skb);
    assert_eq!((run.verdict, &run.frame), (TCX_NEXT, &own));
    // Forwarded elsewhere than the target: untouched.
    let other = tcp(CLIENT, "100.101.2.4", 40_000, 22, Tcp::Syn);
    assert_eq!(passed(gw.tunnel_out(&other)), other);
}

/// ICMP errors about a proxied packet (the target's port unreachable, a router's "packet
/// too big" on the way) reach the client as errors about the packet it sent: the quote and
/// the error's destination back to the client at the tunnel's ingress, the quote's
/// destination (and the source of an error the target sent) back to the gateway's address
/// at the uplink's egress; checksums right at every step.
#[test]
fn icmp_errors_about_a_proxied_packet_reach_the_client() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    for (client, gw_ip, target, tailnet, router, len) in [
        (CLIENT, GW, TARGET, GW_TAILNET, None, 8),
        (CLIENT6, GW6, TARGET6, GW_TAILNET6, Some("fd7a:115c:a1e0::fe"), 20),
    ] {
        let mut gw = Gateway::new(target);
        let sent = if router.is_some() {
            tcp(client, gw_ip, 40_000, 443, Tcp::Syn)
        } else {
            udp(client, gw_ip, 40_000, 53)
        };
        let to_target = passed(gw.uplink_in(&sent));
        let seen = passed(gw.tunnel_out(&to_target));
        let from = router.unwrap_or(target);
        let error = icmp_error_quoting(from, tailnet, &quote_of(&seen, len), router.is_some());
        let counted = gw.counted(|gw| {
            let back = passed(gw.tunnel_in(&error));
            let got = icmp_error(&back).unwrap();
            assert_eq!((got.src, got.dst), (ip(from), ip(client)), "to the client");
            assert!(got.checksum_ok, "{got:?}");
            assert_eq!(got.quote, quote_of(&to_target, len), "about the packet as it left the uplink");
            let out = passed(gw.uplink_out(&back));
            let got = icmp_error(&out).unwrap();
            // The target's own error comes from the address the client called.
            let source = if router.is_some() { from } else { gw_ip };
            assert_eq!((got.src, got.dst), (ip(source), ip(client)));
            assert!(got.checksum_ok, "{got:?}");
            assert_eq!(got.quote, quote_of(&sent, len), "about the packet the client sent");
        });
        assert!(counted.contains(&(Counter::EgressProxyReplies, 1)), "{counted:?}");
        assert!(counted.contains(&(Counter::ServiceIcmpTranslated, 1)), "{counted:?}");
    }
}
