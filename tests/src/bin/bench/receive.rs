//! Section `receive`: what filtering costs the receiving side of real traffic, four ways —
//! no filtering, the floor (a trivial XDP program with the verdict tailgate must reach),
//! tailgate's XDP program, tailgate's iptables rules — at 1, 1,000, 10,000 and 100,000 user
//! prefixes, for traffic outside CGNAT, CGNAT sources the policy drops, and exempt sources.
//!
//! Per policy size, in each round, every way is measured on every traffic one after the
//! other (iptables rules installed, the three floods, rules removed; the passing floor,
//! which is "no filtering"; the dropping floor; tailgate's program): drift of the machine
//! between rounds cancels in the ratios of one round, whose medians are reported.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Result;
use tailgate::{config::Config, daemon::iptables_options, policy};
use tailgate_abi::counters::Counter;
use tailgate_tests::traffic::{
    self, check, check_counted, Fate, FloorProgram, Generator, IptablesRules, Measurement, Rig, Verdict,
};

use super::{cgnat_not_in, exempt, load, non_cgnat, policy_of, system, thousands, ROUNDS, WINDOW};

/// Policy sizes: user prefixes (exemptions) in the config.
pub const SIZES: [usize; 4] = [1, 1_000, 10_000, 100_000];
/// Far above what one sender core reaches in `WINDOW`: only a bound.
const PACKET_CAP: u64 = 20_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Traffic {
    /// Sources outside the filtered ranges (most real traffic).
    NonCgnat,
    /// CGNAT sources no exemption covers: dropped.
    Dropped,
    /// Sources inside the exemptions: passed.
    Exempt,
}

impl Traffic {
    pub const ALL: [Traffic; 3] = [Traffic::NonCgnat, Traffic::Dropped, Traffic::Exempt];

