//! Masquerade end to end, on both backends (the BPF backend's own NAT engine, the iptables
//! backend's MASQUERADE rule): tailnet clients reach a LAN host that has no route back under
//! the gateway's address (TCP, UDP, ping; IPv4 and IPv6), two clients with one source port
//! stay apart, connections from the LAN into the tailnet and the gateway's own connections
//! are left alone. The BPF backend needs no netfilter NAT rule for it.

use std::net::{IpAddr, SocketAddr};

use tailgate_tests::{
    daemon::{self, Daemon},
    on_both_backends,
    tailnet::{config, tcp_echo, udp_echo, Tailnet, GW_LAN, GW_LAN6, LAN, LAN6, PEER, PEER6},
};

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The BPF masquerade's default ports (`[nat] ports`).
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;

on_both_backends!(
    tailnet_clients_reach_the_lan_under_the_gateways_address,
    two_clients_with_one_port_stay_apart,
    connections_from_the_lan_into_the_tailnet_keep_their_addresses,
    the_gateways_own_connections_are_untouched,
    a_lan_hosts_port_unreachable_reaches_the_tailnet_client,
);

/// UDP from a tailnet client to a port the LAN host does not listen on: the host's ICMP
/// error about the masqueraded packet goes back to the client, whose socket reports it.
fn a_lan_hosts_port_unreachable_reaches_the_tailnet_client(backend: &str) {
    let t = Tailnet::new().unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    for (peer, lan) in [(PEER, LAN), (PEER6, LAN6)] {
        let refused = t
            .peer
            .enter(move || {
                let socket = std::net::UdpSocket::bind(sa(peer, 0))?;
                socket.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
                socket.connect(sa(lan, 9699))?;
                socket.send(b"anyone?")?;
                Ok(socket.recv(&mut [0u8; 16]).map_err(|e| e.kind()))
            })
            .unwrap();
        assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused), "{peer} -> {lan}");
    }
}

fn tailnet_clients_reach_the_lan_under_the_gateways_address(backend: &str) {
    let t = Tailnet::new().unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    for (peer, lan, gw) in [(PEER, LAN, GW_LAN), (PEER6, LAN6, GW_LAN6)] {
        let (seen, answered) = udp_echo(&t.peer, sa(peer, 40_000), &t.lan, sa(lan, 9100)).unwrap();
        assert_eq!(seen.ip(), ip(gw), "UDP from {peer} masqueraded");
        assert!(answered, "the answer translated back to {peer}");
        let (seen, _) = tcp_echo(&t.peer, &t.lan, sa(lan, 8100)).unwrap();
        assert_eq!(seen.ip(), ip(gw), "TCP from {peer} masqueraded");
        if backend == "bpf" {
            assert!(NAT_PORTS.contains(&seen.port()), "a port of [nat] ports: {seen}");
        }
        assert!(t.peer.ping(lan, None), "ping {lan} through the masquerade");
    }
    if backend == "bpf" {
        let s = daemon::status(&t.gw, &t.pins);
        for counter in ["masqueraded", "masquerade_new", "unmasqueraded"] {
            assert!(s["counters"][counter].as_u64().unwrap() > 0, "{counter}: {s}");
        }
        assert_eq!(s["counters"]["masquerade_drop"].as_u64(), Some(0), "{s}");
        // No netfilter NAT: the programs do it.
        for save in
            ["iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"]
        {
            let out = t.gw.exec(save, &["-t", "nat"]).unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(!text.contains("MASQUERADE"), "{save}: {text}");
        }
    }
}

