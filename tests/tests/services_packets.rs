//! Services on crafted packets through BPF_PROG_TEST_RUN, with maps filled by the real map
//! sync: DNAT to the backend the Maglev table names for the flow, the reply translated back,
//! checksums (TCP, UDP, UDP without checksum, IPv6) checked by etherparse, an established
//! flow keeping its backend across a table swap, a removed backend's flows balanced again,
//! traffic that is not for a service left alone.

use std::{collections::HashMap, net::SocketAddr};

use tailgate::{
    backend::bpf::{Datapath, Hook},
    config::Config,
    policy::services::table,
};
use tailgate_abi::{
    conntrack::{proto, zone},
    counters::Counter,
    services::{flow_hash4, flow_hash6},
};
use tailgate_tests::{
    packets::*,
    testrun::{self, TCX_NEXT},
};

const PEER: &str = "100.101.2.3";
const PEER6: &str = "fd7a:115c:a1e0::3";
const VIP: &str = "100.101.102.103";
const VIP6: &str = "fd7a:115c:a1e0::99";

const SERVICES: &str = r#"
tunnel = "tun0"
[[service]]
name = "web"
listen = "100.101.102.103:80"
backends = ["192.0.2.11:8080", "192.0.2.12:8080", { address = "192.0.2.13:8080", weight = 2 }]
[[service]]
name = "dns"
listen = "100.101.102.103:53"
protocol = "udp"
backends = ["192.0.2.21:5353"]
[[service]]
name = "web6"
listen = "[fd7a:115c:a1e0::99]:80"
backends = ["[2001:db8::11]:8080", "[2001:db8::12]:8080"]
"#;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Runs a services program; returns its verdict and the packet as it left.
fn run(dp: &mut Datapath, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
    let out = testrun::run_tunnel(dp, hook, frame, 0, 0).unwrap();
    (out.verdict, out.frame)
}

/// From the tunnel to a service: the packet as it left, checked to be passed on.
fn dnat(dp: &mut Datapath, frame: &[u8]) -> Transport {
    let (verdict, out) = run(dp, Hook::ServiceIn, frame);
    assert_eq!(verdict, TCX_NEXT, "passed on to the tunnel's own program");
    transport(&out).unwrap()
}

/// Into the tunnel from a backend: the packet as it left.
fn reverse(dp: &mut Datapath, frame: &[u8]) -> Transport {
    let (verdict, out) = run(dp, Hook::ServiceOut, frame);
    assert_eq!(verdict, TCX_NEXT);
    transport(&out).unwrap()
}

/// The backend the service's table names for a flow (computed here from the config).
fn expected(config: &str, service: usize, src: SocketAddr, dst: SocketAddr, proto: u8) -> SocketAddr {
    let config = Config::parse(config, &HashMap::new()).unwrap();
    let service = &config.services[service];
    let table = table(service);
    let hash = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            flow_hash4(u32::from(*s.ip()), u32::from(*d.ip()), s.port(), d.port(), proto)
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            let words = |a: std::net::Ipv6Addr| {
                let o = a.octets();
                [0, 4, 8, 12].map(|i| u32::from_be_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
            };
            flow_hash6(words(*s.ip()), words(*d.ip()), s.port(), d.port(), proto)
        }
        _ => unreachable!(),
    };
    service.backends[table[(hash % table.len() as u32) as usize] as usize].address
}

fn counted(dp: &mut Datapath, f: impl FnOnce(&mut Datapath)) -> HashMap<Counter, u64> {
    let before = testrun::counters(dp).unwrap();
    f(dp);
    let after = testrun::counters(dp).unwrap();
    Counter::ALL.into_iter().filter(|c| after[c] != before[c]).map(|c| (c, after[&c] - before[&c])).collect()
}

