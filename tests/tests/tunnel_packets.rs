//! The tunnel programs on crafted packets through BPF_PROG_TEST_RUN: subnet-route mark and
//! MSS clamp, exact output bytes, checksums checked by etherparse, exact counter changes.

use std::collections::HashMap;

use tailgate::backend::bpf::{Datapath, Hook};
use tailgate_abi::counters::Counter;
use tailgate_tests::{
    packets::*,
    testrun::{self, TcRun, TCX_NEXT, TC_ACT_OK},
};

const PEER: &str = "100.101.2.3";
const LAN: &str = "192.0.2.2";
const PEER6: &str = "fd7a:115c:a1e0::3";
const LAN6: &str = "2001:db8::2";
/// The ifindex a forwarded packet came in on (not the test device, `lo`).
const FROM_LAN: u32 = 7;

/// Runs `frame` through `hook` with mark `mark` and checks that exactly `counted` went up
/// by one each.
fn run(dp: &mut Datapath, hook: Hook, frame: &[u8], mark: u32, counted: &[Counter]) -> TcRun {
    let before = testrun::counters(dp).unwrap();
    let ingress = if hook == Hook::TcEgress { FROM_LAN } else { 0 };
    let out = testrun::run_tunnel(dp, hook, frame, mark, ingress).unwrap();
    assert_eq!(out.verdict, if hook == Hook::TcEgress { TCX_NEXT } else { TC_ACT_OK });
    let after = testrun::counters(dp).unwrap();
    // The flow table's own counts (the masquerade records connections from the LAN side
    // into the tunnel) are the flow table tests' concern.
    let flow_table = [Counter::FlowLookups, Counter::FlowCreated];
    let changed: HashMap<Counter, u64> = Counter::ALL
        .into_iter()
        .filter(|c| after[c] != before[c] && !flow_table.contains(c))
        .map(|c| (c, after[&c] - before[&c]))
        .collect();
    let want: HashMap<Counter, u64> = counted.iter().map(|c| (*c, 1)).collect();
    assert_eq!(changed, want, "counters");
    out
}

/// From the tunnel: marked, clamped when asked.
fn ingress(dp: &mut Datapath, frame: &[u8], clamped: bool) -> TcRun {
    let mut counted = vec![Counter::TunnelInPass, Counter::TunnelInMarked];
    if clamped {
        counted.push(Counter::TunnelInMssClamped);
    }
    run(dp, Hook::TcIngress, frame, 0, &counted)
}

fn syn(src: &str, dst: &str, flags: Tcp, mss: u16) -> Vec<u8> {
    eth_tcp(src, dst, flags, &linux_syn_options(mss), &[])
}

#[test]
fn syn_and_syn_ack_from_the_tunnel_are_clamped_to_the_tunnel_mtu() {
    let mut dp = testrun::datapath("").unwrap();
    for (what, frame, want) in [
        ("IPv4 SYN", syn(PEER, LAN, Tcp::Syn, 1460), 1240),
        ("IPv4 SYN-ACK", syn(PEER, LAN, Tcp::SynAck, 1460), 1240),
        ("IPv6 SYN", syn(PEER6, LAN6, Tcp::Syn, 1440), 1220),
        ("IPv6 SYN-ACK", syn(PEER6, LAN6, Tcp::SynAck, 1440), 1220),
    ] {
        let out = ingress(&mut dp, &frame, true);
        assert_eq!(tcp_mss(&out.frame), (Some(want), true), "{what}: MSS and checksum");
        assert_eq!(out.frame.len(), frame.len(), "{what}: same length");
        // Nothing but the MSS value and the checksum changed.
        let diff: Vec<usize> = (0..frame.len()).filter(|&i| frame[i] != out.frame[i]).collect();
        assert!(diff.len() <= 4, "{what}: bytes changed at {diff:?}");
    }
}

