//! `cargo xtask bench`: what tailgate costs, in sections.
//!
//! 1. `testrun` — single-packet cost (BPF_PROG_TEST_RUN, one cache-hot packet): ns/packet of
//!    the uplink XDP program and the tunnel TC programs for the pass and drop paths, with 1,
//!    1,000 and 100,000 exemption prefixes (median of 5 runs of 1,000,000 repeats); the
//!    tunnel ingress program (mark + MSS clamp) on a SYN and a data segment; the first fill
//!    and a one-prefix reload, with the wait for running programs.
//! 2. `real` — in one run, so that the ratios compare figures of the same hour:
//!    - `receive` (`receive.rs`): receive-side CPU per packet over veth from 4,096 sources,
//!      no filtering / XDP floor / tailgate BPF / tailgate iptables, at 1, 1,000, 10,000 and
//!      100,000 user prefixes (see `tailgate_tests::traffic`);
//!    - `forwarding` (`forwarding.rs`): a gateway forwarding tunnel → LAN and back (mark, MSS
//!      clamp, masquerade), the kernel alone / the daemon's BPF / its iptables backend, CPU
//!      per packet and packets/s (see `tailgate_tests::forwarding`);
//!    - `daemon` (`control.rs`): the control plane, both backends at 1 / 10,000 / 100,000
//!      prefixes and 10,000 services: start, reloads, stop, memory, idle CPU;
//!
//!    then the table of ratios (`ratios.rs`) and the plots (`plots.rs`, `docs/bench/*.svg`).
//! 3. `flows` — the flow table (BPF_PROG_TEST_RUN): reply and owning paths with 1 and
//!    1,000,000 live entries; the uplink pass path with flow tracking on and off.
//! 4. `services` — the services' programs (BPF_PROG_TEST_RUN) with 1 and 10,000 services;
//!    applying 10,000 services and changing one; the tables' memory.
//! 5. `masquerade` — see `masquerade`.
//! 6. `egress-proxy` — its four steps on an established flow, a new flow's DNAT and SNAT,
//!    and what the programs cost packets that are not the proxy's.
//!
//! `tailgate-bench <section>` runs one section (`receive`, `forwarding`, `daemon` each write
//! their plot). `TAILGATE_BENCH_PREFIXES=1,1000` runs the policy-size sections at those
//! sizes only; `TAILGATE_BENCH_PLOTS=<dir>` writes the plots elsewhere. On a shared machine,
//! the real-traffic rounds wait for other tasks to leave the NAPI CPU alone, up to 120 s in
//! all (`TAILGATE_BENCH_QUIET_WAIT=<seconds>` changes that).

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use ipnet::{IpNet, Ipv4Net};
use tailgate::{
    backend::bpf::{Datapath, Hook, KernelLog, Params},
    config::Config,
    policy,
};
use tailgate_abi::counters::Counter;
use tailgate_tests::{
    packets::{eth_tcp, eth_udp4, linux_syn_options, Tcp},
    testrun, traffic,
};

mod control;
mod forwarding;
mod plots;
mod ratios;
mod receive;

const REPEAT: u32 = 1_000_000;
const RUNS: usize = 5;

/// Real traffic: rounds per row, each way measured for `WINDOW` per round.
const ROUNDS: usize = 5;
const WINDOW: Duration = Duration::from_secs(1);
/// Source addresses of a flood.
const SOURCES: usize = 4_096;

fn main() -> Result<()> {
    let section = std::env::args().nth(1);
    match section.as_deref() {
        None => {
            single_packet()?;
            println!();
            real()?;
            flows()?;
            println!();
            services()?;
            println!();
            masquerade()?;
            println!();
            egress_proxy()
        }
        Some("real") => real(),
        Some("testrun") => single_packet(),
        Some("receive") => {
            let rows = receive::run()?;
            plots::receive(&rows)?;
            ratios::print(&rows, None, &[]);
            Ok(())
        }
        Some("forwarding") => plots::forwarding(&forwarding::run()?).map(drop),
        Some("daemon") => plots::control(&control::run()?).map(drop),
        Some("flows") => flows(),
        Some("services") => services(),
        Some("masquerade") => masquerade(),
        Some("egress-proxy") => egress_proxy(),
        Some(other) => bail!(
            "unknown section {other:?}: testrun | real | receive | forwarding | daemon | flows | services | masquerade | egress-proxy"
        ),
    }
}

fn single_packet() -> Result<()> {
    println!("## Single-packet cost (BPF_PROG_TEST_RUN, one cache-hot packet)\n");
    println!("{REPEAT} repeats per run, median of {RUNS} runs, kernel logging off\n");
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
                (_, u32::MAX) => "TCX_NEXT (pass)",
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

/// The real-traffic sections and the control plane in one run (so their ratios compare
/// figures of the same hour), their plots and the table of ratios.
fn real() -> Result<()> {
    let receive = receive::run()?;
    plots::receive(&receive)?;
    println!();
    let forwarding = forwarding::run()?;
    plots::forwarding(&forwarding)?;
    println!();
    let control = control::run()?;
    plots::control(&control)?;
    println!();
    ratios::print(&receive, Some(&forwarding), &control);
    Ok(())
}

/// The policy sizes a section runs at: `sizes`, or those of `TAILGATE_BENCH_PREFIXES`
/// (comma-separated) for a shorter run.
fn sizes(sizes: &[usize]) -> Result<Vec<usize>> {
    match std::env::var("TAILGATE_BENCH_PREFIXES") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .replace('_', "")
                    .parse()
                    .map_err(|e| anyhow::anyhow!("TAILGATE_BENCH_PREFIXES: {n:?}: {e}"))
            })
            .collect(),
        Err(_) => Ok(sizes.to_vec()),
    }
}

