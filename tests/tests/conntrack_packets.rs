//! The flow table on crafted packets through BPF_PROG_TEST_RUN: flows created on the owning
//! paths only, replies let through and unsolicited packets dropped, TCP states, expiry, ICMP
//! errors and echo, the stateful filter into the tunnel, a full table; IPv4 and IPv6.

use std::{collections::HashMap, time::Duration};

use tailgate::backend::bpf::{Datapath, Hook};
use tailgate_abi::{
    conntrack::{state, zone},
    counters::Counter,
};
use tailgate_tests::{
    packets::*,
    testrun::{self, TCX_NEXT, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS},
};

/// One family's addresses: the gateway's uplink address, a host in a filtered range (a
/// cloud DNS in CGNAT space; a ULA host), a router in the filtered range, a host outside.
struct Family {
    gw: &'static str,
    host: &'static str,
    router: &'static str,
    outside: &'static str,
    peer: &'static str,
    lan: &'static str,
}

const V4: Family = Family {
    gw: "192.0.2.1",
    host: "100.100.2.136",
    router: "100.64.9.9",
    outside: "198.51.100.7",
    peer: "100.101.2.3",
    lan: "192.0.2.2",
};
const V6: Family = Family {
    gw: "2001:db8::1",
    host: "fd7a:115c:a1e0::99",
    router: "fd7a:115c:a1e0::9",
    outside: "2001:db8:5::7",
    peer: "fd7a:115c:a1e0::3",
    lan: "2001:db8::2",
};
const FAMILIES: [(&str, Family); 2] = [("IPv4", V4), ("IPv6", V6)];

/// The ifindex a forwarded packet came in on.
const FROM_LAN: u32 = 7;
/// The test runs' device (`lo`): the uplink and the tunnel of every test run.
const DEVICE: u32 = 1;

/// Counter changes while `f` runs.
fn counted(dp: &mut Datapath, f: impl FnOnce(&mut Datapath)) -> HashMap<Counter, u64> {
    let before = testrun::counters(dp).unwrap();
    f(dp);
    let after = testrun::counters(dp).unwrap();
    Counter::ALL.into_iter().filter(|c| after[c] != before[c]).map(|c| (c, after[&c] - before[&c])).collect()
}

fn want(counters: &[(Counter, u64)]) -> HashMap<Counter, u64> {
    counters.iter().copied().collect()
}

/// The gateway sends `frame` out of the uplink.
fn out(dp: &mut Datapath, frame: &[u8]) {
    assert_eq!(testrun::run_uplink_egress(dp, frame, 0).unwrap(), TCX_NEXT, "uplink egress never drops");
}

fn xdp(dp: &mut Datapath, frame: &[u8]) -> u32 {
    testrun::run_xdp(dp, frame).unwrap()
}

/// Flows in both tables: (zone, ifindex, proto, state).
fn flows(dp: &Datapath) -> Vec<(u8, u32, u8, u8)> {
    let v4 = testrun::flows4(dp).unwrap().into_iter().map(|(k, f)| (k.zone, k.ifindex, k.proto, f.state));
    let v6 = testrun::flows6(dp).unwrap().into_iter().map(|(k, f)| (k.zone, k.ifindex, k.proto, f.state));
    v4.chain(v6).collect()
}

