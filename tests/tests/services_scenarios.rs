//! Services end to end, on both backends, with real sockets: a tailnet peer behind the TUN
//! relay connects to a service address; backends are addresses of the LAN host. Spread and
//! weights, a connection kept across a reload that adds a backend, a removed backend that
//! gets no new connections, a refused reload, UDP, IPv6, IP forwarding turned on.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use tailgate_tests::{
    daemon::{status, tailgate, Daemon},
    netns::{veth, Netns},
    on_both_backends,
    tailnet::{self, Tailnet},
    wait,
};

on_both_backends!(
    connections_spread_over_the_backends_by_weight_and_answer_from_the_service,
    a_connection_survives_a_reload_that_adds_a_backend_and_a_removed_backend_gets_no_new_ones,
    a_refused_reload_keeps_the_services_working,
    a_udp_service_answers_from_its_address,
    an_ipv6_service_works_and_forwarding_is_turned_on,
    the_ingress_proxy_follows_the_gateways_tailnet_address,
    a_lan_client_on_another_uplink_reaches_the_service,
    the_ingress_proxy_waits_for_the_tunnels_address_and_serves_lan_clients_too,
);

const WAIT: Duration = Duration::from_secs(3);
const VIP: &str = "100.101.102.103";
const VIP6: &str = "fd7a:115c:a1e0::99";
const BACKENDS: [&str; 4] = ["192.0.2.11", "192.0.2.12", "192.0.2.13", "192.0.2.14"];

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The topology with the backend addresses on the LAN host, each running a server on 8080
/// that names itself and then echoes.
fn setup() -> Tailnet {
    let t = Tailnet::new().unwrap();
    for backend in BACKENDS {
        t.lan.ip(&["addr", "add", &format!("{backend}/24"), "dev", "eth0"]).unwrap();
        whoami(&t.lan, addr(backend, 8080));
    }
    t
}

/// A TCP server at `at` in `ns`: the first message on a connection is answered with the
/// server's address, later ones are echoed.
fn whoami(ns: &Netns, at: SocketAddr) {
    let listener = ns.enter(move || Ok(TcpListener::bind(at)?)).unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                let mut first = true;
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    let answer = if first { at.to_string().into_bytes() } else { buf[..n].to_vec() };
                    first = false;
                    if stream.write_all(&answer).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn service(backends: &str) -> String {
    format!("[[service]]\nname = \"web\"\nlisten = \"{VIP}:80\"\nbackends = [{backends}]\n")
}

const THREE: &str = r#""192.0.2.11:8080", "192.0.2.12:8080", { address = "192.0.2.13:8080", weight = 3 }"#;

/// `count` connections from the peer to `to`: which backend answered each; stops at the
/// first that fails (`None`), so a broken service fails the test at once.
fn connect_many(t: &Tailnet, to: SocketAddr, count: usize) -> Vec<Option<String>> {
    connect_many_from(&t.peer, to, count)
}

/// `connect_many` from a namespace of the caller's choice.
fn connect_many_from(ns: &Netns, to: SocketAddr, count: usize) -> Vec<Option<String>> {
    let one = move || -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&to, WAIT).ok()?;
        stream.set_read_timeout(Some(WAIT)).ok()?;
        // The connection is with the service's address, as the peer sees it.
        if stream.peer_addr().ok()? != to {
            return None;
        }
        stream.write_all(b"who").ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    ns.enter(move || {
        let mut answers = Vec::with_capacity(count);
        for _ in 0..count {
            let answer = one();
            let failed = answer.is_none();
            answers.push(answer);
            if failed {
                break;
            }
        }
        Ok(answers)
    })
    .unwrap()
}

fn tally(answers: &[Option<String>]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for answer in answers {
        *counts.entry(answer.clone().unwrap_or_else(|| "failed".into())).or_default() += 1;
    }
    counts
}