/// The machine and time a section ran on, for its header.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let date = std::process::Command::new("date")
        .args(["-u", "+%F %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "{cpu}, {} CPUs, Linux {kernel}, {date}; NAPI kthread on CPU {}, polled every {} µs; sender on CPU {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        traffic::NAPI_CPU,
        traffic::POLL_INTERVAL.as_micros(),
        traffic::SENDER_CPU,
    )
}

/// The datapath (unpinned, unattached) with the policy of `config`, as in the first section.
fn load(config: &Config) -> Result<Datapath> {
    let mut dp =
        Datapath::load_with(None, KernelLog::Off, Params { tunnel_l3_offset: 14, ..Params::default() })?;
    dp.sync(&policy::compile(config, system()))?;
    Ok(dp)
}

/// 4,096 addresses spread over 198.18.0.0/15 (benchmarking space, not CGNAT).
fn non_cgnat() -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    (0..SOURCES as u32).map(|i| Ipv4Addr::from(base + i * 32 + 1)).collect()
}

/// 4,096 addresses of 100.64.0.0/10 covered by none of `nets`, spread over the whole range
/// (an odd multiplier is a bijection modulo 2^22).
fn cgnat_not_in(nets: &[IpNet]) -> Vec<Ipv4Addr> {
    let covered: HashSet<(u32, u8)> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some((u32::from(n.network()), n.prefix_len())),
            IpNet::V6(_) => None,
        })
        .collect();
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    (0..1u32 << 22)
        .map(|i| base + (i.wrapping_mul(2_654_435_761) % (1 << 22)))
        .filter(|a| {
            !(0..=32u8).any(|len| {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                covered.contains(&(a & mask, len))
            })
        })
        .take(SOURCES)
        .map(Ipv4Addr::from)
        .collect()
}

/// 4,096 addresses inside the exemptions `allow`: one in each of 4,096 different prefixes
/// when there are that many, else spread over all of them.
fn exempt(allow: &[IpNet]) -> Vec<Ipv4Addr> {
    let nets: Vec<Ipv4Net> = allow
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect();
    (0..SOURCES)
        .map(|i| {
            let (net, offset) = if nets.len() >= SOURCES {
                (nets[i * nets.len() / SOURCES], 5)
            } else {
                (nets[i % nets.len()], 1 + (i / nets.len()) as u32)
            };
            // Inside the prefix whatever its length (a /32 has one address).
            let size = 1u64 << (32 - net.prefix_len());
            let addr = Ipv4Addr::from(u32::from(net.network()) + (u64::from(offset) % size) as u32);
            assert!(net.contains(&addr), "{addr} outside {net}");
            addr
        })
        .collect()
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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
    let mut dp =
        Datapath::load_with(None, KernelLog::Off, Params { tunnel_l3_offset: 14, ..Params::default() })?;
    let start = Instant::now();
    dp.sync(&policy::compile(&config, system()))?;
    Ok((dp, exempt, drop, start.elapsed().as_secs_f64() * 1000.0))
}

/// The config with `count` exemptions, an exempt and a dropped source.
fn policy_of(count: usize) -> Result<(Config, String, String)> {
    // `TAILGATE_BENCH_LENGTHS=mixed`: prefixes of nine lengths, /24 to /32, instead of /28s
    // (a hash:net set probes once per length it holds).
    let mixed = std::env::var("TAILGATE_BENCH_LENGTHS").is_ok_and(|v| v == "mixed");
    let allow: Vec<IpNet> = if count == 1 {
        vec!["100.100.0.0/16".parse()?]
    } else {
        // Distinct /28s spread over 100.64.0.0/10 (2^18 slots; an odd multiplier is a
        // bijection modulo 2^18); mixed: each cut to its length, the duplicates dropped.
        let mut seen = HashSet::new();
        (0..count as u32)
            .map(|i| {
                let slot = i.wrapping_mul(2_654_435_761) % (1 << 18);
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + slot * 16);
                let len = if mixed { 24 + (i % 9) as u8 } else { 28 };
                IpNet::V4(Ipv4Net::new(addr, len).unwrap().trunc())
            })
            .filter(|net| seen.insert(*net))
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
    policy::System { uplinks: Vec::new(), tunnel_mtu: Some(testrun::TUNNEL_MTU), ..Default::default() }
}

/// Forwarded from ifindex 7.
fn time_tc(dp: &mut Datapath, hook: Hook, frame: &[u8]) -> Result<(u32, f64)> {
    time_tc_from(dp, hook, frame, 7, REPEAT)
}