#[test]
fn own_flows_are_recorded_at_the_uplink_egress_only_for_local_packets_towards_filtered_addresses() {
    for (name, f) in FAMILIES {
        let mut dp = testrun::datapath("").unwrap();
        let query = udp(f.gw, f.host, 5000, 53);
        let c = counted(&mut dp, |dp| out(dp, &query));
        assert_eq!(c, want(&[(Counter::FlowLookups, 1), (Counter::FlowCreated, 1)]), "{name}");
        assert_eq!(flows(&dp), [(zone::OWN, DEVICE, 17, state::NEW)], "{name}");
        // The next datagram refreshes the flow.
        let c = counted(&mut dp, |dp| out(dp, &query));
        assert_eq!(c, want(&[(Counter::FlowLookups, 1)]), "{name}");
        // Towards an address the policy does not filter: not even a lookup.
        let c = counted(&mut dp, |dp| out(dp, &udp(f.gw, f.outside, 5000, 53)));
        assert_eq!(c, want(&[]), "{name}: non-filtered destination pays nothing");
        // Forwarded traffic is not the gateway's own.
        let c = counted(&mut dp, |dp| {
            testrun::run_uplink_egress(dp, &udp(f.gw, f.host, 5001, 53), FROM_LAN).unwrap();
        });
        assert_eq!(c, want(&[]), "{name}: forwarded");
        // An unsolicited packet from the filtered host creates nothing and is dropped.
        let c = counted(&mut dp, |dp| assert_eq!(xdp(dp, &udp(f.host, f.gw, 53, 5002)), XDP_DROP));
        assert_eq!(c, want(&[(Counter::UplinkDrop, 1), (Counter::FlowLookups, 1)]), "{name}");
        assert_eq!(flows(&dp).len(), 1, "{name}");
        // The answer to a connection from elsewhere (SYN-ACK), a RST, an echo reply: nothing.
        for flags in [Tcp::SynAck, Tcp::Rst] {
            out(&mut dp, &tcp(f.gw, f.host, 40000, 443, flags));
            assert_eq!(flows(&dp).len(), 1, "{name}: {flags:?} opened a flow");
        }
        out(&mut dp, &echo(f.gw, f.host, 7, true));
        assert_eq!(flows(&dp).len(), 1, "{name}: an echo reply opened a flow");
        // A segment of a connection the gateway already has (older than the table: a
        // restart, a re-created uplink) is picked up mid-stream, as established.
        out(&mut dp, &tcp(f.gw, f.host, 40000, 443, Tcp::Data));
        assert!(flows(&dp).contains(&(zone::OWN, DEVICE, 6, state::ESTABLISHED)), "{name}: picked up");
        assert_eq!(xdp(&mut dp, &tcp(f.host, f.gw, 443, 40000, Tcp::Data)), XDP_PASS, "{name}");
    }
    // allow_replies = false: nothing recorded.
    let mut dp = testrun::datapath("[cgnat]\nallow_replies = false").unwrap();
    let c = counted(&mut dp, |dp| out(dp, &udp(V4.gw, V4.host, 5000, 53)));
    assert_eq!(c, want(&[]));
}

#[test]
fn replies_to_own_flows_pass_and_unsolicited_packets_drop() {
    for (name, f) in FAMILIES {
        let mut dp = testrun::datapath("").unwrap();
        let query = udp(f.gw, f.host, 5000, 53);
        out(&mut dp, &query);
        let c = counted(&mut dp, |dp| assert_eq!(xdp(dp, &udp(f.host, f.gw, 53, 5000)), XDP_PASS, "{name}"));
        assert_eq!(c, want(&[(Counter::UplinkPassReply, 1), (Counter::FlowLookups, 1)]), "{name}");
        assert_eq!(flows(&dp), [(zone::OWN, DEVICE, 17, state::ESTABLISHED)], "{name}");
        for (what, frame) in [
            ("another local port", udp(f.host, f.gw, 53, 5001)),
            ("another remote port", udp(f.host, f.gw, 54, 5000)),
            ("another host", udp(f.router, f.gw, 53, 5000)),
            ("same ports, TCP", tcp(f.host, f.gw, 53, 5000, Tcp::SynAck)),
        ] {
            assert_eq!(xdp(&mut dp, &frame), XDP_DROP, "{name}: {what}");
        }

        // Ping: the reply with the request's identifier only; a request is never a reply.
        out(&mut dp, &echo(f.gw, f.host, 7, false));
        assert_eq!(xdp(&mut dp, &echo(f.host, f.gw, 7, true)), XDP_PASS, "{name}: echo reply");
        assert_eq!(xdp(&mut dp, &echo(f.host, f.gw, 8, true)), XDP_DROP, "{name}: other identifier");
        assert_eq!(xdp(&mut dp, &echo(f.host, f.gw, 7, false)), XDP_DROP, "{name}: echo request");

        // TCP: the SYN-ACK answering the gateway's SYN.
        out(&mut dp, &tcp(f.gw, f.host, 40000, 443, Tcp::Syn));
        assert_eq!(xdp(&mut dp, &tcp(f.host, f.gw, 443, 40000, Tcp::SynAck)), XDP_PASS, "{name}: SYN-ACK");
        assert_eq!(xdp(&mut dp, &tcp(f.host, f.gw, 443, 40001, Tcp::SynAck)), XDP_DROP, "{name}");

        // ICMP errors about an own flow (from the host or a router on the way), not about
        // another one.
        let error = port_unreachable(f.router, f.gw, &query);
        let c = counted(&mut dp, |dp| assert_eq!(xdp(dp, &error), XDP_PASS, "{name}: ICMP error"));
        assert_eq!(c, want(&[(Counter::UplinkPassReply, 1), (Counter::FlowLookups, 1)]), "{name}");
        let unknown = port_unreachable(f.host, f.gw, &udp(f.gw, f.host, 5999, 53));
        assert_eq!(xdp(&mut dp, &unknown), XDP_DROP, "{name}: error about no flow");
        let about_ping = port_unreachable(f.router, f.gw, &echo(f.gw, f.host, 7, false));
        assert_eq!(xdp(&mut dp, &about_ping), XDP_PASS, "{name}: error about a ping");
        // An error must go to the quoted packet's sender (as conntrack checks).
        let elsewhere = port_unreachable(f.router, f.lan, &query);
        assert_eq!(xdp(&mut dp, &elsewhere), XDP_DROP, "{name}: error to another address");
        // Sources outside the filtered range pass as before, without a lookup.
        let c = counted(&mut dp, |dp| assert_eq!(xdp(dp, &udp(f.outside, f.gw, 53, 9)), XDP_PASS));
        assert_eq!(c, want(&[(Counter::UplinkPassNoMatch, 1)]), "{name}");
    }
    // allow_replies = false: the reference's drop.
    let mut dp = testrun::datapath("[cgnat]\nallow_replies = false").unwrap();
    out(&mut dp, &udp(V4.gw, V4.host, 5000, 53));
    assert_eq!(xdp(&mut dp, &udp(V4.host, V4.gw, 53, 5000)), XDP_DROP);
}

