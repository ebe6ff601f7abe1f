//! The egress proxy end to end, on both backends (the BPF backend's DNAT on the uplink and
//! SNAT at the tunnel, the iptables backend's reference rules): a LAN client that connects
//! to the gateway reaches the tailnet target, which sees the gateway's tailnet address
//! (TCP, UDP, ping; IPv4 and IPv6); the gateway's own connections, what it forwards, and the
//! target's own connections through the gateway are left alone; new addresses of the
//! gateway are followed.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    time::Duration,
};

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tailgate_tests::{
    daemon::{self, Daemon},
    netns::Netns,
    on_both_backends,
    tailnet::{
        config, tcp_echo, tcp_via, udp_echo, udp_via, Tailnet, GW_LAN, GW_LAN6, LAN, LAN6, PEER, PEER6,
    },
    wait,
};

/// The gateway's tailnet addresses (tun0's in the topology).
const GW_TAILNET: &str = "100.101.0.1";
const GW_TAILNET6: &str = "fd7a:115c:a1e0::1";
/// The BPF engine's default ports (`[nat] ports`).
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;
/// A second tailnet peer behind the relay (not the target).
const OTHER: &str = "100.101.2.4";

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn proxy_to(backend: &str, target: &str) -> String {
    config(backend, &format!("[proxy]\negress_to = \"{target}\"\n"))
}

on_both_backends!(
    lan_clients_reach_the_target_from_the_gateways_tailnet_address,
    lan_clients_reach_an_ipv6_target,
    the_gateways_own_and_forwarded_traffic_is_not_proxied,
    the_target_still_reaches_the_lan_through_the_gateway,
    a_proxy_turned_on_by_a_reload_leaves_masqueraded_replies_alone,
    connections_open_before_the_proxy_stay_the_gateways,
    the_targets_port_unreachable_reaches_the_client,
    a_new_address_of_the_gateway_is_proxied_too,
);

fn lan_clients_reach_the_target_from_the_gateways_tailnet_address(backend: &str) {
    let t = Tailnet::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &proxy_to(backend, PEER)).unwrap();
    let (seen, _) = tcp_via(&t.lan, sa(GW_LAN, 8500), &t.peer, sa(PEER, 8500))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert_eq!(seen.ip(), ip(GW_TAILNET), "the target sees the gateway's tailnet address");
    if backend == "bpf" {
        assert!(NAT_PORTS.contains(&seen.port()), "a port of [nat] ports: {seen}");
    }
    let (seen, answered) = udp_via(&t.lan, sa(LAN, 5000), sa(GW_LAN, 9500), &t.peer, sa(PEER, 9500)).unwrap();
    assert_eq!(seen.ip(), ip(GW_TAILNET));
    assert!(answered, "the answer comes back from {GW_LAN}:9500");
    // A ping of the gateway is answered by the target (the gateway itself answers none).
    t.gw.sysctl("net.ipv4.icmp_echo_ignore_all", "1").unwrap();
    assert!(t.lan.ping(GW_LAN, None), "the ping did not reach the target\n{}", daemon.log());
    if backend == "bpf" {
        let s = daemon::status(&t.gw, &t.pins);
        for counter in ["egress_proxied", "egress_proxy_new", "egress_proxy_replies", "service_dnat"] {
            assert!(s["counters"][counter].as_u64().unwrap() > 0, "{counter}: {s}");
        }
        assert_eq!(s["counters"]["egress_proxy_drop"].as_u64(), Some(0), "{s}");
    }
}

fn lan_clients_reach_an_ipv6_target(backend: &str) {
    let t = Tailnet::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &proxy_to(backend, PEER6)).unwrap();
    let (seen, _) = tcp_via(&t.lan, sa(GW_LAN6, 8501), &t.peer, sa(PEER6, 8501))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    assert_eq!(seen.ip(), ip(GW_TAILNET6));
    let (seen, answered) =
        udp_via(&t.lan, sa(LAN6, 5001), sa(GW_LAN6, 9501), &t.peer, sa(PEER6, 9501)).unwrap();
    assert_eq!((seen.ip(), answered), (ip(GW_TAILNET6), true));
    // IPv4 is not proxied: the gateway's own listener answers.
    let (seen, client) = tcp_echo(&t.lan, &t.gw, sa(GW_LAN, 8502)).unwrap();
    assert_eq!(seen, client);
}