/// Live entries the big table is filled with, and its capacity (an LRU table evicts a little
/// before it is full: room to spare).
const BIG_TABLE: u32 = 1_000_000;
const BIG_CAPACITY: u32 = 1_250_000;
/// Distinct flows the creation cost is the median over.
const CREATIONS: u16 = 20_000;

fn flows() -> Result<()> {
    use tailgate_tests::packets::{tcp, udp};
    println!("## Flow table (BPF_PROG_TEST_RUN)\n");
    println!(
        "{REPEAT} repeats per run, median of {RUNS} runs (creation: median of {CREATIONS} single runs on \
         distinct flows); gateway 192.0.2.1, CGNAT host 100.100.2.136, tailnet peer 100.101.2.3\n"
    );
    println!("| live entries | program | path | verdict | ns/packet |");
    println!("|---:|---|---|---|---:|");
    let (gw, host, peer, lan) = ("192.0.2.1", "100.100.2.136", "100.101.2.3", "192.0.2.2");
    for live in [1, BIG_TABLE] {
        let toml = format!(
            "tunnel = \"tun0\"\nbackend = \"bpf\"\n[subnet_routes]\nstateful = true\n[flows]\nmax_entries_v4 = {BIG_CAPACITY}"
        );
        let config = Config::parse(&toml, &Default::default())?;
        let mut dp = Datapath::load_with(None, KernelLog::Off, testrun::params(&config))?;
        dp.sync(&policy::compile(&config, system()))?;
        fill_flows(&mut dp, live - 1)?;
        // The measured flows: the gateway's TCP connection to the CGNAT host, answered; a
        // UDP flow from the tunnel to a LAN host.
        let own_out = tcp(gw, host, 40000, 443, Tcp::Syn);
        let own_in = tcp(host, gw, 443, 40000, Tcp::Data);
        testrun::run_uplink_egress(&mut dp, &own_out, 0)?;
        testrun::run_xdp(&mut dp, &tcp(host, gw, 443, 40000, Tcp::SynAck))?;
        let tunnel_out = udp(peer, lan, 5000, 53);
        testrun::run_tunnel(&mut dp, Hook::TcIngress, &tunnel_out, 0, 0)?;
        let cases: Vec<(&str, &str, Hook, u32, Vec<u8>)> = vec![
            (
                "uplink XDP",
                "pass: non-CGNAT source (no flow work)",
                Hook::Xdp,
                0,
                udp("198.51.100.7", gw, 53, 9),
            ),
            ("uplink XDP", "pass: reply to the gateway's own flow", Hook::Xdp, 0, own_in),
            (
                "uplink XDP",
                "drop: unsolicited CGNAT source (lookup misses)",
                Hook::Xdp,
                0,
                udp(host, gw, 53, 9),
            ),
            (
                "uplink TC egress",
                "own flow: refresh",
                Hook::UplinkEgress,
                0,
                tcp(gw, host, 40000, 443, Tcp::Data),
            ),
            (
                "uplink TC egress",
                "non-CGNAT destination (no flow work)",
                Hook::UplinkEgress,
                0,
                udp(gw, "198.51.100.7", 9, 53),
            ),
            ("tunnel TC ingress", "flow from the tunnel: refresh", Hook::TcIngress, 0, tunnel_out),
            (
                "tunnel TC egress",
                "stateful: LAN answer to a tunnel flow",
                Hook::TcEgress,
                7,
                udp(lan, peer, 53, 5000),
            ),
            ("tunnel TC egress", "stateful: drop, no flow", Hook::TcEgress, 7, udp(lan, peer, 53, 5001)),
        ];
        for (program, path, hook, ingress, frame) in cases {
            let mut samples = Vec::new();
            let mut verdict = 0;
            for _ in 0..RUNS {
                let (v, ns) = match hook {
                    Hook::Xdp => testrun::time_xdp(&mut dp, &frame, REPEAT)?,
                    _ => time_tc_from(&mut dp, hook, &frame, ingress, REPEAT)?,
                };
                verdict = v;
                samples.push(ns);
            }
            samples.sort_by(|a, b| a.total_cmp(b));
            println!(
                "| {} | {program} | {path} | {} | {:.0} |",
                thousands(live as usize),
                verdict_name(hook, verdict),
                samples[RUNS / 2]
            );
        }
        // Single runs carry a fixed cost of their own: the same single runs on packets that
        // do no flow work are the baseline.
        let single = |dp: &mut Datapath, dst: &str| -> Result<f64> {
            let mut samples = Vec::new();
            for port in 0..CREATIONS {
                let frame = udp(gw, dst, 10_000 + port, 53);
                samples.push(time_tc_from(dp, Hook::UplinkEgress, &frame, 0, 1)?.1);
            }
            samples.sort_by(|a, b| a.total_cmp(b));
            Ok(samples[samples.len() / 2])
        };
        let baseline = single(&mut dp, "198.51.100.7")?;
        let created_before = testrun::counters(&dp)?[&Counter::FlowCreated];
        let creation = single(&mut dp, host)?;
        let created = testrun::counters(&dp)?[&Counter::FlowCreated] - created_before;
        anyhow::ensure!(created == u64::from(CREATIONS), "{created} flows created, not {CREATIONS}");
        println!(
            "| {} | uplink TC egress | own flow: creation (UDP, distinct flows; single runs: {creation:.0} less {baseline:.0} for a run without flow work) | TC_ACT_OK | {:.0} |",
            thousands(live as usize),
            creation - baseline
        );
    }
    // The same non-CGNAT pass with flow tracking off altogether.
    let config = Config::parse(
        "tunnel = \"tun0\"\nbackend = \"bpf\"\n[cgnat]\nallow_replies = false",
        &Default::default(),
    )?;
    let mut dp = load(&config)?;
    let frame = udp("198.51.100.7", gw, 53, 9);
    let mut samples: Vec<f64> =
        (0..RUNS).map(|_| testrun::time_xdp(&mut dp, &frame, REPEAT).map(|r| r.1)).collect::<Result<_>>()?;
    samples.sort_by(|a, b| a.total_cmp(b));
    println!(
        "| (allow_replies = false) | uplink XDP | pass: non-CGNAT source | XDP_PASS | {:.0} |",
        samples[RUNS / 2]
    );
    Ok(())
}

