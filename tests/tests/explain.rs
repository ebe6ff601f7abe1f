//! `tailgate explain` against what real packets get, on both backends: a subnet router with a
//! tailnet peer behind a TUN relay and a LAN that also uses CGNAT addresses. Each case
//! explains a packet, then sends the real one and checks the two agree: dropped or
//! delivered (the packet arrives or the drop counter moves), the rule and its config field,
//! the mark, the masquerade's source and a service's backend as the receiver sees them, the
//! clamped MSS as the receiving socket settles on it. BPF: explaining leaves the live flow
//! tables and counters as they were.

use std::{
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    time::Duration,
};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::Value;
use tailgate_tests::{
    daemon::{self, Daemon},
    on_both_backends,
    tailnet::{config, Tailnet, GW_LAN, LAN, PEER},
    wait,
};

/// The LAN host's CGNAT addresses: one the built-in range drops, one an exemption lets in.
const LAN_CGNAT: &str = "100.64.0.2";
const LAN_EXEMPT: &str = "100.64.0.200";
const GW_CGNAT: &str = "100.64.0.1";
const SERVICE: &str = "100.101.0.99:80";
const BACKEND: &str = "192.0.2.2:8080";

fn extra() -> String {
    format!(
        "[cgnat]\nallow = [\"100.64.0.128/25\"]\n[[service]]\nname = \"web\"\nlisten = \"{SERVICE}\"\n\
         backends = [\"{BACKEND}\"]\n"
    )
}

fn setup(backend: &str) -> (Tailnet, Daemon) {
    let t = Tailnet::new().unwrap();
    t.gw.ip(&["addr", "add", "100.64.0.1/24", "dev", "eth0"]).unwrap();
    for addr in ["100.64.0.2/24", "100.64.0.200/24"] {
        t.lan.ip(&["addr", "add", addr, "dev", "eth0"]).unwrap();
    }
    // The peer reaches the LAN's CGNAT subnet through the gateway too.
    t.peer.ip(&["route", "add", "100.64.0.0/24", "dev", "tun0"]).unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, &extra())).unwrap();
    (t, daemon)
}