#[test]
fn tcp_states_follow_the_flags_each_way() {
    for (name, f) in FAMILIES {
        let mut dp = testrun::datapath("").unwrap();
        let state = |dp: &Datapath| flows(dp)[0].3;
        out(&mut dp, &tcp(f.gw, f.host, 40000, 443, Tcp::Syn));
        assert_eq!(state(&dp), state::NEW, "{name}");
        xdp(&mut dp, &tcp(f.host, f.gw, 443, 40000, Tcp::SynAck));
        assert_eq!(state(&dp), state::ESTABLISHED, "{name}");
        out(&mut dp, &tcp(f.gw, f.host, 40000, 443, Tcp::Data));
        assert_eq!(state(&dp), state::ESTABLISHED, "{name}");
        out(&mut dp, &tcp(f.gw, f.host, 40000, 443, Tcp::Fin));
        assert_eq!(state(&dp), state::CLOSING, "{name}");
        // The peer's FIN and RST still belong to the flow.
        assert_eq!(xdp(&mut dp, &tcp(f.host, f.gw, 443, 40000, Tcp::Fin)), XDP_PASS, "{name}");
        assert_eq!(xdp(&mut dp, &tcp(f.host, f.gw, 443, 40000, Tcp::Rst)), XDP_PASS, "{name}");
        assert_eq!(state(&dp), state::CLOSED, "{name}");
        // The port comes round again: a new SYN reopens the tuple.
        out(&mut dp, &tcp(f.gw, f.host, 40000, 443, Tcp::Syn));
        assert_eq!(state(&dp), state::NEW, "{name}");
        assert_eq!(flows(&dp).len(), 1, "{name}");
        let v4 = testrun::flows4(&dp).unwrap();
        if let Some((_, flow)) = v4.first() {
            assert_eq!(flow.flags_reply & 0x07, 0x07, "FIN, SYN and RST seen in the reply direction");
        }
    }
}