fn verdict_name(hook: Hook, verdict: u32) -> &'static str {
    match (hook, verdict) {
        (Hook::Xdp, 1) => "XDP_DROP",
        (Hook::Xdp, 2) => "XDP_PASS",
        (_, 2) => "TC_ACT_SHOT",
        (_, 0) => "TC_ACT_OK",
        (_, u32::MAX) => "TCX_NEXT (pass)",
        _ => "?",
    }
}

/// Fills the IPv4 flow table with `count` live flows of the gateway's (distinct from the
/// measured ones).
fn fill_flows(dp: &mut Datapath, count: u32) -> Result<()> {
    use aya::maps::{HashMap, MapData};
    use tailgate::backend::bpf::conntrack::monotonic_now;
    use tailgate_abi::conntrack::{state, zone, Flow, FlowKey4, MAP_V4};
    let now = monotonic_now().as_nanos() as u64;
    let mut map: HashMap<&mut MapData, FlowKey4, Flow> = HashMap::try_from(dp.ebpf.map_mut(MAP_V4).unwrap())?;
    let flow = Flow { last_seen: now, created: now, state: state::ESTABLISHED, ..Flow::default() };
    for i in 0..count {
        // 100.64.0.0/10 hosts, ports from 1024 on.
        let host = (100u32 << 24 | 64 << 16) + (i % 4_000_000);
        let key = FlowKey4::new(
            [192, 0, 2, 1],
            host.to_be_bytes(),
            (1024 + (i / 60_000) as u16, 443),
            6,
            zone::OWN,
            1,
        );
        map.insert(key, flow, 0)?;
    }
    Ok(())
}

fn time_tc_from(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
    ingress: u32,
    repeat: u32,
) -> Result<(u32, f64)> {
    let skb = testrun::Skb { ingress_ifindex: ingress, ..Default::default() };
    testrun::time_tc(dp, hook, frame, skb, repeat)
}