#[test]
fn a_tcp_connection_goes_to_the_tables_backend_and_its_replies_come_back_from_the_service() {
    let mut dp = testrun::datapath(SERVICES).unwrap();
    let (client, vip) = (sa(&format!("{PEER}:40000")), sa(&format!("{VIP}:80")));
    let backend = expected(SERVICES, 0, client, vip, proto::TCP);
    let syn = tcp(PEER, VIP, 40000, 80, Tcp::Syn);
    let c = counted(&mut dp, |dp| {
        let out = dnat(dp, &syn);
        assert_eq!((out.src, out.dst), (client, backend), "to the table's backend, source kept");
        assert!(out.checksums_ok, "checksums updated");
    });
    assert_eq!(
        c,
        HashMap::from([
            (Counter::ServiceBalanced, 1),
            (Counter::ServiceDnat, 1),
            (Counter::FlowLookups, 1),
            (Counter::FlowCreated, 2)
        ])
    );
    // Both entries: the original tuple with the backend, the translated one with the VIP.
    let flows = testrun::flows4(&dp).unwrap();
    let original = flows.iter().find(|(k, _)| k.zone == zone::DNAT).expect("the flow");
    assert_eq!(
        (original.0.src, original.0.dst, original.0.sport, original.0.dport),
        ([100, 101, 2, 3], [100, 101, 102, 103], 40000, 80)
    );
    assert_eq!(
        (&original.1.nat.addr[..4], original.1.nat.port),
        (&backend_octets(backend)[..], backend.port())
    );
    let reply = flows.iter().find(|(k, _)| k.zone == zone::DNAT_REPLY).expect("the reply entry");
    assert_eq!((reply.0.dst, reply.0.dport), (backend_octets(backend), backend.port()));
    assert_eq!((&reply.1.nat.addr[..4], reply.1.nat.port), (&[100, 101, 102, 103][..], 80));

    // The backend's SYN-ACK leaves into the tunnel from the service's address.
    let b = backend.ip().to_string();
    let syn_ack = tcp(&b, PEER, backend.port(), 40000, Tcp::SynAck);
    let c = counted(&mut dp, |dp| {
        let out = reverse(dp, &syn_ack);
        assert_eq!((out.src, out.dst), (vip, client));
        assert!(out.checksums_ok);
    });
    assert_eq!(c, HashMap::from([(Counter::ServiceReverseNat, 1), (Counter::FlowLookups, 1)]));
    // Data both ways keeps the pair.
    for _ in 0..3 {
        assert_eq!(dnat(&mut dp, &tcp(PEER, VIP, 40000, 80, Tcp::Data)).dst, backend);
        assert_eq!(reverse(&mut dp, &tcp(&b, PEER, backend.port(), 40000, Tcp::Data)).src, vip);
    }
}

fn backend_octets(a: SocketAddr) -> [u8; 4] {
    match a {
        SocketAddr::V4(a) => a.ip().octets(),
        _ => panic!("IPv4 expected"),
    }
}

#[test]
fn flows_spread_over_the_backends_by_weight_and_each_goes_where_the_table_says() {
    let mut dp = testrun::datapath(SERVICES).unwrap();
    let vip = sa(&format!("{VIP}:80"));
    let mut per_backend: HashMap<SocketAddr, u32> = HashMap::new();
    for port in 20_000..22_000u16 {
        let client = sa(&format!("{PEER}:{port}"));
        let out = dnat(&mut dp, &tcp(PEER, VIP, port, 80, Tcp::Syn));
        assert_eq!(out.dst, expected(SERVICES, 0, client, vip, proto::TCP), "port {port}");
        *per_backend.entry(out.dst).or_default() += 1;
    }
    // Weights 1:1:2 of 2,000 flows, within 10 %.
    for (backend, share) in
        [("192.0.2.11:8080", 500.0), ("192.0.2.12:8080", 500.0), ("192.0.2.13:8080", 1000.0)]
    {
        let got = f64::from(per_backend[&sa(backend)]);
        assert!(
            (got - share).abs() < share * 0.1,
            "{backend}: {got} of 2,000 (want ~{share}): {per_backend:?}"
        );
    }
}

#[test]
fn udp_checksums_are_updated_and_a_missing_one_stays_missing() {
    let mut dp = testrun::datapath(SERVICES).unwrap();
    let vip = sa(&format!("{VIP}:53"));
    let backend = sa("192.0.2.21:5353");
    let out = dnat(&mut dp, &udp(PEER, VIP, 5000, 53));
    assert_eq!((out.dst, out.checksums_ok, out.no_udp_checksum), (backend, true, false));
    let back = reverse(&mut dp, &udp("192.0.2.21", PEER, 5353, 5000));
    assert_eq!((back.src, back.checksums_ok), (vip, true));
    // No checksum (IPv4 allows it): none after the rewrite either.
    let out = dnat(&mut dp, &without_udp_checksum(udp(PEER, VIP, 5001, 53)));
    assert_eq!((out.dst, out.no_udp_checksum), (backend, true));
    let back = reverse(&mut dp, &without_udp_checksum(udp("192.0.2.21", PEER, 5353, 5001)));
    assert_eq!((back.src, back.no_udp_checksum, back.checksums_ok), (vip, true, true));
}