#[test]
fn expired_flows_no_longer_let_replies_through() {
    for (name, f) in FAMILIES {
        let mut dp = testrun::datapath("").unwrap();
        // UDP unanswered: 30 s.
        out(&mut dp, &udp(f.gw, f.host, 5000, 53));
        testrun::age_flows(&mut dp, Duration::from_secs(29)).unwrap();
        assert_eq!(xdp(&mut dp, &udp(f.host, f.gw, 53, 5000)), XDP_PASS, "{name}: 29 s old");
        // Answered: 120 s from the last packet.
        testrun::age_flows(&mut dp, Duration::from_secs(119)).unwrap();
        assert_eq!(xdp(&mut dp, &udp(f.host, f.gw, 53, 5000)), XDP_PASS, "{name}: 119 s idle");
        testrun::age_flows(&mut dp, Duration::from_secs(121)).unwrap();
        let c = counted(&mut dp, |dp| assert_eq!(xdp(dp, &udp(f.host, f.gw, 53, 5000)), XDP_DROP, "{name}"));
        assert_eq!(
            c,
            want(&[(Counter::UplinkDrop, 1), (Counter::FlowLookups, 1), (Counter::FlowExpired, 1)]),
            "{name}"
        );
        assert!(flows(&dp).is_empty(), "{name}: the expired entry is deleted");
        // An established TCP flow idle for an hour still answers; one whose handshake was
        // never answered is gone after 120 s.
        out(&mut dp, &tcp(f.gw, f.host, 40000, 443, Tcp::Syn));
        xdp(&mut dp, &tcp(f.host, f.gw, 443, 40000, Tcp::SynAck));
        out(&mut dp, &tcp(f.gw, f.host, 40001, 443, Tcp::Syn));
        testrun::age_flows(&mut dp, Duration::from_secs(3600)).unwrap();
        assert_eq!(xdp(&mut dp, &tcp(f.host, f.gw, 443, 40000, Tcp::Data)), XDP_PASS, "{name}");
        assert_eq!(xdp(&mut dp, &tcp(f.host, f.gw, 443, 40001, Tcp::SynAck)), XDP_DROP, "{name}");
        // On the owning path an expired entry is replaced by a new flow.
        out(&mut dp, &echo(f.gw, f.host, 3, false));
        testrun::age_flows(&mut dp, Duration::from_secs(31)).unwrap();
        let c = counted(&mut dp, |dp| out(dp, &echo(f.gw, f.host, 3, false)));
        assert_eq!(
            c,
            want(&[(Counter::FlowLookups, 1), (Counter::FlowExpired, 1), (Counter::FlowCreated, 1)]),
            "{name}"
        );
        assert_eq!(xdp(&mut dp, &echo(f.host, f.gw, 3, true)), XDP_PASS, "{name}");
    }
}

/// The tunnel programs: `ingress` from the tunnel, `egress` into it from `ingress_ifindex`.
fn from_tunnel(dp: &mut Datapath, frame: &[u8]) {
    assert_eq!(testrun::run_tunnel(dp, Hook::TcIngress, frame, 0, 0).unwrap().verdict, TC_ACT_OK);
}

fn into_tunnel(dp: &mut Datapath, frame: &[u8], ingress_ifindex: u32) -> u32 {
    testrun::run_tunnel(dp, Hook::TcEgress, frame, 0, ingress_ifindex).unwrap().verdict
}

#[test]
fn stateful_forwards_into_the_tunnel_only_flows_opened_from_it() {
    for (name, f) in FAMILIES {
        let mut dp = testrun::datapath("[subnet_routes]\nstateful = true").unwrap();
        let query = udp(f.peer, f.lan, 5000, 53);
        let c = counted(&mut dp, |dp| from_tunnel(dp, &query));
        assert!(c.contains_key(&Counter::FlowCreated), "{name}: {c:?}");
        assert_eq!(flows(&dp), [(zone::TUNNEL, DEVICE, 17, state::NEW)], "{name}");

        let c = counted(&mut dp, |dp| {
            assert_eq!(into_tunnel(dp, &udp(f.lan, f.peer, 53, 5000), FROM_LAN), TCX_NEXT)
        });
        assert_eq!(c, want(&[(Counter::TunnelPassEstablished, 1), (Counter::FlowLookups, 1)]), "{name}");
        let c = counted(&mut dp, |dp| {
            assert_eq!(into_tunnel(dp, &udp(f.lan, f.peer, 53, 5001), FROM_LAN), TC_ACT_SHOT)
        });
        assert_eq!(c, want(&[(Counter::TunnelDropStateful, 1), (Counter::FlowLookups, 1)]), "{name}");
        // A LAN host opening a connection into the tailnet.
        assert_eq!(into_tunnel(&mut dp, &tcp(f.lan, f.peer, 40000, 22, Tcp::Syn), FROM_LAN), TC_ACT_SHOT);
        // Errors about, and echo replies to, flows from the tunnel.
        let error = port_unreachable(f.lan, f.peer, &query);
        assert_eq!(into_tunnel(&mut dp, &error, FROM_LAN), TCX_NEXT, "{name}: ICMP error");
        from_tunnel(&mut dp, &echo(f.peer, f.lan, 9, false));
        assert_eq!(into_tunnel(&mut dp, &echo(f.lan, f.peer, 9, true), FROM_LAN), TCX_NEXT, "{name}");
        assert_eq!(into_tunnel(&mut dp, &echo(f.lan, f.peer, 9, false), FROM_LAN), TC_ACT_SHOT, "{name}");
        // The gateway's own traffic and hairpin traffic are not affected.
        let c = counted(&mut dp, |dp| assert_eq!(into_tunnel(dp, &udp(f.gw, f.peer, 53, 7), 0), TCX_NEXT));
        assert_eq!(c, want(&[(Counter::TunnelPassLocal, 1)]), "{name}");
        assert_eq!(into_tunnel(&mut dp, &udp(f.lan, f.peer, 53, 7), DEVICE), TCX_NEXT, "{name}: hairpin");
    }
    // Off: forwarded traffic passes as before and nothing is recorded.
    let mut dp = testrun::datapath("").unwrap();
    from_tunnel(&mut dp, &udp(V4.peer, V4.lan, 5000, 53));
    assert!(flows(&dp).is_empty());
    assert_eq!(into_tunnel(&mut dp, &tcp(V4.lan, V4.peer, 40000, 22, Tcp::Syn), FROM_LAN), TCX_NEXT);
}