/// Section 5: the services' programs and their map sync.
///
/// BPF_PROG_TEST_RUN repeats run on one buffer, which a rewrite changes: the rewriting
/// paths are timed on a pair of services that are each other's backend (100.101.200.2:80 →
/// :8080 and :8080 → :80), so every repeat translates an established flow (or its reply)
/// back and forth. A new flow is timed by single runs on distinct flows, less the single
/// runs of the miss path, plus the miss path's repeated time.
fn services() -> Result<()> {
    use tailgate_tests::packets::{tcp, udp};
    const SINGLES: u16 = 20_000;
    println!("## Services (BPF_PROG_TEST_RUN)\n");
    println!(
        "Median of {RUNS} runs of {REPEAT} repeats (established and reply: two services that are each \
         other's backend, so each repeat translates); new flow: the miss's time plus the difference of \
         the medians of {SINGLES} single runs on distinct flows and on misses. 3 backends per service.\n"
    );
    println!("| services | program | path | verdict | ns/packet |");
    println!("|---:|---|---|---|---:|");
    let peer = "100.101.2.3";
    let mut applied = Vec::new();
    for (count, table_size) in [(1usize, 16_381u32), (10_000, 1_021)] {
        let toml = services_config(count, table_size);
        let config = Config::parse(&toml, &Default::default())?;
        let mut dp = Datapath::load_with(None, KernelLog::Off, testrun::params(&config))?;
        let started = Instant::now();
        dp.sync(&policy::compile(&config, system()))?;
        let first = started.elapsed();
        // New flows go to the last service configured.
        let (vip, port) = ("100.101.200.1", 1000 + count as u16 - 1);
        let repeated = |dp: &mut Datapath, hook: Hook, frame: &[u8]| -> Result<(u32, f64)> {
            let mut samples = Vec::new();
            let mut verdict = 0;
            for _ in 0..RUNS {
                let (v, ns) = time_tc_from(dp, hook, frame, 0, REPEAT)?;
                verdict = v;
                samples.push(ns);
            }
            samples.sort_by(|a, b| a.total_cmp(b));
            Ok((verdict, samples[RUNS / 2]))
        };
        let singles = |dp: &mut Datapath, hook: Hook, frame: &dyn Fn(u16) -> Vec<u8>| -> Result<f64> {
            let mut samples = Vec::new();
            for i in 0..SINGLES {
                samples.push(time_tc_from(dp, hook, &frame(i), 0, 1)?.1);
            }
            samples.sort_by(|a, b| a.total_cmp(b));
            Ok(samples[samples.len() / 2])
        };
        let row = |program: &str, path: &str, hook: Hook, verdict: u32, ns: f64| {
            println!(
                "| {} | {program} | {path} | {} | {ns:.0} |",
                thousands(count),
                verdict_name(hook, verdict)
            );
        };
        let (ingress, egress) = ("tunnel TC ingress (service_in)", "tunnel TC egress (service_out)");
        // Misses: packets for no service, into the tunnel answering no flow.
        let (v, miss_in) = repeated(&mut dp, Hook::ServiceIn, &udp(peer, "192.0.2.2", 5000, 53))?;
        row(ingress, "not for a service (one lookup)", Hook::ServiceIn, v, miss_in);
        let (v, miss_out) = repeated(&mut dp, Hook::ServiceOut, &udp("192.0.2.2", peer, 53, 5000))?;
        row(egress, "not a reply (one lookup)", Hook::ServiceOut, v, miss_out);
        let single_miss_in = singles(&mut dp, Hook::ServiceIn, &|i| udp(peer, "192.0.2.2", 5000 + i, 53))?;
        // The pair of services that are each other's backend: open both flows.
        let pair = "100.101.200.2";
        for dport in [80, 8080] {
            run_service(&mut dp, Hook::ServiceIn, &tcp(peer, pair, 40000, dport, Tcp::Syn))?;
        }
        let (v, established) = repeated(&mut dp, Hook::ServiceIn, &tcp(peer, pair, 40000, 80, Tcp::Data))?;
        row(ingress, "established flow: to its backend", Hook::ServiceIn, v, established);
        let (v, reply) = repeated(&mut dp, Hook::ServiceOut, &tcp(pair, peer, 8080, 40000, Tcp::Data))?;
        row(egress, "reply: translated back", Hook::ServiceOut, v, reply);
        let reverse = testrun::counters(&dp)?[&Counter::ServiceReverseNat];
        anyhow::ensure!(reverse >= REPEAT as u64, "the replies were not translated ({reverse})");
        let balanced_before = testrun::counters(&dp)?[&Counter::ServiceBalanced];
        let new = singles(&mut dp, Hook::ServiceIn, &|i| tcp(peer, vip, 10_000 + i, port, Tcp::Syn))?;
        let balanced = testrun::counters(&dp)?[&Counter::ServiceBalanced] - balanced_before;
        anyhow::ensure!(balanced == u64::from(SINGLES), "{balanced} flows balanced, not {SINGLES}");
        row(
            ingress,
            "new flow: table + two entries",
            Hook::ServiceIn,
            u32::MAX,
            miss_in + new - single_miss_in,
        );
        // One service's backends changed: one new table, one entry per generation.
        let changed = toml.replacen("\"10.0.0.1:8080\"", "\"10.0.0.1:8081\"", 1);
        let config = Config::parse(&changed, &Default::default())?;
        let started = Instant::now();
        dp.sync(&policy::compile(&config, system()))?;
        let one = started.elapsed();
        let memory = count as u64 * u64::from(table_size).div_ceil(2) * 8;
        applied.push((count, table_size, first, one, memory));
    }
    println!("\n| services | table size | apply all (first sync) | change one service | tables' memory |");
    println!("|---:|---:|---:|---:|---:|");
    for (count, size, first, one, memory) in applied {
        println!(
            "| {} | {} | {:.1} ms | {:.1} ms | {:.1} MiB |",
            thousands(count),
            thousands(size as usize),
            first.as_secs_f64() * 1e3,
            one.as_secs_f64() * 1e3,
            memory as f64 / f64::from(1 << 20)
        );
    }
    Ok(())
}

/// `count` services on 100.101.200.1, ports 1000 on, each with 3 of 1,000 backend addresses
/// (10.0.0.0/22 on port 8080); and the pair of services on 100.101.200.2 that are each
/// other's backend.
fn services_config(count: usize, table_size: u32) -> String {
    let mut toml = String::from(
        "tunnel = \"tun0\"\nbackend = \"bpf\"\n\
         [[service]]\nlisten = \"100.101.200.2:80\"\nbackends = [\"100.101.200.2:8080\"]\n\
         [[service]]\nlisten = \"100.101.200.2:8080\"\nbackends = [\"100.101.200.2:80\"]\n",
    );
    for i in 0..count {
        let backends: Vec<String> = (0..3)
            .map(|k| {
                let j = (i * 3 + k) % 1_000;
                format!("\"10.0.{}.{}:8080\"", j / 250, j % 250 + 1)
            })
            .collect();
        toml.push_str(&format!(
            "[[service]]\nlisten = \"100.101.200.1:{}\"\ntable_size = {table_size}\nbackends = [{}]\n",
            1000 + i,
            backends.join(", ")
        ));
    }
    toml
}

