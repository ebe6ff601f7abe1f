//! Flow tracking end to end, on both backends, with real sockets: replies to the gateway's
//! own connections to a CGNAT-addressed LAN host, a forged tailnet address on the uplink,
//! and the stateful filter into the tunnel.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use tailgate_tests::{
    daemon::{status, tailgate, Daemon},
    netns::Netns,
    on_both_backends, tailnet,
    topology::{self, Topology, GW_LAN_CGNAT, GW_TAILNET, GW_ULA, LAN_CGNAT, LAN_ULA, PEER},
};

on_both_backends!(
    the_gateways_own_query_ping_and_connection_to_a_cgnat_host_get_replies,
    allow_replies_false_restores_the_reference_drop,
    a_lan_host_forging_a_peer_address_into_a_tunnel_flow_gets_nothing_through,
    stateful_stops_lan_connections_into_the_tailnet_while_tailnet_to_lan_works,
    large_replies_arrive_in_fragments_and_pass,
    live_connections_survive_a_restart_and_stateful_turned_on,
);

const WAIT: Duration = Duration::from_secs(2);

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A UDP echo service at `at` in `ns`, answering until the test ends.
fn udp_echo(ns: &Netns, at: SocketAddr) {
    let socket = ns.enter(move || Ok(UdpSocket::bind(at)?)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 9000];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
}

/// A query from `ns` (bound to `from`, port chosen) to `to`: whether the answer came.
fn query(ns: &Netns, from: &str, to: SocketAddr) -> bool {
    query_of(ns, from, to, 5)
}

/// A query of `size` bytes: whether the whole answer came.
fn query_of(ns: &Netns, from: &str, to: SocketAddr, size: usize) -> bool {
    let bind = addr(from, 0);
    let socket = ns.enter(move || Ok(UdpSocket::bind(bind)?)).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    socket.send_to(&vec![7u8; size], to).unwrap();
    let mut buf = vec![0u8; size + 1];
    matches!(socket.recv_from(&mut buf), Ok((n, _)) if n == size)
}

/// One ping of `size` bytes of payload (larger than the MTU: sent and answered in fragments).
fn ping_of(ns: &Netns, dst: &str, src: &str, size: usize) -> bool {
    let size = size.to_string();
    let args = ["-c", "1", "-W", "2", "-n", "-q", "-s", &size, "-I", src, dst];
    ns.exec("ping", &args).map(|o| o.status.success()).unwrap_or(false)
}

/// A TCP listener at `at` in `ns` that echoes one message per connection.
fn tcp_echo(ns: &Netns, at: SocketAddr) {
    let listener = ns.enter(move || Ok(TcpListener::bind(at)?)).unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            if let Ok(n) = stream.read(&mut buf) {
                let _ = stream.write_all(&buf[..n]);
            }
        }
    });
}

/// A TCP echo service at `at` in `ns` that keeps each connection open.
fn tcp_echo_each(ns: &Netns, at: SocketAddr) {
    let listener = ns.enter(move || Ok(TcpListener::bind(at)?)).unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// An open connection from `ns` to `to`.
fn open(ns: &Netns, to: SocketAddr) -> TcpStream {
    let stream = ns.enter(move || Ok(TcpStream::connect_timeout(&to, WAIT)?)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    stream
}

/// One message echoed over `stream`.
fn echoed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 5];
    stream.write_all(b"hello").is_ok() && stream.read_exact(&mut buf).is_ok() && &buf == b"hello"
}

/// Connects from `ns` to `to` and has one message echoed.
fn converse(ns: &Netns, to: SocketAddr) -> bool {
    ns.enter(move || {
        let mut stream = TcpStream::connect_timeout(&to, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.write_all(b"hello")?;
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf)?;
        Ok(&buf == b"hello")
    })
    .unwrap_or(false)
}