fn two_clients_with_one_port_stay_apart(backend: &str) {
    let t = Tailnet::new().unwrap();
    // A second tailnet client behind the relay.
    const OTHER: &str = "100.101.2.4";
    t.peer.ip(&["addr", "add", &format!("{OTHER}/32"), "dev", "tun0"]).unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let server = sa(LAN, 9200);
    // Both flows live at once: each answer must reach its own client.
    let (first, first_answered) = udp_echo(&t.peer, sa(PEER, 40_001), &t.lan, server).unwrap();
    let (second, second_answered) = udp_echo(&t.peer, sa(OTHER, 40_001), &t.lan, sa(LAN, 9201)).unwrap();
    assert!(first_answered && second_answered);
    // Same server port for both: the second flow's tuple would clash without a new port.
    let (third, third_answered) = udp_echo(&t.peer, sa(OTHER, 40_002), &t.lan, server).unwrap();
    let (again, again_answered) = udp_echo(&t.peer, sa(PEER, 40_001), &t.lan, server).unwrap();
    assert!(third_answered && again_answered);
    assert_eq!(again, first, "a flow keeps its translation");
    assert_ne!(first, third, "two clients to one server under distinct ports");
    for seen in [first, second, third] {
        assert_eq!(seen.ip(), ip(GW_LAN));
    }
}

fn connections_from_the_lan_into_the_tailnet_keep_their_addresses(backend: &str) {
    let t = Tailnet::new().unwrap();
    // The LAN routes the tailnet through the gateway (a subnet router's other direction).
    t.lan.ip(&["route", "add", "100.101.0.0/16", "via", GW_LAN]).unwrap();
    t.lan.ip(&["-6", "route", "add", "fd7a:115c:a1e0::/48", "via", GW_LAN6]).unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    for (lan, peer) in [(LAN, PEER), (LAN6, PEER6)] {
        // The peer's answers are marked on their way from the tunnel, but they answer a
        // connection from the LAN: not masqueraded (the LAN host expects them from the peer).
        let (seen, answered) = udp_echo(&t.lan, sa(lan, 5000), &t.peer, sa(peer, 9300)).unwrap();
        assert_eq!(seen, sa(lan, 5000), "the peer sees the LAN host");
        assert!(answered, "the answer comes from {peer}, untranslated");
        let (seen, client) = tcp_echo(&t.lan, &t.peer, sa(peer, 8300)).unwrap();
        assert_eq!(seen, client, "TCP from the LAN reaches the peer as it is");
    }
    // And a tailnet client's flow to the same LAN host is still masqueraded meanwhile.
    let (seen, answered) = udp_echo(&t.peer, sa(PEER, 40_010), &t.lan, sa(LAN, 9301)).unwrap();
    assert_eq!((seen.ip(), answered), (ip(GW_LAN), true));
}

fn the_gateways_own_connections_are_untouched(backend: &str) {
    let t = Tailnet::new().unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    // A masqueraded flow exists meanwhile.
    let (seen, answered) = udp_echo(&t.peer, sa(PEER, 40_020), &t.lan, sa(LAN, 9400)).unwrap();
    assert_eq!((seen.ip(), answered), (ip(GW_LAN), true));
    for (gw, lan) in [(GW_LAN, LAN), (GW_LAN6, LAN6)] {
        let (seen, client) = tcp_echo(&t.gw, &t.lan, sa(lan, 8400)).unwrap();
        assert_eq!(seen, client, "the gateway's own TCP keeps its address and port");
        // A port inside the masquerade's range, bound by the host itself: still its own.
        let (seen, answered) = udp_echo(&t.gw, sa(gw, 62_000), &t.lan, sa(lan, 9401)).unwrap();
        assert_eq!((seen, answered), (sa(gw, 62_000), true));
    }
}

#[test]
fn bpf_refuses_a_port_range_the_host_uses() {
    let t = Tailnet::new().unwrap();
    let config = config("bpf", "[nat]\nports = \"40000-50000\"");
    let (code, log) = Daemon::run_to_exit(&t.gw, &t.pins, &config).unwrap();
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("nat.ports 40000-50000") && log.contains("ip_local_port_range"), "{log}");
    // Without the masquerade the range means nothing.
    let config = config_without_masquerade();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config).unwrap();
}

fn config_without_masquerade() -> String {
    config("bpf", "[subnet_routes]\nmasquerade = false\n[nat]\nports = \"40000-50000\"")
}