#[test]
fn syn_into_the_tunnel_is_clamped_too() {
    let mut dp = testrun::datapath("").unwrap();
    let frame = syn(LAN, PEER, Tcp::SynAck, 1460);
    let out =
        run(&mut dp, Hook::TcEgress, &frame, 0, &[Counter::TunnelPassForward, Counter::TunnelOutMssClamped]);
    assert_eq!(tcp_mss(&out.frame), (Some(1240), true));
    assert_eq!(out.mark, 0, "egress does not mark");
    let frame = syn(LAN6, PEER6, Tcp::Syn, 1440);
    let out =
        run(&mut dp, Hook::TcEgress, &frame, 0, &[Counter::TunnelPassForward, Counter::TunnelOutMssClamped]);
    assert_eq!(tcp_mss(&out.frame), (Some(1220), true));
}

#[test]
fn mss_at_an_odd_offset_keeps_the_checksum_right() {
    let mut dp = testrun::datapath("").unwrap();
    // NOP, MSS (value at an odd distance from the header start), NOP, NOP, NOP.
    let [hi, lo] = 1460u16.to_be_bytes();
    let frame = eth_tcp(PEER, LAN, Tcp::Syn, &[1, 2, 4, hi, lo, 1, 1, 1], &[]);
    let out = ingress(&mut dp, &frame, true);
    assert_eq!(tcp_mss(&out.frame), (Some(1240), true));
}

#[test]
fn packets_the_clamp_must_not_touch() {
    let mut dp = testrun::datapath("").unwrap();
    let [hi, lo] = 1460u16.to_be_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("MSS already lower", syn(PEER, LAN, Tcp::Syn, 1200)),
        ("MSS equal to the limit", syn(PEER, LAN, Tcp::Syn, 1240)),
        ("no MSS option", eth_tcp(PEER, LAN, Tcp::Syn, &[4, 2, 1, 1, 1, 3, 3, 7], &[])),
        ("only EOL", eth_tcp(PEER, LAN, Tcp::Syn, &[0, 0, 0, 0], &[])),
        ("MSS after EOL", eth_tcp(PEER, LAN, Tcp::Syn, &[0, 2, 4, hi, lo, 0, 0, 0], &[])),
        ("data segment with an MSS option", eth_tcp(PEER, LAN, Tcp::Data, &[2, 4, hi, lo], b"payload")),
        ("SYN with RST", eth_tcp(PEER, LAN, Tcp::SynRst, &[2, 4, hi, lo], &[])),
        ("first fragment", first_fragment4(syn(PEER, LAN, Tcp::Syn, 1460))),
        ("UDP", eth_udp4(PEER, LAN)),
    ];
    for (what, frame) in cases {
        let out = ingress(&mut dp, &frame, false);
        assert_eq!(out.frame, frame, "{what}: unchanged");
    }
}

#[test]
fn malformed_options_leave_the_packet_as_it_was() {
    let mut dp = testrun::datapath("").unwrap();
    let [hi, lo] = 1460u16.to_be_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero option length", eth_tcp(PEER, LAN, Tcp::Syn, &[4, 0, 2, 4, hi, lo, 0, 0], &[])),
        ("option length 1", eth_tcp(PEER, LAN, Tcp::Syn, &[8, 1, 2, 4, hi, lo, 0, 0], &[])),
        ("option past the header", eth_tcp(PEER, LAN, Tcp::Syn, &[1, 1, 8, 10, 0, 0, 0, 0], &[])),
        ("kind without a length byte", eth_tcp(PEER, LAN, Tcp::Syn, &[1, 1, 1, 8], &[])),
        (
            "more options than walked",
            eth_tcp(
                PEER,
                LAN,
                Tcp::Syn,
                &[1; 36].iter().chain(&[2, 4, hi, lo]).copied().collect::<Vec<_>>(),
                &[],
            ),
        ),
    ];
    for (what, frame) in cases {
        let counted = [Counter::TunnelInPass, Counter::TunnelInMarked, Counter::MssBadOptions];
        let out = run(&mut dp, Hook::TcIngress, &frame, 0, &counted);
        assert_eq!(out.frame, frame, "{what}: unchanged");
    }
    // A header whose data offset runs past the end of the packet.
    let mut frame = syn(PEER, LAN, Tcp::Syn, 1460);
    frame.truncate(frame.len() - 8);
    let out = run(
        &mut dp,
        Hook::TcIngress,
        &frame,
        0,
        &[Counter::TunnelInPass, Counter::TunnelInMarked, Counter::MssBadOptions],
    );
    assert_eq!(out.frame, frame, "cut header: unchanged");
}

