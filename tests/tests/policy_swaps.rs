//! A policy change is atomic as seen by the datapath: a flood from a source that both the
//! old and the new policy drop, and from one that both pass, during repeated reloads between
//! policies that overlap differently — not one packet leaked, not one lost.

use std::{net::IpAddr, time::Duration};

use tailgate_tests::{
    daemon::{tailgate, Daemon},
    flood::{Flood, Receiver},
    on_both_backends,
    topology::*,
};

on_both_backends!(reloads_never_show_a_mix_of_two_policies);

/// Dropped by both policies: A drops its /24 inside an allowed /16; B has neither, so the
/// CGNAT range drops it.
const BOTH_DROP: &str = "100.100.1.1";
/// Passed by both: A allows the /32 inside a dropped /16; B allows the /16.
const BOTH_PASS: &str = "100.101.1.1";
const PORT: u16 = 7070;
const SWAPS: usize = 12;
/// Unrelated prefixes that make each reload long enough for a non-atomic writer to be seen
/// half-way (several milliseconds of map or rule updates).
const FILLER: u32 = 10_000;

/// `count` /32 exemptions in 100.<octet>.0.0/16.
fn filler(octet: u8, count: u32) -> Vec<String> {
    (0..count).map(|i| format!("\"100.{octet}.{}.{}\"", i / 250, i % 250 + 1)).collect()
}

fn policy_a(backend: &str) -> String {
    let mut allow = vec!["\"100.100.0.0/16\"".to_string(), format!("\"{BOTH_PASS}\"")];
    allow.extend(filler(120, FILLER));
    let drop = ["\"100.100.1.0/24\"", "\"100.101.0.0/16\""];
    config(backend, &format!("allow = [{}]\ndrop = [{}]", allow.join(", "), drop.join(", ")))
}

fn policy_b(backend: &str) -> String {
    let mut allow = vec!["\"100.101.0.0/16\"".to_string()];
    allow.extend(filler(121, FILLER));
    config(backend, &format!("allow = [{}]", allow.join(", ")))
}

fn reloads_never_show_a_mix_of_two_policies(backend: &str) {
    let t = Topology::new().unwrap();
    for src in [BOTH_DROP, BOTH_PASS] {
        t.lan.ip(&["addr", "add", &format!("{src}/32"), "dev", "eth0"]).unwrap();
    }
    let receiver = Receiver::listen(&t.gw, PORT).unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &policy_a(backend)).unwrap();
    let drops_before = uplink_drops(&t);

    // About 10k packets/s from each source, for as long as the swaps take (at most 60 s).
    let flood =
        Flood::start(&t.lan, &[BOTH_DROP, BOTH_PASS], GW_LAN, PORT, 10, Duration::from_secs(60)).unwrap();
    for i in 0..SWAPS {
        let next = if i % 2 == 0 { policy_b(backend) } else { policy_a(backend) };
        let readies = daemon.readies();
        daemon.write_config(&next).unwrap();
        daemon.wait_ready_after(readies).unwrap();
    }
    let sent = flood.stop();
    let (pass, drop): (IpAddr, IpAddr) = (BOTH_PASS.parse().unwrap(), BOTH_DROP.parse().unwrap());
    let passed = receiver.wait_for(pass, sent[&pass]);
    let counts = receiver.counts();
    let log = daemon.log();
    let reloads = log.matches("reloaded").count();
    println!("{backend}: {reloads} reloads; sent {sent:?}; received {counts:?}");
    assert_eq!(reloads, SWAPS, "every swap was a real policy change:\n{log}");
    assert!(sent[&drop] > 1_000 && sent[&pass] > 1_000, "the flood ran during the swaps: {sent:?}");
    assert_eq!(counts.get(&drop).copied().unwrap_or(0), 0, "leaked packets both policies drop");
    assert_eq!(passed, sent[&pass], "lost packets both policies pass");
    if backend == "bpf" {
        // Every packet of the dropped source was dropped by a rule, at the uplink.
        assert_eq!(uplink_drops(&t) - drops_before, sent[&drop]);
    }
}

fn uplink_drops(t: &Topology) -> u64 {
    let out = tailgate(&t.gw, &t.pins, &["status", "--json"]).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["counters"]["uplink_drop"].as_u64().unwrap()
}
