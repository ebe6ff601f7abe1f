//! Section `daemon`: the control plane. The daemon (`$TAILGATE_BIN`, the release build under
//! `cargo xtask bench`) with each backend at 1 / 10,000 / 100,000 user prefixes and with
//! 10,000 services, in a throwaway topology: start (spawn to `READY=1`), reloads timed from
//! SIGHUP to `READY=1` (one prefix added; every prefix replaced), stop (SIGTERM to exit, its
//! datapath removed), resident memory, and the CPU it uses idle (the iptables backend's
//! repair loop reads its rules back every `repair_interval`).

use std::time::Duration;

use anyhow::Result;
use ipnet::{IpNet, Ipv4Net};
use tailgate_tests::{daemon::Daemon, topology::Topology};

use super::{policy_of, services_config, thousands};

pub const SIZES: [usize; 3] = [1, 10_000, 100_000];
pub const SERVICES: usize = 10_000;
/// How long the idle CPU is sampled.
const IDLE: Duration = Duration::from_secs(5);
/// What the largest policies may take on the iptables backend (minutes with iptables-nft).
const PATIENCE: Duration = Duration::from_secs(30 * 60);

/// What one daemon run measured.
pub struct Row {
    pub backend: &'static str,
    pub policy: String,
    /// Prefixes, or services, in the config.
    pub size: usize,
    pub start: Duration,
    pub reload_one: Duration,
    pub reload_all: Duration,
    pub stop: Duration,
    pub rss_kib: u64,
    pub peak_kib: u64,
    /// Share of one CPU the idle daemon used.
    pub idle_cpu: f64,
}

pub fn run() -> Result<Vec<Row>> {
    println!("## Control plane: the daemon's start, reloads, stop, memory and idle CPU\n");
    let mut rows = Vec::new();
    for backend in ["bpf", "iptables"] {
        for count in super::sizes(&SIZES)? {
            eprintln!("measuring: daemon, {backend}, {} prefixes ...", thousands(count));
            rows.push(prefixes(backend, count)?);
        }
        eprintln!("measuring: daemon, {backend}, {} services ...", thousands(SERVICES));
        rows.push(services(backend)?);
    }
    println!("{}\n", super::machine());
    println!(
        "start: spawn to READY=1; reload: SIGHUP to READY=1 (file read, parse, compile, apply); \
         stop: SIGTERM to exit with everything removed; memory: VmRSS after start / VmHWM (peak) \
         after the reloads; idle: CPU time over {} s after the last reload, share of one core.\n",
        IDLE.as_secs()
    );
    println!("| backend | policy | start | reload: one added | reload: all replaced | stop | memory / peak | idle CPU |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1} / {:.1} MiB | {:.1} % |",
            r.backend,
            r.policy,
            time(r.start),
            time(r.reload_one),
            time(r.reload_all),
            time(r.stop),
            r.rss_kib as f64 / 1024.0,
            r.peak_kib as f64 / 1024.0,
            r.idle_cpu * 100.0
        );
    }
    println!();
    Ok(rows)
}

fn time(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.0} ms", d.as_secs_f64() * 1000.0)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// `count` exemption /28s; the full replacement moves every one to the /29 at its start.
fn prefixes(backend: &'static str, count: usize) -> Result<Row> {
    let (config, _, _) = policy_of(count)?;
    let text = |allow: &[IpNet], drop: &[&str]| {
        let mut toml = format!(
            "tunnel = \"tun0\"\ninterfaces = [\"eth0\"]\nbackend = \"{backend}\"\n[subnet_routes]\nmasquerade = false\n[cgnat]\nallow = [\n"
        );
        for net in allow {
            toml.push_str(&format!("  \"{net}\",\n"));
        }
        toml.push_str("]\ndrop = [");
        toml.push_str(&drop.iter().map(|d| format!("\"{d}\"")).collect::<Vec<_>>().join(", "));
        toml.push_str("]\n");
        toml
    };
    let shifted: Vec<IpNet> = config
        .cgnat
        .allow
        .iter()
        .map(|net| match net {
            IpNet::V4(n) => IpNet::V4(Ipv4Net::new(n.network(), n.prefix_len() + 1).unwrap()),
            IpNet::V6(_) => unreachable!("v4 only"),
        })
        .collect();
    let first = text(&config.cgnat.allow, &[]);
    let one_more = text(&config.cgnat.allow, &["100.127.255.255/32"]);
    let policy = format!("{} prefixes", thousands(count));
    measure(backend, policy, count, &first, &one_more, &text(&shifted, &[]))
}

/// 10,000 services of 3 backends; the full replacement gives each a different address.
fn services(backend: &'static str) -> Result<Row> {
    let with_backend = |toml: String| {
        toml.replace("backend = \"bpf\"", &format!("backend = \"{backend}\"\ninterfaces = [\"eth0\"]"))
    };
    let first = with_backend(services_config(SERVICES, 1_021));
    let one_more =
        first.clone() + "[[service]]\nlisten = \"100.101.200.3:80\"\nbackends = [\"10.0.9.9:8080\"]\n";
    let replaced = first.replace("listen = \"100.101.200.1:", "listen = \"100.101.200.4:");
    measure(backend, format!("{} services", thousands(SERVICES)), SERVICES, &first, &one_more, &replaced)
}

fn measure(
    backend: &'static str,
    policy: String,
    size: usize,
    first: &str,
    one_more: &str,
    replaced: &str,
) -> Result<Row> {
    let t = Topology::new()?;
    let started = std::time::Instant::now();
    let mut daemon = Daemon::start_within(&t.gw, &t.pins, first, PATIENCE)?;
    let start = started.elapsed();
    let (rss_kib, _) = daemon.settled_memory_kib()?;
    daemon.write_config(one_more)?;
    let reload_one = daemon.timed_reload_within(PATIENCE)?;
    daemon.write_config(replaced)?;
    let reload_all = daemon.timed_reload_within(PATIENCE)?;
    let (_, peak_kib) = daemon.settled_memory_kib()?;
    let cpu0 = daemon.cpu_time()?;
    let idle_start = std::time::Instant::now();
    std::thread::sleep(IDLE);
    let idle_cpu = (daemon.cpu_time()? - cpu0).as_secs_f64() / idle_start.elapsed().as_secs_f64();
    let stop = daemon.timed_stop(PATIENCE)?;
    Ok(Row { backend, policy, size, start, reload_one, reload_all, stop, rss_kib, peak_kib, idle_cpu })
}