#[test]
fn ipv6_services_translate_both_ways_with_valid_checksums() {
    let mut dp = testrun::datapath(SERVICES).unwrap();
    let (client, vip) = (sa(&format!("[{PEER6}]:40000")), sa(&format!("[{VIP6}]:80")));
    let backend = expected(SERVICES, 2, client, vip, proto::TCP);
    let out = dnat(&mut dp, &tcp(PEER6, VIP6, 40000, 80, Tcp::Syn));
    assert_eq!((out.src, out.dst, out.checksums_ok), (client, backend, true));
    let back = reverse(&mut dp, &tcp(&backend.ip().to_string(), PEER6, backend.port(), 40000, Tcp::SynAck));
    assert_eq!((back.src, back.dst, back.checksums_ok), (vip, client, true));
    assert_eq!(testrun::flows6(&dp).unwrap().len(), 2);
}

#[test]
fn an_established_flow_keeps_its_backend_when_the_table_changes_and_moves_when_its_backend_goes() {
    let mut dp = testrun::datapath(SERVICES).unwrap();
    let vip = sa(&format!("{VIP}:80"));
    // A flow per backend, opened under the first table.
    let mut flows: HashMap<SocketAddr, u16> = HashMap::new();
    for port in 30_000..30_100u16 {
        let out = dnat(&mut dp, &tcp(PEER, VIP, port, 80, Tcp::Syn));
        flows.entry(out.dst).or_insert(port);
    }
    assert_eq!(flows.len(), 3);
    // Two more backends: the table changes (many slots move), established flows stay.
    let grown = SERVICES.replace(
        r#"{ address = "192.0.2.13:8080", weight = 2 }]"#,
        r#"{ address = "192.0.2.13:8080", weight = 2 }, "192.0.2.14:8080", "192.0.2.15:8080"]"#,
    );
    testrun::sync(&mut dp, &grown).unwrap();
    let moved_in_table = (30_000..30_100u16)
        .filter(|&p| {
            let c = sa(&format!("{PEER}:{p}"));
            expected(SERVICES, 0, c, vip, proto::TCP) != expected(&grown, 0, c, vip, proto::TCP)
        })
        .count();
    assert!(moved_in_table > 0, "the new table sends some of these flows elsewhere");
    for (&backend, &port) in &flows {
        assert_eq!(dnat(&mut dp, &tcp(PEER, VIP, port, 80, Tcp::Data)).dst, backend, "port {port}");
    }
    // A new flow follows the new table.
    let client = sa(&format!("{PEER}:31000"));
    assert_eq!(
        dnat(&mut dp, &tcp(PEER, VIP, 31000, 80, Tcp::Syn)).dst,
        expected(&grown, 0, client, vip, proto::TCP)
    );

    // 192.0.2.11 leaves: its flow is balanced again (by the new table), the others stay.
    let shrunk = grown.replace(r#""192.0.2.11:8080", "#, "");
    testrun::sync(&mut dp, &shrunk).unwrap();
    let gone = sa("192.0.2.11:8080");
    let port = flows[&gone];
    let c = counted(&mut dp, |dp| {
        let out = dnat(dp, &tcp(PEER, VIP, port, 80, Tcp::Data));
        let client = sa(&format!("{PEER}:{port}"));
        assert_eq!(out.dst, expected(&shrunk, 0, client, vip, proto::TCP));
        assert_ne!(out.dst, gone);
    });
    assert_eq!(c.get(&Counter::ServiceRebalanced), Some(&1), "{c:?}");
    for (&backend, &port) in flows.iter().filter(|(b, _)| **b != gone) {
        assert_eq!(dnat(&mut dp, &tcp(PEER, VIP, port, 80, Tcp::Data)).dst, backend);
    }
    // Two table changes later, one table per service: the replaced ones were freed.
    assert_eq!(testrun::service_tables(&dp).unwrap(), 3);
}

#[test]
fn traffic_not_for_a_service_is_left_alone() {
    let mut dp = testrun::datapath(SERVICES).unwrap();
    for frame in [
        tcp(PEER, VIP, 40000, 81, Tcp::Syn),         // another port
        udp(PEER, VIP, 40000, 80),                   // another protocol
        tcp(PEER, "192.0.2.2", 40000, 80, Tcp::Syn), // another address
        echo(PEER, VIP, 7, false),                   // not TCP/UDP
        tcp(PEER6, "2001:db8::2", 40000, 80, Tcp::Syn),
        eth_fragment4(PEER, VIP),
    ] {
        let c = counted(&mut dp, |dp| {
            let (verdict, out) = run(dp, Hook::ServiceIn, &frame);
            assert_eq!(verdict, TCX_NEXT);
            assert_eq!(out, frame, "untouched");
        });
        assert!(c.keys().all(|k| *k == Counter::FlowLookups), "{c:?}");
    }
    // A packet into the tunnel that answers nothing: untouched.
    let frame = tcp("192.0.2.11", PEER, 8080, 40000, Tcp::SynAck);
    let (verdict, out) = run(&mut dp, Hook::ServiceOut, &frame);
    assert_eq!((verdict, out), (TCX_NEXT, frame));
    assert!(testrun::flows4(&dp).unwrap().is_empty());
}

/// ICMP errors about what a flow sent to its backend reach the client as errors about what
/// it sent to the service: the quote is byte for byte the client's packet (checksums
/// included), the error's checksum is right, and an error the backend itself sent comes
/// from the service's address (one from a router on the way keeps the router's).
#[test]
fn icmp_errors_about_a_flow_are_translated_back() {
    let mut dp = testrun::datapath(SERVICES).unwrap();
    // UDP to the DNS service: the backend answers port unreachable, quoting 8 bytes.
    let sent = udp(PEER, VIP, 5000, 53);
    dnat(&mut dp, &sent);
    let as_received = udp(PEER, "192.0.2.21", 5000, 5353);
    let error = icmp_error_quoting("192.0.2.21", PEER, &quote_of(&as_received, 8), false);
    let c = counted(&mut dp, |dp| {
        let (verdict, out) = run(dp, Hook::ServiceOut, &error);
        assert_eq!(verdict, TCX_NEXT);
        let got = icmp_error(&out).unwrap();
        assert_eq!(got.src, VIP.parse::<std::net::IpAddr>().unwrap(), "from the service's address");
        assert!(got.checksum_ok, "the error's checksum");
        assert_eq!(got.quote, quote_of(&sent, 8), "the quote is the client's packet");
    });
    assert_eq!(c.get(&Counter::ServiceIcmpTranslated), Some(&1), "{c:?}");

    // TCP: a router on the way says "fragmentation needed", quoting the whole header.
    let syn = tcp(PEER, VIP, 41000, 80, Tcp::Syn);
    let backend = dnat(&mut dp, &syn).dst;
    let as_received = tcp(PEER, &backend.ip().to_string(), 41000, backend.port(), Tcp::Syn);
    let error = icmp_error_quoting("192.0.2.254", PEER, &quote_of(&as_received, 20), true);
    let got = icmp_error(&run(&mut dp, Hook::ServiceOut, &error).1).unwrap();
    assert_eq!(
        got.src,
        "192.0.2.254".parse::<std::net::IpAddr>().unwrap(),
        "a router's error keeps its source"
    );
    assert!(got.checksum_ok);
    assert_eq!(got.quote, quote_of(&syn, 20), "the quote, TCP checksum included, is the client's SYN");

    // IPv6: packet too big from the backend, the whole segment quoted.
    let syn = tcp(PEER6, VIP6, 42000, 80, Tcp::Syn);
    let backend = dnat(&mut dp, &syn).dst;
    let b = backend.ip().to_string();
    let as_received = tcp(PEER6, &b, 42000, backend.port(), Tcp::Syn);
    let error = icmp_error_quoting(&b, PEER6, &quote_of(&as_received, 20), true);
    let got = icmp_error(&run(&mut dp, Hook::ServiceOut, &error).1).unwrap();
    assert_eq!(got.src, VIP6.parse::<std::net::IpAddr>().unwrap());
    assert!(got.checksum_ok, "ICMPv6 checksum (pseudo-header with the new source)");
    assert_eq!(got.quote, quote_of(&syn, 20));

    // An error about a packet no flow sent: untouched.
    let stranger = tcp(PEER, "192.0.2.99", 43000, 80, Tcp::Syn);
    let error = icmp_error_quoting("192.0.2.99", PEER, &quote_of(&stranger, 8), false);
    assert_eq!(run(&mut dp, Hook::ServiceOut, &error), (TCX_NEXT, error.clone()));
}

/// The ingress proxy: TCP, UDP and ping for the gateway's tailnet address (100.101.0.1 in
/// the test runs) go to the destination, ports kept, and their replies come back from the
/// gateway's address; services keep their own addresses.
#[test]
fn the_ingress_proxy_sends_the_gateways_tailnet_traffic_to_its_destination_ports_kept() {
    let config = format!("{SERVICES}[proxy]\ningress_to = \"192.0.2.10\"\n");
    let mut dp = testrun::datapath(&config).unwrap();
    let own = "100.101.0.1";
    for (port, frame, back) in [
        (2222, tcp(PEER, own, 40000, 2222, Tcp::Syn), tcp("192.0.2.10", PEER, 2222, 40000, Tcp::SynAck)),
        (53, udp(PEER, own, 5000, 53), udp("192.0.2.10", PEER, 53, 5000)),
    ] {
        let out = dnat(&mut dp, &frame);
        assert_eq!(out.dst, sa(&format!("192.0.2.10:{port}")), "ports kept");
        assert!(out.checksums_ok);
        let back = reverse(&mut dp, &back);
        assert_eq!((back.src, back.checksums_ok), (sa(&format!("{own}:{port}")), true));
    }
    // Later packets of the connection stay on it (not balanced again: the port-0 backend).
    let c = counted(&mut dp, |dp| {
        assert_eq!(dnat(dp, &tcp(PEER, own, 40000, 2222, Tcp::Data)).dst, sa("192.0.2.10:2222"));
    });
    assert_eq!(c.get(&Counter::ServiceRebalanced), None, "{c:?}");
    // A service is still a service.
    assert_eq!(dnat(&mut dp, &udp(PEER, VIP, 5000, 53)).dst, sa("192.0.2.21:5353"));
    // Ping (IPv4 and IPv6): the echo goes on, its reply comes back from the gateway.
    for (own, peer, to) in [(own, PEER, "192.0.2.10"), ("fd7a:115c:a1e0::1", PEER6, "2001:db8::10")] {
        let config = format!("{SERVICES}[proxy]\ningress_to = \"{to}\"\n");
        let mut dp = testrun::datapath(&config).unwrap();
        let (verdict, out) = run(&mut dp, Hook::ServiceIn, &echo(peer, own, 7, false));
        let sent = icmp_error(&out).unwrap();
        assert_eq!((verdict, sent.dst, sent.checksum_ok), (TCX_NEXT, to.parse().unwrap(), true), "{own}");
        let (_, out) = run(&mut dp, Hook::ServiceOut, &echo(to, peer, 7, true));
        let back = icmp_error(&out).unwrap();
        assert_eq!((back.src, back.checksum_ok), (own.parse().unwrap(), true), "{own}");
    }
    // Without the proxy, the gateway's address is the gateway's.
    let mut plain = testrun::datapath(SERVICES).unwrap();
    let frame = tcp(PEER, own, 40001, 2222, Tcp::Syn);
    assert_eq!(run(&mut plain, Hook::ServiceIn, &frame), (TCX_NEXT, frame.clone()));
}

/// Two services sending the same client port to the same backend would share the
/// translated tuple: the second flow is refused (as conntrack refuses a clashing tuple) and
/// the first keeps its replies.
#[test]
fn a_flow_whose_translated_tuple_is_taken_is_refused() {
    let config = r#"
        tunnel = "tun0"
        [[service]]
        listen = "100.101.102.103:80"
        backends = ["192.0.2.11:8080"]
        [[service]]
        listen = "100.101.102.104:80"
        backends = ["192.0.2.11:8080"]
    "#;
    let mut dp = testrun::datapath(config).unwrap();
    assert_eq!(dnat(&mut dp, &tcp(PEER, VIP, 40000, 80, Tcp::Syn)).dst, sa("192.0.2.11:8080"));
    let c = counted(&mut dp, |dp| {
        let (verdict, _) = run(dp, Hook::ServiceIn, &tcp(PEER, "100.101.102.104", 40000, 80, Tcp::Syn));
        assert_eq!(verdict, tailgate_tests::testrun::TC_ACT_SHOT);
    });
    assert_eq!(c.get(&Counter::ServiceDrop), Some(&1), "{c:?}");
    assert_eq!(
        reverse(&mut dp, &tcp("192.0.2.11", PEER, 8080, 40000, Tcp::SynAck)).src,
        sa(&format!("{VIP}:80"))
    );
    // Another client port is fine.
    assert_eq!(dnat(&mut dp, &tcp(PEER, "100.101.102.104", 40001, 80, Tcp::Syn)).dst, sa("192.0.2.11:8080"));
}

/// The forward entry learns of replies: an answered UDP flow is established (120 s, not
/// 30 s), a backend's RST closes the flow; a rebalanced flow's overwritten entry is not
/// counted as created (status derives evictions from the count); a backend id handed out
/// again for the same address in another service does not keep a flow on it.
#[test]
fn replies_reach_the_forward_entry_and_backend_ids_are_checked_against_their_service() {
    use tailgate_abi::conntrack::state;
    let mut dp = testrun::datapath(SERVICES).unwrap();
    let forward = |dp: &Datapath, sport: u16| {
        let flows = testrun::flows4(dp).unwrap();
        flows.into_iter().find(|(k, _)| k.zone == zone::DNAT && k.sport == sport).map(|(_, f)| f.state)
    };
    dnat(&mut dp, &udp(PEER, VIP, 6000, 53));
    assert_eq!(forward(&dp, 6000), Some(state::NEW));
    reverse(&mut dp, &udp("192.0.2.21", PEER, 5353, 6000));
    assert_eq!(forward(&dp, 6000), Some(state::ESTABLISHED), "answered");

    let backend = dnat(&mut dp, &tcp(PEER, VIP, 41000, 80, Tcp::Syn)).dst;
    let b = backend.ip().to_string();
    reverse(&mut dp, &tcp(&b, PEER, backend.port(), 41000, Tcp::SynAck));
    dnat(&mut dp, &tcp(PEER, VIP, 41000, 80, Tcp::Data));
    assert_eq!(forward(&dp, 41000), Some(state::ESTABLISHED));
    reverse(&mut dp, &tcp(&b, PEER, backend.port(), 41000, Tcp::Rst));
    assert_eq!(forward(&dp, 41000), Some(state::CLOSED), "the backend's RST");

    // The flow's backend leaves; its id is then handed out for the same address in
    // another service (as after a restart): the flow is balanced again, once, and only the
    // new reply entry counts as created.
    let without = SERVICES.replace(&format!("\"{backend}\", "), "").replace(&format!(", \"{backend}\""), "");
    let without =
        without.replace(&format!("{{ address = \"{backend}\", weight = 2 }}"), "\"192.0.2.14:8080\"");
    assert_ne!(without, SERVICES);
    let flow =
        testrun::flows4(&dp).unwrap().into_iter().find(|(k, _)| k.zone == zone::DNAT && k.sport == 41000);
    let id = flow.unwrap().1.nat.backend;
    testrun::sync(&mut dp, &without).unwrap();
    testrun::reuse_backend_id(&mut dp, id, backend, "100.101.102.104:80").unwrap();
    let c = counted(&mut dp, |dp| {
        assert_ne!(dnat(dp, &tcp(PEER, VIP, 41000, 80, Tcp::Syn)).dst, backend, "not kept on a reused id");
    });
    assert_eq!(c.get(&Counter::ServiceRebalanced), Some(&1), "{c:?}");
    assert_eq!(c.get(&Counter::FlowCreated), Some(&1), "only the new reply entry: {c:?}");
}

/// A change that needs more backend ids than are free is refused and hands back the ids it
/// took: a smaller change after it works.
#[test]
fn a_change_refused_for_want_of_backend_ids_leaves_them_free() {
    // 330 services of 100 backends each: 33,000 ids; another 33,000 for the next config do
    // not fit next to them (both generations need theirs during a change).
    let many = |port: u16| {
        let mut s = String::from("tunnel = \"tun0\"\n");
        for i in 0..330 {
            let list: Vec<String> =
                (0..100).map(|j| format!("\"10.{}.{}.{}:8080\"", i / 256, i % 256, j + 1)).collect();
            s += &format!(
                "[[service]]\nlisten = \"100.100.{}.{}:{port}\"\ntable_size = 1009\nbackends = [{}]\n",
                i / 256,
                i % 256,
                list.join(",")
            );
        }
        s
    };
    let (a, b) = (many(80), many(81));
    let mut dp = testrun::datapath(&a).unwrap();
    let err = testrun::sync(&mut dp, &b).unwrap_err();
    assert!(format!("{err:#}").contains("no free backend id"), "{err:#}");
    assert_eq!(testrun::backend_ids(&dp).unwrap(), 33_000, "the refused change's ids are free again");
    let c = a.replacen("\"10.0.0.1:8080\"", "\"10.250.0.1:8080\"", 1);
    testrun::sync(&mut dp, &c).unwrap();
    assert_eq!(testrun::backend_ids(&dp).unwrap(), 33_000);
}
