//! `cargo xtask bench`: ns/packet of the uplink XDP program and the tunnel TC programs via
//! BPF_PROG_TEST_RUN, for the pass and drop paths, with 1, 1,000 and 100,000 exemption
//! prefixes in the LPM trie (median of 5 runs of 1,000,000 repeats each); the tunnel
//! ingress program (mark + MSS clamp) on a SYN and a data segment; and how long the first
//! fill and a one-prefix reload take, with the wait for running programs.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::Result;
use aya::programs::{TestRun, TestRunOptions};
use ipnet::{IpNet, Ipv4Net};
use tailgate::{
    backend::bpf::{links, Datapath, Hook, KernelLog, Params},
    config::Config,
    policy,
};
use tailgate_tests::{
    packets::{eth_tcp, eth_udp4, linux_syn_options, Tcp},
    testrun,
};

const REPEAT: u32 = 1_000_000;
const RUNS: usize = 5;

fn main() -> Result<()> {
    println!("BPF_PROG_TEST_RUN, {REPEAT} repeats per run, median of {RUNS} runs, kernel logging off\n");
    println!("| exemption prefixes | program | path | verdict | ns/packet |");
    println!("|---:|---|---|---|---:|");
    for count in [1, 1_000, 100_000] {
        let (mut dp, exempt_src, drop_src, sync_ms) = datapath(count)?;
        let udp = |src: &str| eth_udp4(src, "192.0.2.1");
        let mut cases: Vec<(&str, &str, Vec<u8>)> = vec![
            ("uplink XDP", "pass: non-CGNAT source", udp("198.51.100.7")),
            ("uplink XDP", "pass: exempt CGNAT source", udp(&exempt_src)),
            ("uplink XDP", "drop: CGNAT source", udp(&drop_src)),
            ("tunnel TC egress", "drop: forwarded CGNAT source", udp(&drop_src)),
        ];
        if count == 1 {
            // Test-run reuses one packet for every repeat: the MSS is lowered in the first
            // repeat; the others walk the options and find it low enough.
            let syn = eth_tcp("100.101.2.3", "192.0.2.2", Tcp::Syn, &linux_syn_options(1460), &[]);
            let data = eth_tcp("100.101.2.3", "192.0.2.2", Tcp::Data, &[], &[0u8; 1000]);
            cases.push(("tunnel TC ingress", "SYN: mark, MSS options walked", syn));
            cases.push(("tunnel TC ingress", "data segment: mark", data));
            let data = eth_tcp("198.51.100.7", "100.101.2.3", Tcp::Data, &[], &[0u8; 1000]);
            cases.push(("tunnel TC egress", "pass: forwarded data segment", data));
        }
        for (program, path, frame) in cases {
            let mut samples = Vec::new();
            let mut verdict = 0;
            for _ in 0..RUNS {
                let (v, ns) = match program {
                    "uplink XDP" => testrun::time_xdp(&mut dp, &frame, REPEAT)?,
                    "tunnel TC egress" => time_tc(&mut dp, Hook::TcEgress, &frame)?,
                    _ => time_tc(&mut dp, Hook::TcIngress, &frame)?,
                };
                verdict = v;
                samples.push(ns);
            }
            samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let name = match (program, verdict) {
                ("uplink XDP", 1) => "XDP_DROP",
                ("uplink XDP", 2) => "XDP_PASS",
                (_, 2) => "TC_ACT_SHOT",
                (_, 0) => "TC_ACT_OK",
                _ => "?",
            };
            println!("| {count} | {program} | {path} | {name} | {:.0} |", samples[RUNS / 2]);
        }
        println!("| {count} | (map sync) | {count} prefixes into 2 tries × 2 generations | - | {sync_ms:.0} ms total |");
        let (one_ms, grace) = add_one(&mut dp, count)?;
        println!(
            "| {count} | (reload) | one prefix added | - | {one_ms:.0} ms total, {:.2} ms of it waiting for running programs |",
            grace.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

/// Adds one prefix to the policy of `dp`: how long the atomic swap takes, and how long of it
/// the wait for running programs (the RCU grace period).
fn add_one(dp: &mut Datapath, count: usize) -> Result<(f64, std::time::Duration)> {
    let (mut config, _, _) = policy_of(count)?;
    config.cgnat.drop = vec!["100.127.255.255/32".parse()?];
    let start = Instant::now();
    dp.sync(&policy::compile(&config, system()))?;
    let took = start.elapsed().as_secs_f64() * 1000.0;
    Ok((took, dp.last_swap.map(|s| s.grace).unwrap_or_default()))
}

/// The datapath with `count` exemption prefixes; returns an address inside one of them, an
/// address in CGNAT outside all of them, and how long the map sync took.
fn datapath(count: usize) -> Result<(Datapath, String, String, f64)> {
    let (config, exempt, drop) = policy_of(count)?;
    // Test-run frames are Ethernet: the tunnel programs find the IP header at 14.
    let mut dp = Datapath::load_with(None, KernelLog::Off, Params { tunnel_l3_offset: 14 })?;
    let start = Instant::now();
    dp.sync(&policy::compile(&config, system()))?;
    Ok((dp, exempt, drop, start.elapsed().as_secs_f64() * 1000.0))
}

/// The config with `count` exemptions, an exempt and a dropped source.
fn policy_of(count: usize) -> Result<(Config, String, String)> {
    let allow: Vec<IpNet> = if count == 1 {
        vec!["100.100.0.0/16".parse()?]
    } else {
        // Distinct /28s spread over 100.64.0.0/10 (2^18 slots; an odd multiplier is a
        // bijection modulo 2^18).
        (0..count as u32)
            .map(|i| {
                let slot = i.wrapping_mul(2_654_435_761) % (1 << 18);
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + slot * 16);
                IpNet::V4(Ipv4Net::new(addr, 28).unwrap())
            })
            .collect()
    };
    let inside = |net: &IpNet, offset: u32| match net {
        IpNet::V4(net) => Ipv4Addr::from(u32::from(net.network()) + offset),
        IpNet::V6(_) => unreachable!("v4 only"),
    };
    let exempt = inside(&allow[allow.len() / 2], 5).to_string();
    // The first /28 of CGNAT that no exemption covers.
    let drop = (0..1u32 << 18)
        .map(|slot| Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + slot * 16 + 1))
        .find(|a| !allow.iter().any(|n| n.contains(&std::net::IpAddr::V4(*a))))
        .expect("some /28 is not exempt")
        .to_string();
    let mut config = Config::parse("tunnel = \"tun0\"\nbackend = \"bpf\"", &Default::default())?;
    config.cgnat.allow = allow;
    Ok((config, exempt, drop))
}

/// A gateway whose tunnel has the reference's MTU.
fn system() -> policy::System {
    policy::System { uplinks: Vec::new(), tunnel_mtu: Some(testrun::TUNNEL_MTU) }
}

fn time_tc(dp: &mut Datapath, hook: Hook, frame: &[u8]) -> Result<(u32, f64)> {
    let prog = links::tc(&mut dp.ebpf, hook)?;
    let mut ctx = [0u8; 192];
    ctx[36..40].copy_from_slice(&7u32.to_ne_bytes()); // forwarded from ifindex 7
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = REPEAT;
    let r = prog.test_run(opts)?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}