/// Permanent neighbour entries both ways for the ULA addresses on the LAN link: neighbour
/// discovery between them is itself filtered (an advertisement comes from a ULA source and
/// answers no flow), so the ping below needs none.
fn ula_neighbours(t: &Topology) {
    let mac = |ns: &Netns| {
        let out = ns.exec("cat", &["/sys/class/net/eth0/address"]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (gw_mac, lan_mac) = (mac(&t.gw), mac(&t.lan));
    for (ns, addr, lladdr) in [(&t.gw, LAN_ULA, &lan_mac), (&t.lan, GW_ULA, &gw_mac)] {
        ns.ip(&["-6", "neigh", "replace", addr, "lladdr", lladdr, "dev", "eth0", "nud", "permanent"])
            .unwrap();
    }
}

fn counter(t: &Topology, name: &str) -> u64 {
    status(&t.gw, &t.pins)["counters"][name].as_u64().unwrap_or(0)
}

fn the_gateways_own_query_ping_and_connection_to_a_cgnat_host_get_replies(backend: &str) {
    let t = Topology::new().unwrap();
    udp_echo(&t.lan, addr(LAN_CGNAT, 5353));
    tcp_echo(&t.lan, addr(LAN_CGNAT, 8080));
    tcp_echo(&t.gw, addr(GW_LAN_CGNAT, 8081));
    udp_echo(&t.gw, addr(GW_LAN_CGNAT, 5354));
    let _daemon = Daemon::start(&t.gw, &t.pins, &topology::config(backend, "")).unwrap();

    assert!(query(&t.gw, GW_LAN_CGNAT, addr(LAN_CGNAT, 5353)), "the gateway's UDP query got no answer");
    assert!(t.gw.ping(LAN_CGNAT, Some(GW_LAN_CGNAT)), "the gateway's ping got no reply");
    assert!(converse(&t.gw, addr(LAN_CGNAT, 8080)), "the gateway's TCP connection failed");
    ula_neighbours(&t);
    assert!(t.gw.ping(LAN_ULA, Some(GW_ULA)), "the gateway's IPv6 ping to a ULA host got no reply");
    assert!(!t.lan.ping(GW_ULA, Some(LAN_ULA)), "the ULA host's ping got through");
    // The host still cannot open anything to the gateway.
    assert!(!query(&t.lan, LAN_CGNAT, addr(GW_LAN_CGNAT, 5354)), "the CGNAT host's query got through");
    assert!(!t.cgnat_neighbours_ping(), "the CGNAT host's ping got through");
    assert!(!converse(&t.lan, addr(GW_LAN_CGNAT, 8081)), "the CGNAT host opened a TCP connection");
    assert!(counter(&t, "uplink_pass_reply") >= 3, "replies counted");
    if backend == "bpf" {
        let s = status(&t.gw, &t.pins);
        assert!(s["flows"]["entries_v4"].as_u64().unwrap() >= 3, "{s}");
        let out = tailgate(&t.gw, &t.pins, &["flows", "--json"]).unwrap();
        let flows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let own_tcp =
            flows.as_array().unwrap().iter().any(|f| {
                f["zone"] == "own" && f["dst"] == LAN_CGNAT && f["dport"] == 8080 && f["proto"] == 6
            });
        assert!(own_tcp, "the TCP flow is listed: {flows}");
    }
}

fn allow_replies_false_restores_the_reference_drop(backend: &str) {
    let t = Topology::new().unwrap();
    udp_echo(&t.lan, addr(LAN_CGNAT, 5353));
    let _daemon = Daemon::start(&t.gw, &t.pins, &topology::config(backend, "allow_replies = false")).unwrap();
    assert!(!query(&t.gw, GW_LAN_CGNAT, addr(LAN_CGNAT, 5353)), "the answer got through");
    assert!(!t.gw.ping(LAN_CGNAT, Some(GW_LAN_CGNAT)), "the ping reply got through");
    ula_neighbours(&t);
    assert!(!t.gw.ping(LAN_ULA, Some(GW_ULA)), "the IPv6 ping reply got through");
    assert_eq!(counter(&t, "uplink_pass_reply"), 0);
}

fn a_lan_host_forging_a_peer_address_into_a_tunnel_flow_gets_nothing_through(backend: &str) {
    let t = Topology::new().unwrap();
    // The LAN host can send from the peer's address (and the gateway's tailnet address is
    // reachable through the gateway by its default route).
    t.lan.ip(&["addr", "add", &format!("{PEER}/32"), "dev", "eth0"]).unwrap();
    let gateway = addr(GW_TAILNET, 5300);
    let socket = t.gw.enter(move || Ok(UdpSocket::bind(gateway)?)).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let forge = || {
        let from = addr(PEER, 53);
        let sender = t.lan.enter(move || Ok(UdpSocket::bind(from)?)).unwrap();
        for _ in 0..3 {
            sender.send_to(b"forged", gateway).unwrap();
        }
    };
    let arrived = |socket: &UdpSocket| {
        let mut buf = [0u8; 64];
        socket.recv_from(&mut buf).is_ok()
    };
    forge();
    assert!(arrived(&socket), "control: the forged datagram arrives without tailgate");
    while arrived(&socket) {}

    let _daemon = Daemon::start(&t.gw, &t.pins, &topology::config(backend, "")).unwrap();
    // The gateway's flow with the peer runs through the tunnel.
    socket.send_to(b"query", addr(PEER, 53)).unwrap();
    forge();
    assert!(!arrived(&socket), "a forged reply into the gateway's tunnel flow got through");
}

fn stateful_stops_lan_connections_into_the_tailnet_while_tailnet_to_lan_works(backend: &str) {
    let t = tailnet::Tailnet::new().unwrap();
    // The LAN routes the tailnet through the gateway, so it could open connections to it.
    t.lan.ip(&["route", "add", "100.101.0.0/16", "via", tailnet::GW_LAN]).unwrap();
    tcp_echo(&t.peer, addr(tailnet::PEER, 2222));
    assert!(
        converse(&t.lan, addr(tailnet::PEER, 2222)),
        "control: the LAN reaches the peer without tailgate"
    );

    let config = tailnet::config(backend, "[subnet_routes]\nstateful = true");
    let daemon = Daemon::start(&t.gw, &t.pins, &config).unwrap();
    assert!(!converse(&t.lan, addr(tailnet::PEER, 2222)), "a LAN host opened a connection into the tailnet");
    // The tailnet side opens connections to the LAN and gets the answers.
    tcp_echo(&t.lan, addr(tailnet::LAN, 8030));
    assert!(converse(&t.peer, addr(tailnet::LAN, 8030)), "tailnet to LAN failed\n{}", daemon.log());
    udp_echo(&t.lan, addr(tailnet::LAN, 5355));
    assert!(query(&t.peer, tailnet::PEER, addr(tailnet::LAN, 5355)), "the peer's UDP query got no answer");
    let drops = status(&t.gw, &t.pins)["counters"]["tunnel_drop_stateful"].as_u64().unwrap();
    assert!(drops >= 1, "stateful drops counted");
}

fn large_replies_arrive_in_fragments_and_pass(backend: &str) {
    let t = Topology::new().unwrap();
    udp_echo(&t.lan, addr(LAN_CGNAT, 5353));
    let _daemon = Daemon::start(&t.gw, &t.pins, &topology::config(backend, "")).unwrap();
    // 3,000 bytes on a 1,500-byte link: the answers come in fragments.
    assert!(ping_of(&t.gw, LAN_CGNAT, GW_LAN_CGNAT, 3000), "a fragmented ping reply was dropped");
    assert!(
        query_of(&t.gw, GW_LAN_CGNAT, addr(LAN_CGNAT, 5353), 3000),
        "a fragmented UDP answer was dropped"
    );
    ula_neighbours(&t);
    assert!(ping_of(&t.gw, LAN_ULA, GW_ULA, 3000), "a fragmented IPv6 ping reply was dropped");
    // Fragments of what the host sends unasked still drop.
    assert!(!ping_of(&t.lan, GW_LAN_CGNAT, LAN_CGNAT, 3000), "the host's fragmented ping got through");
}

fn live_connections_survive_a_restart_and_stateful_turned_on(backend: &str) {
    // The gateway's own connection to a CGNAT host, across a daemon restart (everything
    // removed at stop, flows included).
    let t = Topology::new().unwrap();
    tcp_echo_each(&t.lan, addr(LAN_CGNAT, 8080));
    let mut daemon = Daemon::start(&t.gw, &t.pins, &topology::config(backend, "")).unwrap();
    let mut own = open(&t.gw, addr(LAN_CGNAT, 8080));
    assert!(echoed(&mut own), "before the restart");
    assert_eq!(daemon.stop(), Some(0));
    let _daemon = Daemon::start(&t.gw, &t.pins, &topology::config(backend, "")).unwrap();
    assert!(echoed(&mut own), "the gateway's connection did not survive the restart");

    // A tailnet -> LAN connection while a reload turns the stateful filter on.
    let n = tailnet::Tailnet::new().unwrap();
    tcp_echo_each(&n.lan, addr(tailnet::LAN, 8031));
    let daemon = Daemon::start(&n.gw, &n.pins, &tailnet::config(backend, "")).unwrap();
    let mut live = open(&n.peer, addr(tailnet::LAN, 8031));
    assert!(echoed(&mut live), "before the reload");
    daemon.write_config(&tailnet::config(backend, "[subnet_routes]\nstateful = true")).unwrap();
    daemon.reload().unwrap();
    assert!(echoed(&mut live), "the tailnet connection did not survive turning stateful on");
}