fn the_gateways_own_and_forwarded_traffic_is_not_proxied(backend: &str) {
    let t = Tailnet::new().unwrap();
    // The LAN routes the tailnet through the gateway (a subnet router's other direction).
    t.lan.ip(&["route", "add", "100.101.0.0/16", "via", GW_LAN]).unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &proxy_to(backend, PEER)).unwrap();
    // A proxied flow exists meanwhile.
    let (seen, _) = tcp_via(&t.lan, sa(GW_LAN, 8510), &t.peer, sa(PEER, 8510)).unwrap();
    assert_eq!(seen.ip(), ip(GW_TAILNET));
    // The gateway's own connections out of the uplink: their replies come back to it.
    let (seen, client) = tcp_echo(&t.gw, &t.lan, sa(LAN, 8511)).unwrap();
    assert_eq!(seen, client, "the gateway's own TCP");
    let (seen, answered) = udp_echo(&t.gw, sa(GW_LAN, 5353), &t.lan, sa(LAN, 9511)).unwrap();
    assert_eq!((seen, answered), (sa(GW_LAN, 5353), true), "the gateway's own UDP");
    assert!(t.gw.ping(LAN, None), "the gateway's own ping");
    // Forwarded traffic keeps its destination and source: a LAN host reaches another
    // tailnet peer through the gateway as it is...
    t.peer.ip(&["addr", "add", &format!("{OTHER}/32"), "dev", "tun0"]).unwrap();
    let (seen, client) = tcp_echo(&t.lan, &t.peer, sa(OTHER, 8512)).unwrap();
    assert_eq!(seen, client, "LAN to tailnet, forwarded as it is");
    // ...but what goes to the target gets the gateway's tailnet address, as the reference's
    // SNAT rule (`-d T`) gives it.
    let (seen, _) = tcp_echo(&t.lan, &t.peer, sa(PEER, 8514)).unwrap();
    assert_eq!(seen.ip(), ip(GW_TAILNET), "LAN to the target");
    // IPv6 (not the target's family) is not taken either.
    let (seen, client) = tcp_echo(&t.lan, &t.gw, sa(GW_LAN6, 8513)).unwrap();
    assert_eq!(seen, client);
}

/// The target is also a tailnet client of the gateway as a subnet router: its connections
/// to the LAN (masqueraded) get their answers untranslated by the proxy.
fn the_target_still_reaches_the_lan_through_the_gateway(backend: &str) {
    let t = Tailnet::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &proxy_to(backend, PEER)).unwrap();
    let (seen, answered) = udp_echo(&t.peer, sa(PEER, 40_000), &t.lan, sa(LAN, 9520)).unwrap();
    assert_eq!(seen.ip(), ip(GW_LAN), "masqueraded");
    assert!(answered, "the answer reaches the target from {LAN}\n{}", daemon.log());
    let (seen, _) = tcp_echo(&t.peer, &t.lan, sa(LAN, 8520)).unwrap();
    assert_eq!(seen.ip(), ip(GW_LAN));
    assert!(t.peer.ping(LAN, None), "the target's ping of the LAN host");
    // And the proxy works meanwhile.
    let (seen, _) = tcp_via(&t.lan, sa(GW_LAN, 8521), &t.peer, sa(PEER, 8521)).unwrap();
    assert_eq!(seen.ip(), ip(GW_TAILNET));
}

/// The proxy's programs come after the masquerade's wherever they are attached later: a
/// reply to a masqueraded flow (for the gateway's address, a port of `[nat] ports`) is
/// the masquerade's, not the proxy's.
fn a_proxy_turned_on_by_a_reload_leaves_masqueraded_replies_alone(backend: &str) {
    let t = Tailnet::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    daemon.write_config(&proxy_to(backend, PEER)).unwrap();
    daemon.reload().unwrap();
    let (seen, answered) = udp_echo(&t.peer, sa(PEER, 40_030), &t.lan, sa(LAN, 9530)).unwrap();
    assert_eq!((seen.ip(), answered), (ip(GW_LAN), true), "masqueraded, answered\n{}", daemon.log());
    let (seen, _) = tcp_echo(&t.peer, &t.lan, sa(LAN, 8530)).unwrap();
    assert_eq!(seen.ip(), ip(GW_LAN));
    let (seen, _) = tcp_via(&t.lan, sa(GW_LAN, 8531), &t.peer, sa(PEER, 8531)).unwrap();
    assert_eq!(seen.ip(), ip(GW_TAILNET), "and proxied");
}