fn explain(t: &Tailnet, args: &[&str]) -> Value {
    let mut all = vec!["explain", "--json"];
    all.extend_from_slice(args);
    let out = daemon::tailgate(&t.gw, &t.pins, &all).unwrap();
    assert!(out.status.success(), "explain {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn counter(t: &Tailnet, name: &str) -> u64 {
    daemon::status(&t.gw, &t.pins)["counters"][name].as_u64().unwrap_or(0)
}

/// Sends `count` datagrams from `src` in the LAN to the gateway's `dst:port`; whether one
/// arrived.
fn udp_arrives(t: &Tailnet, src: &str, dst: &str, port: u16) -> bool {
    let at = SocketAddr::new(dst.parse().unwrap(), port);
    let socket = t.gw.enter(move || Ok(UdpSocket::bind(at)?)).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    t.lan.send_udp(src, dst, port, 3).unwrap();
    let mut buf = [0u8; 64];
    socket.recv_from(&mut buf).is_ok()
}

#[test]
fn refused_when_nothing_is_in_force() {
    let ns = tailgate_tests::netns::Netns::new("tg-gw").unwrap();
    let pins = daemon::PinDir::new(&ns);
    let args = ["explain", "--in", "lo", "--src", "127.0.0.1", "--dst", "127.0.0.1", "--dport", "22"];
    let out = daemon::tailgate(&ns, &pins, &args).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing is in force"), "{stderr}");
}

on_both_backends!(
    cgnat_source_dropped_by_the_builtin_rule,
    exempt_source_delivered_by_its_config_field,
    subnet_route_marked_masqueraded_and_clamped,
    service_sent_to_its_backend,
);

fn cgnat_source_dropped_by_the_builtin_rule(backend: &str) {
    let (t, _daemon) = setup(backend);
    let e = explain(
        &t,
        &["--in", "eth0", "--proto", "udp", "--src", LAN_CGNAT, "--dst", GW_CGNAT, "--dport", "5353"],
    );
    assert_eq!(e["verdict"], "drop", "{e:#}");
    assert_eq!(e["reason"], "uplink_drop", "{e:#}");
    assert_eq!(e["rule"]["prefix"], "100.64.0.0/10", "{e:#}");
    assert_eq!(e["rule"]["origin"], "builtin: CGNAT range", "{e:#}");
    assert_eq!(e["rule"]["verdict"], "drop");

    let drops = counter(&t, "uplink_drop");
    assert!(!udp_arrives(&t, LAN_CGNAT, GW_CGNAT, 5353), "the real packet was not dropped");
    assert!(
        wait::until(Duration::from_secs(5), || counter(&t, "uplink_drop") >= drops + 3),
        "the drops were not counted where explain says"
    );
}

fn exempt_source_delivered_by_its_config_field(backend: &str) {
    let (t, _daemon) = setup(backend);
    let e = explain(
        &t,
        &["--in", "eth0", "--proto", "udp", "--src", LAN_EXEMPT, "--dst", GW_CGNAT, "--dport", "5354"],
    );
    assert_eq!(e["verdict"], "deliver", "{e:#}");
    assert_eq!(e["reason"], "uplink_pass_rule", "{e:#}");
    assert_eq!(e["rule"]["prefix"], "100.64.0.128/25", "{e:#}");
    assert_eq!(e["rule"]["origin"], "cgnat.allow[0]", "{e:#}");
    assert_eq!(e["rule"]["verdict"], "pass");
    assert!(udp_arrives(&t, LAN_EXEMPT, GW_CGNAT, 5354), "the real packet did not arrive");
}

fn subnet_route_marked_masqueraded_and_clamped(backend: &str) {
    let (t, _daemon) = setup(backend);
    let flows_before = live_flows(&t, backend);
    // Counters only this packet would move (the tunnel and the LAN carry neighbour
    // discovery meanwhile).
    let own = ["flow_created", "masquerade_new", "masqueraded", "tunnel_in_mss_clamped"];
    let counters_before: Vec<u64> = own.iter().map(|c| counter(&t, c)).collect();
    let e = explain(
        &t,
        &["--in", "tun0", "--src", PEER, "--dst", LAN, "--dport", "8001", "--flags", "syn", "--mss", "1460"],
    );
    assert_eq!(e["verdict"], "forward", "{e:#}");
    assert_eq!(e["out"], "eth0", "{e:#}");
    assert_eq!(e["mark"].as_u64().unwrap() & 0xff0000, 0x40000, "{e:#}");
    assert_eq!(e["mss"], serde_json::json!([1460, 1240]), "{e:#}");
    assert_eq!(e["result"]["src"], GW_LAN, "{e:#}");
    assert_eq!(e["result"]["dst"], LAN, "{e:#}");
    if backend == "bpf" {
        assert_eq!(e["result"]["checksums_ok"], true, "{e:#}");
        let created: Vec<&Value> =
            e["flows"].as_array().unwrap().iter().filter(|f| f["change"] == "created").collect();
        assert!(!created.is_empty(), "the masquerade's flow entries: {e:#}");
        // Nothing live changed: explaining ran on copies.
        assert_eq!(live_flows(&t, backend), flows_before);
        assert_eq!(own.iter().map(|c| counter(&t, c)).collect::<Vec<_>>(), counters_before);
    }

    // The same as text, for people.
    let args = ["explain", "--in", "tun0", "--src", PEER, "--dst", LAN, "--dport", "8001"];
    let text = String::from_utf8(daemon::tailgate(&t.gw, &t.pins, &args).unwrap().stdout).unwrap();
    println!("{text}");
    for line in [
        "verdict: forward out eth0",
        "mss:     1460 -> 1240",
        "nat:     source 100.101.2.3:40000 -> 192.0.2.1:",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }

    // The masquerade's source is the kernel's choice for the destination (the LAN device
    // has two addresses).
    let udp = explain(
        &t,
        &["--in", "tun0", "--proto", "udp", "--src", PEER, "--dst", LAN_CGNAT, "--dport", "9010"],
    );
    let seen = t.udp_source(PEER, LAN_CGNAT, 9010).unwrap().expect("the datagram did not arrive");
    assert_eq!(seen.to_string(), udp["result"]["src"].as_str().unwrap(), "{udp:#}");

    let c = t.connect(LAN, 8001).unwrap();
    assert_eq!(c.seen_from.to_string(), e["result"]["src"].as_str().unwrap(), "masquerade source");
    assert!(c.lan_mss <= 1240, "the LAN host's MSS {} is above the explained clamp", c.lan_mss);

    if backend == "bpf" {
        // A segment of the connection now open matches its flow entries.
        let port = connection_port(&t);
        let e = explain(
            &t,
            &[
                "--in",
                "tun0",
                "--src",
                PEER,
                "--sport",
                &port.to_string(),
                "--dst",
                LAN,
                "--dport",
                "8001",
                "--flags",
                "ack",
            ],
        );
        assert_eq!(e["verdict"], "forward", "{e:#}");
        assert!(e["flows"].as_array().unwrap().iter().any(|f| f["change"] == "matched"), "{e:#}");
    }
}

fn service_sent_to_its_backend(backend: &str) {
    let (t, _daemon) = setup(backend);
    let e = explain(&t, &["--in", "tun0", "--src", PEER, "--dst", "100.101.0.99", "--dport", "80"]);
    assert_eq!(e["verdict"], "forward", "{e:#}");
    assert_eq!(e["out"], "eth0", "{e:#}");
    assert_eq!(e["result"]["dst"], "192.0.2.2", "{e:#}");
    assert_eq!(e["result"]["dport"], 8080, "{e:#}");
    assert_eq!(e["result"]["src"], GW_LAN, "{e:#}");

    let backend_at: SocketAddr = BACKEND.parse().unwrap();
    let listener = t.lan.enter(move || Ok(TcpListener::bind(backend_at)?)).unwrap();
    let service: SocketAddr = SERVICE.parse().unwrap();
    let _client =
        t.peer.enter(move || Ok(TcpStream::connect_timeout(&service, Duration::from_secs(5))?)).unwrap();
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    assert!(poll(&mut fds, PollTimeout::from(5000u16)).unwrap() > 0, "no connection reached the backend");
    let (_, seen) = listener.accept().unwrap();
    assert_eq!(seen.ip().to_string(), e["result"]["src"].as_str().unwrap());
}

/// The live flow tables (BPF), without ages.
fn live_flows(t: &Tailnet, backend: &str) -> Vec<String> {
    if backend != "bpf" {
        return Vec::new();
    }
    let out = daemon::tailgate(&t.gw, &t.pins, &["flows", "--json"]).unwrap();
    let flows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut keys: Vec<String> = flows
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            format!(
                "{} {} {}:{} {}:{} {}",
                f["zone"], f["proto"], f["src"], f["sport"], f["dst"], f["dport"], f["state"]
            )
        })
        .collect();
    keys.sort();
    keys
}

/// The peer's port of the one TCP connection from the tunnel in the flow table.
fn connection_port(t: &Tailnet) -> u16 {
    let out = daemon::tailgate(&t.gw, &t.pins, &["flows", "--json"]).unwrap();
    let flows: Value = serde_json::from_slice(&out.stdout).unwrap();
    flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["src"] == PEER && f["dport"] == 8001)
        .and_then(|f| f["sport"].as_u64())
        .unwrap_or_else(|| panic!("no flow of the connection: {flows:#}")) as u16
}