    pub fn name(self) -> &'static str {
        match self {
            Traffic::NonCgnat => "non-CGNAT sources (pass)",
            Traffic::Dropped => "CGNAT sources, not exempt (drop)",
            Traffic::Exempt => "exempt CGNAT sources (pass)",
        }
    }

    fn dropped(self) -> bool {
        self == Traffic::Dropped
    }

    /// The counter tailgate's program must count every packet under.
    fn counter(self) -> Counter {
        match self {
            Traffic::NonCgnat => Counter::UplinkPassNoMatch,
            Traffic::Dropped => Counter::UplinkDrop,
            Traffic::Exempt => Counter::UplinkPassRule,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Way {
    /// The passing floor and no rules: the stack does all the work.
    None,
    /// A trivial XDP program with the verdict tailgate must reach (for passed traffic the
    /// same as `None`).
    Floor,
    Bpf,
    Iptables,
}

impl Way {
    pub fn name(self) -> &'static str {
        match self {
            Way::None => "no filtering",
            Way::Floor => "XDP floor",
            Way::Bpf => "tailgate BPF",
            Way::Iptables => "tailgate iptables",
        }
    }
}

/// The measurements of one policy size and traffic, per way, one per round.
pub struct Row {
    pub prefixes: usize,
    pub traffic: Traffic,
    pub ways: BTreeMap<Way, Vec<Measurement>>,
}

impl Row {
    /// Median ns/packet of a way.
    pub fn ns(&self, way: Way) -> f64 {
        traffic::median(self.of(way).iter().map(|m| m.ns_per_packet))
    }

    /// Median over rounds of `a / b` (ns/packet of the same round).
    pub fn ratio(&self, a: Way, b: Way) -> f64 {
        traffic::median(self.of(a).iter().zip(self.of(b)).map(|(x, y)| x.ns_per_packet / y.ns_per_packet))
    }

    /// Median over rounds of `a − b`, ns.
    pub fn above(&self, a: Way, b: Way) -> f64 {
        traffic::median(self.of(a).iter().zip(self.of(b)).map(|(x, y)| x.ns_per_packet - y.ns_per_packet))
    }

    /// The passing floor stands in for the floor of passed traffic.
    fn of(&self, way: Way) -> &[Measurement] {
        let way = if way == Way::Floor && !self.traffic.dropped() { Way::None } else { way };
        &self.ways[&way]
    }

    fn push(&mut self, way: Way, m: Measurement) {
        self.ways.entry(way).or_default().push(m);
    }
}

pub fn run() -> Result<Vec<Row>> {
    println!(
        "## Receive cost: no filtering, XDP floor, tailgate BPF, tailgate iptables (veth, real traffic)\n"
    );
    // Two receivers: tailgate's iptables rules live in the second one's namespace for all
    // rounds of a size (writing 100,000 rules takes minutes with iptables-nft; the rules
    // cannot be in place while the first receiver measures the ways without them).
    let rigs = (Rig::new()?, Rig::new()?);
    if let Ok(secs) = std::env::var("TAILGATE_BENCH_QUIET_WAIT") {
        rigs.0.set_quiet_budget(std::time::Duration::from_secs(secs.parse()?));
    }
    let pass = FloorProgram::load(Verdict::Pass)?;
    let drop = FloorProgram::load(Verdict::Drop)?;
    let mut rows = Vec::new();
    let mut writes = Vec::new();
    for prefixes in super::sizes(&SIZES)? {
        let (size_rows, write) = size(&rigs, prefixes, &pass, &drop)?;
        rows.extend(size_rows);
        writes.push((prefixes, write));
    }
    print_table(&rows, &writes);
    Ok(rows)
}

/// How long installing and removing tailgate's iptables rules took at one size.
struct Write {
    variant: &'static str,
    install: Duration,
    remove: Duration,
}

/// All rounds at one policy size.
fn size(
    rigs: &(Rig, Rig),
    prefixes: usize,
    pass: &FloorProgram,
    drop: &FloorProgram,
) -> Result<(Vec<Row>, Write)> {
    let (rig, filtered) = rigs;
    let (config, _, _) = policy_of(prefixes)?;
    let state = policy::compile(&config, system());
    // The pin directory only names the backend's sets here.
    let pins = tailgate::backend::bpf::Pins::new("/sys/fs/bpf/tailgate-bench");
    let opts = iptables_options(&Config::parse("tunnel = \"tun0\"", &Default::default())?, &pins);
    let mut dp = load(&config)?;
    let mut not_exempt = config.cgnat.allow.clone();
    not_exempt.push("100.115.92.0/23".parse()?);
    let sources = [
        (Traffic::NonCgnat, non_cgnat()),
        (Traffic::Dropped, cgnat_not_in(&not_exempt)),
        (Traffic::Exempt, exempt(&config.cgnat.allow)),
    ];
    let generators = |rig: &Rig| -> Result<Vec<(Traffic, Generator)>> {
        sources.iter().map(|(t, s)| Ok((*t, Generator::new(rig, s)?))).collect()
    };
    let (plain, to_filtered) = (generators(rig)?, generators(filtered)?);
    eprintln!("installing {} prefixes as iptables rules ...", thousands(prefixes));
    let started = Instant::now();
    let rules = IptablesRules::install(filtered, opts, &state)?;
    let install = started.elapsed();
    let variant = rules.variant();

    let mut rows: Vec<Row> =
        Traffic::ALL.iter().map(|&traffic| Row { prefixes, traffic, ways: BTreeMap::new() }).collect();
    for round in 1..=ROUNDS {
        eprintln!("measuring: {} prefixes, round {round} of {ROUNDS} ...", thousands(prefixes));
        rig.wait_quiet()?;

        let att = filtered.attach_floor(pass)?;
        for ((traffic, generator), row) in to_filtered.iter().zip(&mut rows) {
            let m = filtered.measure(&att, generator, WINDOW, PACKET_CAP)?;
            let fate = if traffic.dropped() { Fate::NetfilterDrop } else { Fate::Delivered };
            check("iptables", fate, &m)?;
            row.push(Way::Iptables, m);
        }
        att.detach()?;

        let att = rig.attach_floor(pass)?;
        for ((_, generator), row) in plain.iter().zip(&mut rows) {
            let m = rig.measure(&att, generator, WINDOW, PACKET_CAP)?;
            check("no filtering", Fate::Delivered, &m)?;
            row.push(Way::None, m);
        }
        att.detach()?;

        let att = rig.attach_floor(drop)?;
        for ((traffic, generator), row) in plain.iter().zip(&mut rows) {
            if traffic.dropped() {
                let m = rig.measure(&att, generator, WINDOW, PACKET_CAP)?;
                check("dropping floor", Fate::XdpDrop, &m)?;
                row.push(Way::Floor, m);
            }
        }
        att.detach()?;

        let att = rig.attach_subject(&mut dp)?;
        for ((traffic, generator), row) in plain.iter().zip(&mut rows) {
            let before = tailgate_tests::testrun::counters(&dp)?[&traffic.counter()];
            let m = rig.measure(&att, generator, WINDOW, PACKET_CAP)?;
            check_counted(&dp, traffic.counter(), before, &m)?;
            let fate = if traffic.dropped() { Fate::XdpDrop } else { Fate::Delivered };
            check("tailgate", fate, &m)?;
            row.push(Way::Bpf, m);
        }
        att.detach()?;
        for row in &rows {
            let last = |w: Way| row.of(w).last().map(|m| m.ns_per_packet).unwrap_or(f64::NAN);
            eprintln!(
                "  {}: none {:.0}, floor {:.0}, bpf {:.0}, iptables {:.0} ns/pkt",
                row.traffic.name(),
                last(Way::None),
                last(Way::Floor),
                last(Way::Bpf),
                last(Way::Iptables)
            );
        }
    }
    let started = Instant::now();
    rules.remove()?;
    Ok((rows, Write { variant, install, remove: started.elapsed() }))
}

fn print_table(rows: &[Row], writes: &[(usize, Write)]) {
    println!("{}\n", super::machine());
    println!(
        "{ROUNDS} rounds; in each, every way on every traffic for {:.1} s (4,096 source addresses, \
         60-byte UDP frames to the receiver); ns/pkt: the receiving veth's NAPI kthread's CPU time \
         (XDP, and for passed frames the stack up to UDP's discard) per frame taken off its \
         ring, median over rounds; ratios: medians of the per-round ratios. Frames per NAPI \
         sleep: how many frames a poll found on average (a full ring holds 256); a few dozen \
         means the sender could not keep the receiver busy and wake-ups weigh on ns/pkt.\n",
        WINDOW.as_secs_f64()
    );
    println!(
        "| prefixes | traffic | no filtering | XDP floor | tailgate BPF | tailgate iptables | BPF − floor | bpf/xdp_floor | iptables/bpf | iptables/none | frames per NAPI sleep (fewest, XDP ways) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:+.0} | {:.2} | {:.2} | {:.2} | {:.0} |",
            thousands(r.prefixes),
            r.traffic.name(),
            r.ns(Way::None),
            r.ns(Way::Floor),
            r.ns(Way::Bpf),
            r.ns(Way::Iptables),
            r.above(Way::Bpf, Way::Floor),
            r.ratio(Way::Bpf, Way::Floor),
            r.ratio(Way::Iptables, Way::Bpf),
            r.ratio(Way::Iptables, Way::None),
            // The fast ways: where a poll is microseconds, wake-ups can weigh.
            r.ways
                .iter()
                .filter(|(way, _)| **way != Way::Iptables)
                .map(|(_, ms)| ms)
                .map(|ms| traffic::median(ms.iter().map(|m| m.processed as f64 / m.sleeps.max(1) as f64)))
                .fold(f64::INFINITY, f64::min),
        );
    }
    println!(
        "\ntailgate's iptables rules (the daemon's writer): installed / removed in {}.",
        writes
            .iter()
            .map(|(n, w)| format!(
                "{:.1} s / {:.1} s at {} (iptables-{})",
                w.install.as_secs_f64(),
                w.remove.as_secs_f64(),
                thousands(*n),
                w.variant
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let other = rows.iter().flat_map(|r| r.ways.values().flatten()).map(|m| m.other_load).fold(0.0, f64::max);
    if other > traffic::MAX_OTHER_LOAD {
        println!(
            "\nWARNING: other tasks took up to {:.0} % of CPU {} during the measurements: these \
             numbers are inflated and noisy. Run the bench on an otherwise idle machine.",
            other * 100.0,
            traffic::NAPI_CPU
        );
    }
    println!();
}