/// A connection the gateway had when the proxy came (its own out of the uplink, one to its
/// own socket, e.g. an administrator's SSH) stays the gateway's, as conntrack keeps it; the
/// LAN side speaks first after the change.
fn connections_open_before_the_proxy_stay_the_gateways(backend: &str) {
    let t = Tailnet::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let outbound = Pair::open(&t.gw, &t.lan, sa(LAN, 8540)).unwrap();
    let inbound = Pair::open(&t.lan, &t.gw, sa(GW_LAN, 8541)).unwrap();
    daemon.write_config(&proxy_to(backend, PEER)).unwrap();
    daemon.reload().unwrap();
    for (name, pair) in [("the gateway's own", &outbound), ("to the gateway's socket", &inbound)] {
        pair.exchange().unwrap_or_else(|e| panic!("{name}: {e:#}\n{}", daemon.log()));
    }
    // New connections are the proxy's.
    let (seen, _) = tcp_via(&t.lan, sa(GW_LAN, 8542), &t.peer, sa(PEER, 8542)).unwrap();
    assert_eq!(seen.ip(), ip(GW_TAILNET));
}

/// UDP to a port the target does not listen on: its ICMP error comes back through both
/// translations, and the client's socket reports the refusal.
fn the_targets_port_unreachable_reaches_the_client(backend: &str) {
    let t = Tailnet::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &proxy_to(backend, PEER)).unwrap();
    let refused = t
        .lan
        .enter(|| {
            let socket = std::net::UdpSocket::bind(sa(LAN, 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.connect(sa(GW_LAN, 9599))?;
            socket.send(b"anyone?")?;
            Ok(socket.recv(&mut [0u8; 16]).map_err(|e| e.kind()))
        })
        .unwrap();
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "{}", daemon.log());
}

/// Two ends of a TCP connection.
struct Pair {
    client: TcpStream,
    server: TcpStream,
}

impl Pair {
    fn open(from_ns: &Netns, to_ns: &Netns, to: SocketAddr) -> Result<Self> {
        let listener = to_ns.listen_tcp(to)?;
        let client = from_ns.enter(move || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?))?;
        let (server, _) = listener.accept()?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
        }
        Ok(Self { client, server })
    }

    /// The server speaks first, then the client answers.
    fn exchange(&self) -> Result<()> {
        use std::io::{Read, Write};
        let mut buf = [0u8; 4];
        (&self.server).write_all(b"ping")?;
        (&self.client).read_exact(&mut buf).context("the server's data did not arrive")?;
        (&self.client).write_all(b"pong")?;
        (&self.server).read_exact(&mut buf).context("the client's answer did not arrive")?;
        anyhow::ensure!(&buf == b"pong");
        Ok(())
    }
}

#[test]
fn one_of_the_gateways_addresses_is_no_target() {
    let t = Tailnet::new().unwrap();
    for target in [GW_LAN, GW_TAILNET] {
        let (code, log) = Daemon::run_to_exit(&t.gw, &t.pins, &proxy_to("bpf", target)).unwrap();
        assert_ne!(code, 0, "{log}");
        assert!(log.contains("proxy.egress_to") && log.contains("an address of this gateway"), "{log}");
    }
}

fn a_new_address_of_the_gateway_is_proxied_too(backend: &str) {
    let t = Tailnet::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &proxy_to(backend, PEER)).unwrap();
    t.gw.ip(&["addr", "add", "192.0.2.5/24", "dev", "eth0"]).unwrap();
    let listener = t.peer.enter(|| Ok(TcpListener::bind(sa(PEER, 8530))?)).unwrap();
    let reached = wait::until(Duration::from_secs(10), || {
        accepted(&t.lan, sa("192.0.2.5", 8530), &listener).is_ok_and(|seen| seen.ip() == ip(GW_TAILNET))
    });
    assert!(reached, "192.0.2.5 was not proxied\n{}", daemon.log());
}

/// Whether a connection to `via` reaches `listener`: the source it saw.
fn accepted(from_ns: &Netns, via: SocketAddr, listener: &TcpListener) -> Result<SocketAddr> {
    let _client = from_ns.enter(move || Ok(TcpStream::connect_timeout(&via, Duration::from_secs(1))?))?;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    anyhow::ensure!(poll(&mut fds, PollTimeout::from(1000u16))? > 0, "not accepted");
    Ok(listener.accept()?.1)
}