fn run_service(dp: &mut Datapath, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let out = testrun::run_tunnel(dp, hook, frame, 0, 0)?;
    Ok((out.verdict, out.frame))
}

/// Section 6: the masquerade's programs, in a namespace whose uplink the route lookup picks
/// the address from.
///
/// Repeats run on one buffer, which a rewrite changes: the established and reply paths are
/// timed on a flow whose translation is itself (a client on the uplink's address with a port
/// of the range, which it keeps), so every repeat takes the same path and rewrites in full.
/// A new flow: the difference of the medians of single runs on distinct flows and on
/// unmarked packets, plus the unmarked path's repeated time.
fn masquerade() -> Result<()> {
    use tailgate_tests::{
        netns::{veth, Netns},
        packets::{tcp, udp},
        testrun::{time_tc, Skb},
    };
    const SINGLES: u16 = 20_000;
    println!("## Masquerade (BPF_PROG_TEST_RUN)\n");
    println!(
        "Median of {RUNS} runs of {REPEAT} repeats; new flow: the unmarked path's time plus the \
         difference of the medians of {SINGLES} single runs on distinct new flows and on unmarked \
         packets.\n"
    );
    println!("| program | path | verdict | ns/packet |");
    println!("|---|---|---|---:|");
    let gw = Netns::new("tg-bench-mq")?;
    let lan = Netns::new("tg-bench-mql")?;
    veth(&gw, "eth0", &lan, "eth0")?;
    gw.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])?;
    gw.sysctl("net.ipv4.ip_forward", "1")?;
    let config = Config::parse("tunnel = \"tun0\"\nbackend = \"bpf\"\n", &Default::default())?;
    let mut dp = Datapath::load_with(None, KernelLog::Off, testrun::params(&config))?;
    dp.sync(&policy::compile(&config, system()))?;
    let dp = &mut dp;
    gw.enter(move || {
        let uplink = nix::net::if_::if_nametoindex("eth0")?;
        let marked = Skb { mark: 0x40000, ingress_ifindex: 7, ifindex: uplink };
        let arriving = Skb { ifindex: uplink, ..Skb::default() };
        let singles = |dp: &mut Datapath, frame: &dyn Fn(u16) -> Vec<u8>, skb: Skb| {
            singles(dp, Hook::MasqueradeOut, frame, skb, SINGLES)
        };
        let row = |program: &str, path: &str, hook: Hook, verdict: u32, ns: f64| {
            println!("| {program} | {path} | {} | {ns:.0} |", verdict_name(hook, verdict));
        };
        let (out, into) = ("uplink TC egress (masquerade_out)", "uplink TC ingress (masquerade_in)");
        let unmarked = Skb { mark: 0, ..marked };
        let (v, pass) =
            repeated(dp, Hook::MasqueradeOut, &udp("192.0.2.9", "192.0.2.2", 5000, 53), unmarked)?;
        row(out, "not marked (the host's own, forwarded from the LAN)", Hook::MasqueradeOut, v, pass);
        let (v, ns) = repeated(dp, Hook::MasqueradeIn, &udp("192.0.2.2", "192.0.2.1", 53, 40_000), arriving)?;
        row(into, "port outside the range (no lookup)", Hook::MasqueradeIn, v, ns);
        let (v, ns) = repeated(dp, Hook::MasqueradeIn, &udp("192.0.2.2", "192.0.2.1", 53, 62_001), arriving)?;
        row(into, "port in the range, no flow (one lookup)", Hook::MasqueradeIn, v, ns);
        // The flow that translates to itself.
        let (client, server) = ("192.0.2.1", "192.0.2.2");
        time_tc(dp, Hook::MasqueradeOut, &tcp(client, server, 62_000, 80, Tcp::Syn), marked, 1)?;
        let (v, ns) = repeated(dp, Hook::MasqueradeOut, &tcp(client, server, 62_000, 80, Tcp::Data), marked)?;
        row(out, "established flow: translated", Hook::MasqueradeOut, v, ns);
        let (v, ns) =
            repeated(dp, Hook::MasqueradeIn, &tcp(server, client, 80, 62_000, Tcp::Data), arriving)?;
        row(into, "reply: translated back", Hook::MasqueradeIn, v, ns);
        let back = testrun::counters(dp)?[&Counter::Unmasqueraded];
        anyhow::ensure!(back >= REPEAT as u64, "the replies were not translated ({back})");
        let single_pass = singles(dp, &|i| udp("192.0.2.9", "192.0.2.2", 5000 + i, 53), unmarked)?;
        let before = testrun::counters(dp)?[&Counter::MasqueradeNew];
        // Distinct servers: one server port gives out at most the range's 4,536 ports.
        let new = singles(dp, &|i| tcp("100.101.2.3", "192.0.2.2", 10_000, 1 + i, Tcp::Syn), marked)?;
        let opened = testrun::counters(dp)?[&Counter::MasqueradeNew] - before;
        anyhow::ensure!(opened == u64::from(SINGLES), "{opened} flows opened, not {SINGLES}");
        row(
            out,
            "new flow: route lookup, port, two entries",
            Hook::MasqueradeOut,
            u32::MAX,
            pass + new - single_pass,
        );
        Ok(())
    })
}