fn connections_spread_over_the_backends_by_weight_and_answer_from_the_service(backend: &str) {
    let t = setup();
    let daemon = Daemon::start(&t.gw, &t.pins, &tailnet::config(backend, &service(THREE))).unwrap();
    let answers = connect_many(&t, addr(VIP, 80), 200);
    let counts = tally(&answers);
    assert_eq!(counts.get("failed"), None, "every connection answered: {counts:?}\n{}", daemon.log());
    let (a, b, c) = (counts["192.0.2.11:8080"], counts["192.0.2.12:8080"], counts["192.0.2.13:8080"]);
    assert_eq!(a + b + c, 200, "{counts:?}");
    // Weights 1:1:3 (shares 40/40/120).
    assert!(c > a && c > b && a >= 10 && b >= 10, "{counts:?}");
    let s = status(&t.gw, &t.pins);
    assert!(s["counters"]["service_balanced"].as_u64().unwrap() >= 200, "{s}");
    if backend == "bpf" {
        // The table's shares as status reads them from the maps: 1:1:3 of 16,381 slots.
        let service = &s["services"][0];
        assert_eq!(service["listen"], format!("{VIP}:80"), "{s}");
        let slots: Vec<u64> = (0..3).map(|i| service["backends"][i]["slots"].as_u64().unwrap()).collect();
        assert_eq!(slots.iter().sum::<u64>(), 16_381, "{s}");
        assert!(slots[0].abs_diff(3_276) <= 1 && slots[2].abs_diff(9_829) <= 1, "{slots:?}");
        // Each connection's two entries, with what they translate to.
        let out = tailgate(&t.gw, &t.pins, &["flows", "--json"]).unwrap();
        let flows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let flows = flows.as_array().unwrap();
        let dnat = flows.iter().filter(|f| f["zone"] == "dnat" && f["dst"] == VIP).count();
        let replies =
            flows.iter().filter(|f| f["zone"] == "dnat-reply" && f["nat"] == format!("{VIP}:80")).count();
        assert!(dnat >= 200 && replies >= 200, "{dnat} / {replies}");
        assert!(
            flows.iter().any(|f| f["zone"] == "dnat" && f["nat"] == "192.0.2.13:8080"),
            "a flow to a backend"
        );
    }
}