#[test]
fn the_stateful_drop_comes_before_the_prefix_rules() {
    // An exempt CGNAT source forwarded into the tunnel: passes without stateful, needs a
    // flow with it (as in the reference's rule order).
    let exempt = "[cgnat]\nallow = [\"100.100.0.0/16\"]";
    let mut dp = testrun::datapath(exempt).unwrap();
    assert_eq!(into_tunnel(&mut dp, &udp(V4.host, V4.peer, 53, 5000), FROM_LAN), TCX_NEXT);
    let mut dp = testrun::datapath(&format!("{exempt}\n[subnet_routes]\nstateful = true")).unwrap();
    assert_eq!(into_tunnel(&mut dp, &udp(V4.host, V4.peer, 53, 5000), FROM_LAN), TC_ACT_SHOT);
    from_tunnel(&mut dp, &udp(V4.peer, V4.host, 5000, 53));
    assert_eq!(into_tunnel(&mut dp, &udp(V4.host, V4.peer, 53, 5000), FROM_LAN), TCX_NEXT);
    // A filtered source stays dropped even inside a flow (reference rule ts-forward 3).
    from_tunnel(&mut dp, &udp(V4.peer, V4.router, 5000, 53));
    let c = counted(&mut dp, |dp| {
        assert_eq!(into_tunnel(dp, &udp(V4.router, V4.peer, 53, 5000), FROM_LAN), TC_ACT_SHOT)
    });
    assert_eq!(c.get(&Counter::TunnelDrop), Some(&1), "{c:?}");
}

#[test]
fn a_forged_reply_into_a_tunnel_flow_is_dropped_on_the_uplink() {
    // CVE-2019-14899: the gateway talks to a tailnet peer through the tunnel; a LAN host
    // forges the peer's address into that flow. Neither the gateway's own packet through
    // the tunnel nor the peer's packets from it open anything the uplink would accept.
    let mut dp = testrun::datapath("[subnet_routes]\nstateful = true").unwrap();
    let gw_tailnet = "100.101.0.1";
    assert_eq!(into_tunnel(&mut dp, &udp(gw_tailnet, V4.peer, 5000, 53), 0), TCX_NEXT);
    from_tunnel(&mut dp, &udp(V4.peer, gw_tailnet, 53, 5000));
    assert_eq!(flows(&dp), [(zone::TUNNEL, DEVICE, 17, state::NEW)]);
    // The forged packet arrives on the uplink (the same test device): dropped.
    assert_eq!(xdp(&mut dp, &udp(V4.peer, gw_tailnet, 53, 5000)), XDP_DROP);
    // Even a packet whose reversed tuple is exactly the tunnel's flow: flows are keyed to
    // the path that opened them.
    assert_eq!(xdp(&mut dp, &udp(gw_tailnet, V4.peer, 5000, 53)), XDP_DROP);
    assert_eq!(xdp(&mut dp, &udp(V4.outside, gw_tailnet, 53, 5000)), XDP_PASS, "control: not filtered");
}