/// Section 7: the egress proxy's programs, in a namespace with an uplink and a tunnel (the
/// programs key flows on their ifindexes).
///
/// Repeats run on one buffer, which a rewrite changes (a DNAT to the target cannot translate
/// to itself): a translating path is timed as the repeated time of a path of the same program
/// that does not translate, plus the difference of the medians of single runs of the two
/// (single runs carry a fixed overhead that the difference cancels).
fn egress_proxy() -> Result<()> {
    use tailgate_tests::{
        netns::{veth, Netns},
        packets::{tcp, udp},
        testrun::{time_tc, Skb},
        tun::Tun,
    };
    const SINGLES: u16 = 20_000;
    let (client, gw, target, tailnet) = ("192.0.2.2", "192.0.2.1", "100.101.2.3", "100.101.0.1");
    println!("## Egress proxy (BPF_PROG_TEST_RUN)\n");
    println!(
        "Median of {RUNS} runs of {REPEAT} repeats where the packet is not translated; a translated \
         packet: that time plus the difference of the medians of {SINGLES} single runs of each.\n"
    );
    println!("| program | path | verdict | ns/packet |");
    println!("|---|---|---|---:|");
    let ns = Netns::new("tg-bench-ep")?;
    let lan = Netns::new("tg-bench-epl")?;
    veth(&ns, "eth0", &lan, "eth0")?;
    let _tun = Tun::open(&ns, "tun0")?;
    let toml = format!("tunnel = \"tun0\"\nbackend = \"bpf\"\n[proxy]\negress_to = \"{target}\"\n");
    let config = Config::parse(&toml, &Default::default())?;
    let mut dp = Datapath::load_with(None, KernelLog::Off, testrun::params(&config))?;
    dp.sync(&policy::compile(&config, testrun::system()))?;
    let dp = &mut dp;
    ns.enter(move || {
        let uplink = nix::net::if_::if_nametoindex("eth0")?;
        let tunnel = nix::net::if_::if_nametoindex("tun0")?;
        let arriving = Skb { ifindex: uplink, ..Skb::default() };
        let to_tunnel = Skb { ingress_ifindex: uplink, ifindex: tunnel, ..Skb::default() };
        let from_tunnel = Skb { ifindex: tunnel, ..Skb::default() };
        let to_uplink = Skb { ingress_ifindex: tunnel, ifindex: uplink, ..Skb::default() };
        let own = Skb { ifindex: uplink, ..Skb::default() };
        let row = |program: &str, path: &str, hook: Hook, verdict: u32, ns: f64| {
            println!("| {program} | {path} | {} | {ns:.0} |", verdict_name(hook, verdict));
        };
        // A translating path: `base` (not translated, repeated) plus the single-run difference.
        let translated = |dp: &mut Datapath,
                          hook: Hook,
                          (base, skb): (&[u8], Skb),
                          frame: &dyn Fn(u16) -> Vec<u8>,
                          counter: Counter|
         -> Result<f64> {
            let (_, repeated_base) = repeated(dp, hook, base, skb)?;
            let single_base = singles(dp, hook, &|_| base.to_vec(), skb, SINGLES)?;
            let before = testrun::counters(dp)?[&counter];
            let single = singles(dp, hook, frame, skb, SINGLES)?;
            let counted = testrun::counters(dp)?[&counter] - before;
            anyhow::ensure!(counted == u64::from(SINGLES), "{counter:?}: {counted} of {SINGLES}");
            Ok(repeated_base + single - single_base)
        };
        let (uplink_in, proxy_out) =
            ("uplink TC ingress (service_uplink_in)", "tunnel TC egress (proxy_out)");
        let (tunnel_in, uplink_out) =
            ("tunnel TC ingress (service_in)", "uplink TC egress (service_uplink_out)");

        // Not the proxy's: forwarded through the gateway; a reply to its own connection.
        let forwarded = udp(client, "192.0.2.9", 5000, 53);
        let (v, ns) = repeated(dp, Hook::ServiceUplinkIn, &forwarded, arriving)?;
        row(uplink_in, "forwarded (not for the gateway)", Hook::ServiceUplinkIn, v, ns);
        let own_query = udp(gw, client, 45_000, 53);
        let (v, ns) = repeated(dp, Hook::UplinkEgress, &own_query, own)?;
        let what = "the gateway's own UDP packet: flow recorded / refreshed";
        row("uplink TC egress (uplink_egress)", what, Hook::UplinkEgress, v, ns);
        let own_answer = udp(client, gw, 53, 45_000);
        let (v, ns) = repeated(dp, Hook::ServiceUplinkIn, &own_answer, arriving)?;
        anyhow::ensure!(
            v == u32::MAX && testrun::counters(dp)?[&Counter::ServiceDnat] == 0,
            "the answer was taken"
        );
        row(uplink_in, "UDP answer to the gateway's own flow (untouched)", Hook::ServiceUplinkIn, v, ns);
        let segment = tcp(client, gw, 80, 45_001, Tcp::Data);
        let (v, ns) = repeated(dp, Hook::ServiceUplinkIn, &segment, arriving)?;
        row(
            uplink_in,
            "TCP segment, not a SYN, of no proxied flow (untouched)",
            Hook::ServiceUplinkIn,
            v,
            ns,
        );
        let not_target = udp(client, "100.101.2.9", 5000, 53);
        let (v, ns) = repeated(dp, Hook::ProxyOut, &not_target, to_tunnel)?;
        row(proxy_out, "forwarded, not to the target", Hook::ProxyOut, v, ns);

        // One flow (opened by its SYN), each of its four steps timed.
        time_tc(dp, Hook::ServiceUplinkIn, &tcp(client, gw, 40_000, 5432, Tcp::Syn), arriving, 1)?;
        let request = tcp(client, gw, 40_000, 5432, Tcp::Data);
        let dnat = translated(
            dp,
            Hook::ServiceUplinkIn,
            (&forwarded, arriving),
            &|_| request.clone(),
            Counter::ServiceDnat,
        )?;
        row(uplink_in, "established flow: to the target", Hook::ServiceUplinkIn, u32::MAX, dnat);
        let to_target = tcp(client, target, 40_000, 5432, Tcp::Data);
        let snat = translated(
            dp,
            Hook::ProxyOut,
            (&not_target, to_tunnel),
            &|_| to_target.clone(),
            Counter::EgressProxied,
        )?;
        row(
            proxy_out,
            "established flow: from the gateway's tailnet address",
            Hook::ProxyOut,
            u32::MAX,
            snat,
        );
        let flow = dp_flow_port(dp, target)?;
        let reply = tcp(target, tailnet, 5432, flow, Tcp::Data);
        let other = udp("100.101.2.9", tailnet, 53, 5000);
        let back = translated(
            dp,
            Hook::ServiceIn,
            (&other, from_tunnel),
            &|_| reply.clone(),
            Counter::EgressProxyReplies,
        )?;
        row(tunnel_in, "reply: back to the client", Hook::ServiceIn, u32::MAX, back);
        let answer = tcp(target, client, 5432, 40_000, Tcp::Data);
        let unrelated = udp("100.101.2.9", client, 53, 5000);
        let reverse = translated(
            dp,
            Hook::ServiceUplinkOut,
            (&unrelated, to_uplink),
            &|_| answer.clone(),
            Counter::ServiceReverseNat,
        )?;
        row(
            uplink_out,
            "reply: from the address the client called",
            Hook::ServiceUplinkOut,
            u32::MAX,
            reverse,
        );

        // New flows: distinct ports.
        let new_dnat = translated(
            dp,
            Hook::ServiceUplinkIn,
            (&forwarded, arriving),
            &|i| tcp(client, gw, 10_000, 1 + i, Tcp::Syn),
            Counter::ServiceBalanced,
        )?;
        row(uplink_in, "new flow: DNAT, two entries", Hook::ServiceUplinkIn, u32::MAX, new_dnat);
        let new_snat = translated(
            dp,
            Hook::ProxyOut,
            (&not_target, to_tunnel),
            &|i| tcp(client, target, 10_000, 1 + i, Tcp::Syn),
            Counter::EgressProxyNew,
        )?;
        row(proxy_out, "new flow: port, two entries", Hook::ProxyOut, u32::MAX, new_snat);
        Ok(())
    })
}