fn a_connection_survives_a_reload_that_adds_a_backend_and_a_removed_backend_gets_no_new_ones(backend: &str) {
    let t = setup();
    let daemon = Daemon::start(&t.gw, &t.pins, &tailnet::config(backend, &service(THREE))).unwrap();
    let vip = addr(VIP, 80);
    let mut live = t.peer.enter(move || Ok(TcpStream::connect_timeout(&vip, WAIT)?)).unwrap();
    live.set_read_timeout(Some(WAIT)).unwrap();
    let ask = |stream: &mut TcpStream, what: &[u8]| -> String {
        stream.write_all(what).unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = ask(&mut live, b"who");
    assert!(first.starts_with("192.0.2.1"), "{first}");

    let four = format!("{THREE}, \"192.0.2.14:8080\"");
    daemon.write_config(&tailnet::config(backend, &service(&four))).unwrap();
    daemon.reload().unwrap();
    assert_eq!(ask(&mut live, b"still there"), "still there", "the connection survived the reload");
    let counts = tally(&connect_many(&t, vip, 100));
    assert!(counts.contains_key("192.0.2.14:8080"), "the new backend gets connections: {counts:?}");

    // 192.0.2.11 leaves: no new connection reaches it; the others still answer.
    let without = four.replace("\"192.0.2.11:8080\", ", "");
    daemon.write_config(&tailnet::config(backend, &service(&without))).unwrap();
    daemon.reload().unwrap();
    let counts = tally(&connect_many(&t, vip, 100));
    assert_eq!(counts.get("192.0.2.11:8080"), None, "{counts:?}");
    assert_eq!(counts.get("failed"), None, "{counts:?}\n{}", daemon.log());
}

fn a_refused_reload_keeps_the_services_working(backend: &str) {
    let t = setup();
    let daemon = Daemon::start(&t.gw, &t.pins, &tailnet::config(backend, &service(THREE))).unwrap();
    // A second service on the same address: refused, naming the field.
    let bad = format!("{}{}", service(THREE), service("\"192.0.2.14:8080\""));
    daemon.write_config(&tailnet::config(backend, &bad)).unwrap();
    daemon.reload().unwrap();
    assert!(daemon.log().contains("service[1].listen"), "{}", daemon.log());
    let counts = tally(&connect_many(&t, addr(VIP, 80), 30));
    assert_eq!(counts.get("failed"), None, "{counts:?}");
    assert_eq!(counts.get("192.0.2.14:8080"), None, "{counts:?}");
}

fn a_udp_service_answers_from_its_address(backend: &str) {
    let t = setup();
    let dns = addr("192.0.2.11", 5353);
    let server = t.lan.enter(move || Ok(UdpSocket::bind(dns)?)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let config =
        format!("[[service]]\nlisten = \"{VIP}:53\"\nprotocol = \"udp\"\nbackends = [\"192.0.2.11:5353\"]\n");
    let _daemon = Daemon::start(&t.gw, &t.pins, &tailnet::config(backend, &config)).unwrap();
    let vip = addr(VIP, 53);
    let client = t.peer.enter(|| Ok(UdpSocket::bind(addr(tailnet::PEER, 0))?)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    for query in [&b"query one"[..], b"query two"] {
        client.send_to(query, vip).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = client.recv_from(&mut buf).expect("an answer");
        assert_eq!((&buf[..n], from), (query, vip), "answered from the service's address");
    }
}

fn an_ipv6_service_works_and_forwarding_is_turned_on(backend: &str) {
    let t = setup();
    t.lan.ip(&["-6", "addr", "add", "2001:db8::11/64", "dev", "eth0", "nodad"]).unwrap();
    whoami(&t.lan, addr("2001:db8::11", 8080));
    t.gw.sysctl("net.ipv6.conf.all.forwarding", "0").unwrap();
    t.gw.sysctl("net.ipv4.ip_forward", "0").unwrap();
    let config = format!("[[service]]\nlisten = \"[{VIP6}]:80\"\nbackends = [\"[2001:db8::11]:8080\"]\n");
    let daemon = Daemon::start(&t.gw, &t.pins, &tailnet::config(backend, &config)).unwrap();
    let read = |key: &str| {
        let out = t.gw.exec("sysctl", &["-n", key]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(read("net.ipv6.conf.all.forwarding"), "1", "turned on for the IPv6 service");
    assert_eq!(read("net.ipv4.ip_forward"), "0", "no IPv4 service: left as it was");
    let counts = tally(&connect_many(&t, addr(VIP6, 80), 10));
    assert_eq!(counts.get("[2001:db8::11]:8080"), Some(&10), "{counts:?}\n{}", daemon.log());
}

fn the_ingress_proxy_follows_the_gateways_tailnet_address(backend: &str) {
    let t = setup();
    whoami(&t.lan, addr(tailnet::LAN, 2222));
    let dns = addr(tailnet::LAN, 5300);
    let server = t.lan.enter(move || Ok(UdpSocket::bind(dns)?)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let config = tailnet::config(backend, &format!("[proxy]\ningress_to = \"{}\"\n", tailnet::LAN));
    let daemon = Daemon::start(&t.gw, &t.pins, &config).unwrap();
    // The gateway's tailnet address (tun0's) reaches the LAN host, ports kept.
    let counts = tally(&connect_many(&t, addr("100.101.0.1", 2222), 3));
    assert_eq!(counts.get("192.0.2.2:2222"), Some(&3), "{counts:?}\n{}", daemon.log());
    let client = t.peer.enter(|| Ok(UdpSocket::bind(addr(tailnet::PEER, 0))?)).unwrap();
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.send_to(b"query", addr("100.101.0.1", 5300)).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = client.recv_from(&mut buf).expect("an answer");
    assert_eq!((&buf[..n], from), (&b"query"[..], addr("100.101.0.1", 5300)));
    // A ping is answered by the LAN host (the gateway itself answers none).
    t.gw.sysctl("net.ipv4.icmp_echo_ignore_all", "1").unwrap();
    assert!(t.peer.ping("100.101.0.1", None), "the ping did not reach the destination\n{}", daemon.log());

    // The tunnel is readdressed (new address first: a device without IPv4 address loses its
    // routes): the proxy follows.
    t.gw.ip(&["addr", "add", "100.101.0.9/32", "dev", "tun0"]).unwrap();
    t.gw.ip(&["addr", "del", "100.101.0.1/32", "dev", "tun0"]).unwrap();
    let followed = wait::until(Duration::from_secs(10), || {
        connect_many(&t, addr("100.101.0.9", 2222), 1) == [Some("192.0.2.2:2222".to_string())]
    });
    assert!(followed, "the proxy did not follow the new address\n{}", daemon.log());
}

/// A restart over kept pins with a changed service: the old table and the ids only it used
/// go once the start commits (checked in the pinned maps).
#[test]
fn a_restart_with_a_changed_service_frees_the_replaced_table() {
    use aya::maps::{Array, ArrayOfMaps, Map, MapData};
    use tailgate::backend::bpf::Pins;
    use tailgate_abi::services::{Backend, MAP_BACKENDS, MAP_TABLES, MAX_BACKENDS, MAX_TABLES};
    let t = setup();
    let pinned = |t: &Tailnet| {
        let pins = Pins::new(t.pins.path());
        let outer = Map::ArrayOfMaps(MapData::from_pin(pins.map(MAP_TABLES)).unwrap());
        let outer: ArrayOfMaps<&MapData, MapData> = ArrayOfMaps::try_from(&outer).unwrap();
        let tables = (0..MAX_TABLES).filter(|i| outer.get(i, 0).is_ok()).count();
        let backends = Map::Array(MapData::from_pin(pins.map(MAP_BACKENDS)).unwrap());
        let backends: Array<&MapData, Backend> = Array::try_from(&backends).unwrap();
        let ids = (1..MAX_BACKENDS).filter(|i| backends.get(i, 0).unwrap().family != 0).count();
        (tables, ids)
    };
    let kept =
        |backends: &str| format!("keep_datapath = true\n{}", tailnet::config("bpf", &service(backends)));
    let mut daemon = Daemon::start(&t.gw, &t.pins, &kept(r#""192.0.2.11:8080", "192.0.2.12:8080""#)).unwrap();
    assert_eq!(pinned(&t), (1, 2));
    assert_eq!(daemon.stop(), Some(0));
    let daemon = Daemon::start(&t.gw, &t.pins, &kept(r#""192.0.2.11:8080", "192.0.2.13:8080""#)).unwrap();
    assert_eq!(pinned(&t), (1, 2), "the replaced table and 192.0.2.12's id are gone");
    let counts = tally(&connect_many(&t, addr(VIP, 80), 20));
    assert_eq!(counts.get("192.0.2.12:8080"), None, "{counts:?}");
    daemon.write_config(&format!("keep_datapath = true\n{}", tailnet::config("bpf", ""))).unwrap();
    daemon.reload().unwrap();
    assert_eq!(pinned(&t), (0, 0));
}

/// A client on a second uplink (its own LAN segment, routed by the gateway) connects to a
/// service whose backends are on the first: DNAT at the uplink's ingress, the reply
/// translated back at the client's uplink's egress.
fn a_lan_client_on_another_uplink_reaches_the_service(backend: &str) {
    let t = setup();
    let client = second_uplink_client(&t);
    let config = two_uplinks(backend, &service(THREE));
    let daemon = Daemon::start(&t.gw, &t.pins, &config).unwrap();
    let answers = connect_many_from(&client, addr(VIP, 80), 30);
    let counts = tally(&answers);
    assert_eq!(counts.get("failed"), None, "every connection answered: {counts:?}\n{}", daemon.log());
    assert!(counts.keys().all(|b| b.starts_with("192.0.2.1")), "{counts:?}");
    assert!(counts.len() >= 2, "spread: {counts:?}");
}

/// A client namespace behind a second uplink of the gateway (eth1, 10.7.0.0/24); the LAN
/// routes it through the gateway.
fn second_uplink_client(t: &Tailnet) -> Netns {
    let client = Netns::new("tg-client").unwrap();
    veth(&t.gw, "eth1", &client, "eth0").unwrap();
    t.gw.ip(&["addr", "add", "10.7.0.1/24", "dev", "eth1"]).unwrap();
    client.ip(&["addr", "add", "10.7.0.2/24", "dev", "eth0"]).unwrap();
    client.ip(&["route", "add", "default", "via", "10.7.0.1"]).unwrap();
    t.lan.ip(&["route", "add", "10.7.0.0/24", "via", tailnet::GW_LAN]).unwrap();
    client
}

fn two_uplinks(backend: &str, extra: &str) -> String {
    format!("tunnel = \"tun0\"\ninterfaces = [\"eth0\", \"eth1\"]\nbackend = \"{backend}\"\n{extra}")
}

/// The tunnel has no IPv4 address yet at start (and the gateway does not forward): the
/// proxy waits; once the address comes, forwarding is turned on and tailnet clients reach
/// the destination — LAN clients too, as the reference's rule matches every device.
fn the_ingress_proxy_waits_for_the_tunnels_address_and_serves_lan_clients_too(backend: &str) {
    let t = setup();
    let client = second_uplink_client(&t);
    whoami(&t.lan, addr(tailnet::LAN, 2222));
    t.gw.sysctl("net.ipv4.ip_forward", "0").unwrap();
    t.gw.ip(&["addr", "del", "100.101.0.1/32", "dev", "tun0"]).unwrap();
    let config = two_uplinks(backend, &format!("[proxy]\ningress_to = \"{}\"\n", tailnet::LAN));
    let daemon = Daemon::start(&t.gw, &t.pins, &config).unwrap();
    t.gw.ip(&["addr", "add", "100.101.0.1/32", "dev", "tun0"]).unwrap();
    t.gw.ip(&["route", "replace", "100.101.0.0/16", "dev", "tun0"]).unwrap();
    let target = addr("100.101.0.1", 2222);
    let reached = wait::until(Duration::from_secs(10), || {
        connect_many(&t, target, 1) == [Some("192.0.2.2:2222".to_string())]
    });
    assert!(reached, "the proxy did not start with the address\n{}", daemon.log());
    let out = t.gw.exec("sysctl", &["-n", "net.ipv4.ip_forward"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let counts = tally(&connect_many_from(&client, target, 5));
    assert_eq!(counts.get("192.0.2.2:2222"), Some(&5), "a LAN client: {counts:?}");
}