#[test]
fn mark_is_set_under_its_mask_and_foreign_bits_stay() {
    let mut dp = testrun::datapath("").unwrap();
    let frame = eth_udp4(PEER, LAN);
    let cases =
        [(0, 0x40000), (0x1234_5678, 0x1204_5678), (0x00ff_0000, 0x0004_0000), (0x8000_0001, 0x8004_0001)];
    for (before, after) in cases {
        let out =
            run(&mut dp, Hook::TcIngress, &frame, before, &[Counter::TunnelInPass, Counter::TunnelInMarked]);
        assert_eq!(out.mark, after, "mark {before:#x}");
    }
    let v6 = eth_udp6(PEER6, LAN6);
    assert_eq!(
        run(&mut dp, Hook::TcIngress, &v6, 7, &[Counter::TunnelInPass, Counter::TunnelInMarked]).mark,
        0x40007
    );
    // Not IP: passed untouched, not marked.
    let out = run(&mut dp, Hook::TcIngress, &arp(), 3, &[Counter::TunnelInPassOther]);
    assert_eq!(out.mark, 3);
}

#[test]
fn configured_mark_and_clamp() {
    let mut dp = testrun::datapath("[subnet_routes]\nmark = \"0x100/0xf00\"\n[mss]\nclamp = 1300").unwrap();
    let out = run(
        &mut dp,
        Hook::TcIngress,
        &syn(PEER, LAN, Tcp::Syn, 1460),
        0xfff,
        &[Counter::TunnelInPass, Counter::TunnelInMarked, Counter::TunnelInMssClamped],
    );
    assert_eq!((out.mark, tcp_mss(&out.frame)), (0x1ff, (Some(1300), true)));
    let out = ingress(&mut dp, &syn(PEER6, LAN6, Tcp::Syn, 1440), true);
    assert_eq!(tcp_mss(&out.frame), (Some(1300), true));

    let mut dp = testrun::datapath("[mss]\nclamp = \"off\"").unwrap();
    let frame = syn(PEER, LAN, Tcp::Syn, 1460);
    assert_eq!(ingress(&mut dp, &frame, false).frame, frame, "clamp off");
    let frame = syn(LAN, PEER, Tcp::SynAck, 1460);
    let out = run(&mut dp, Hook::TcEgress, &frame, 0, &[Counter::TunnelPassForward]);
    assert_eq!(out.frame, frame, "clamp off, egress");
}

#[test]
fn a_reload_changes_mark_and_clamp_at_once() {
    let mut dp = testrun::datapath("").unwrap();
    let frame = syn(PEER, LAN, Tcp::Syn, 1460);
    assert_eq!(tcp_mss(&ingress(&mut dp, &frame, true).frame).0, Some(1240));
    let config = tailgate::config::Config::parse(
        "[subnet_routes]\nmark = \"0x2/0x2\"\n[mss]\nclamp = 1000",
        &HashMap::new(),
    )
    .unwrap();
    let system =
        tailgate::policy::System { uplinks: Vec::new(), tunnel_mtu: Some(1280), ..Default::default() };
    dp.sync(&tailgate::policy::compile(&config, system)).unwrap();
    let out = run(
        &mut dp,
        Hook::TcIngress,
        &frame,
        0,
        &[Counter::TunnelInPass, Counter::TunnelInMarked, Counter::TunnelInMssClamped],
    );
    assert_eq!((out.mark, tcp_mss(&out.frame).0), (2, Some(1000)));
}

#[test]
fn the_production_load_verifies() {
    // The tests above load with the IP header at 14 (test-run frames are Ethernet); the
    // daemon loads with 0 (TUN): the verifier must accept both.
    tailgate::backend::bpf::Datapath::load(None, tailgate::backend::bpf::KernelLog::Off).unwrap();
}