/// The port the egress proxy gave the one IPv4 flow to `target` in the flow table.
fn dp_flow_port(dp: &Datapath, target: &str) -> Result<u16> {
    use tailgate_abi::conntrack::zone;
    let target: Ipv4Addr = target.parse()?;
    testrun::flows4(dp)?
        .into_iter()
        .find(|(key, _)| key.zone == zone::SNAT && key.dst == target.octets())
        .map(|(_, flow)| flow.nat.port)
        .ok_or_else(|| anyhow::anyhow!("no SNAT entry to {target}"))
}

/// The median over `RUNS` of a TC program's time per packet over `REPEAT` repeats, and its
/// verdict.
fn repeated(dp: &mut Datapath, hook: Hook, frame: &[u8], skb: testrun::Skb) -> Result<(u32, f64)> {
    let mut samples = Vec::new();
    let mut verdict = 0;
    for _ in 0..RUNS {
        let (v, ns) = testrun::time_tc(dp, hook, frame, skb, REPEAT)?;
        verdict = v;
        samples.push(ns);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok((verdict, samples[RUNS / 2]))
}

/// The median time of `count` single runs of a TC program, on `frame(0..count)`.
fn singles(
    dp: &mut Datapath,
    hook: Hook,
    frame: &dyn Fn(u16) -> Vec<u8>,
    skb: testrun::Skb,
    count: u16,
) -> Result<f64> {
    let mut samples = Vec::new();
    for i in 0..count {
        samples.push(testrun::time_tc(dp, hook, &frame(i), skb, 1)?.1);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples[samples.len() / 2])
}