#[test]
fn a_full_table_evicts_but_every_verdict_stays_right() {
    let mut dp = testrun::datapath("[flows]\nmax_entries_v4 = 1024").unwrap();
    let flows_made = 4000u16;
    for port in 0..flows_made {
        out(&mut dp, &udp(V4.gw, V4.host, 10000 + port, 53));
    }
    let counters = testrun::counters(&dp).unwrap();
    assert_eq!(counters[&Counter::FlowCreated], u64::from(flows_made));
    let live = testrun::flows4(&dp).unwrap().len() as u64;
    assert!(live <= 1024, "{live} entries in a table of 1024");
    let evicted = counters[&Counter::FlowCreated] - counters[&Counter::FlowExpired] - live;
    assert!(evicted >= u64::from(flows_made) - 1024, "evicted {evicted}");
    // The newest flow answers; an unsolicited CGNAT packet still drops (fail closed); a
    // non-CGNAT source still passes.
    let newest = 10000 + flows_made - 1;
    assert_eq!(xdp(&mut dp, &udp(V4.host, V4.gw, 53, newest)), XDP_PASS);
    assert_eq!(xdp(&mut dp, &udp(V4.host, V4.gw, 53, 9)), XDP_DROP);
    assert_eq!(xdp(&mut dp, &udp(V4.outside, V4.gw, 53, 9)), XDP_PASS);
    // The oldest were evicted: their replies are unsolicited now.
    assert_eq!(xdp(&mut dp, &udp(V4.host, V4.gw, 53, 10000)), XDP_DROP);
}

#[test]
fn fragments_of_a_reply_pass_with_their_first_fragment() {
    let mut dp = testrun::datapath("").unwrap();
    out(&mut dp, &udp(V4.gw, V4.host, 5000, 53));
    let first = with_ip_id(first_fragment4(udp(V4.host, V4.gw, 53, 5000)), 77);
    let later = |id: u16| with_ip_id(eth_fragment4(V4.host, V4.gw), id);
    // A later fragment before (or without) its first: dropped.
    assert_eq!(xdp(&mut dp, &later(77)), XDP_DROP);
    assert_eq!(xdp(&mut dp, &first), XDP_PASS, "the first fragment answers the flow");
    assert_eq!(xdp(&mut dp, &later(77)), XDP_PASS, "the rest of its datagram");
    assert_eq!(xdp(&mut dp, &later(78)), XDP_DROP, "another datagram");
    // Unsolicited: the first fragment of a datagram answering no flow opens nothing.
    let stray = with_ip_id(first_fragment4(udp(V4.host, V4.gw, 53, 5001)), 79);
    assert_eq!(xdp(&mut dp, &stray), XDP_DROP);
    assert_eq!(xdp(&mut dp, &later(79)), XDP_DROP);
}

#[test]
fn an_icmpv6_header_beyond_what_the_parse_reads_is_not_read_at_a_wrapped_offset() {
    // An echo request behind a 1,032-byte routing header; at the offset a 10-bit wrap would
    // read (inside the routing header) sits a forged "port unreachable" quoting a live flow.
    let mut dp = testrun::datapath("").unwrap();
    let query = udp(V6.gw, V6.host, 5000, 53);
    out(&mut dp, &query);
    let forged = port_unreachable(V6.host, V6.gw, &query);
    let icmp_error = &forged[14 + 40..];
    let routing_len = 1032;
    let mut routing = vec![0u8; routing_len];
    routing[0] = 58; // next header: ICMPv6
    routing[1] = (routing_len / 8 - 1) as u8;
    // 14 + 40 + 1032 = 1086; 1086 & 0x3ff = 62: 8 bytes into the routing header.
    routing[8..8 + icmp_error.len()].copy_from_slice(icmp_error);
    let echo_request = [128u8, 0, 0, 0, 0, 9, 0, 1];
    let mut frame = forged[..14 + 40].to_vec();
    frame[14 + 4..14 + 6].copy_from_slice(&((routing_len + echo_request.len()) as u16).to_be_bytes());
    frame[14 + 6] = 43; // next header: routing
    frame.extend_from_slice(&routing);
    frame.extend_from_slice(&echo_request);
    assert_eq!(xdp(&mut dp, &frame), XDP_DROP);
}
