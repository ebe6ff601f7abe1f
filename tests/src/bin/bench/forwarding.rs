//! Section `forwarding`: a gateway forwarding tailnet clients' TCP segments to a LAN host and
//! the answers back (see `tailgate_tests::forwarding`), three ways — the kernel alone, the
//! daemon with the BPF backend, the daemon with the iptables backend (default config: mark,
//! MSS clamp, masquerade) — in interleaved rounds.

use std::collections::BTreeMap;

use anyhow::Result;
use tailgate_tests::{
    forwarding::{median, Direction, Gateway, Sample, Way, FLOWS},
    traffic::{self, FloorProgram, Verdict},
};

use super::{thousands, ROUNDS, WINDOW};

pub struct Results {
    pub samples: BTreeMap<(Direction, Way), Vec<Sample>>,
}

impl Results {
    pub fn of(&self, direction: Direction, way: Way) -> &[Sample] {
        &self.samples[&(direction, way)]
    }

    /// Median over rounds of the ratio of two ways' ns/packet in the same round.
    pub fn ratio(&self, direction: Direction, a: Way, b: Way) -> f64 {
        traffic::median(
            self.of(direction, a)
                .iter()
                .zip(self.of(direction, b))
                .map(|(x, y)| x.ns_per_packet / y.ns_per_packet),
        )
    }
}

pub fn run() -> Result<Results> {
    println!("## Forwarding through the gateway: tunnel → LAN and back (TUN + veth, real traffic)\n");
    let passing = FloorProgram::load(Verdict::Pass)?;
    let dropping = FloorProgram::load(Verdict::Drop)?;
    let mut results = Results { samples: BTreeMap::new() };
    for round in 1..=ROUNDS {
        eprintln!("measuring: forwarding, round {round} of {ROUNDS} ...");
        for way in Way::ALL {
            // A new gateway each time: nothing one way leaves in a namespace (netfilter's
            // tables and hooks, conntrack entries, pinned flows) weighs on the next.
            let gateway = Gateway::new(&dropping)?;
            let answers = gateway.answers(way)?;
            let running = gateway.run(way, &passing)?;
            let out = running.tunnel_to_lan(WINDOW)?;
            let back = running.lan_to_tunnel(&answers, WINDOW)?;
            running.stop()?;
            eprintln!(
                "  {}: tunnel → LAN {:.0} ns/pkt ({:.0} pps), LAN → tunnel {:.0} ns/pkt ({:.0} pps)",
                way.name(),
                out.ns_per_packet,
                out.pps,
                back.ns_per_packet,
                back.pps
            );
            results.samples.entry((Direction::TunnelToLan, way)).or_default().push(out);
            results.samples.entry((Direction::LanToTunnel, way)).or_default().push(back);
        }
    }
    print_table(&results);
    Ok(results)
}

fn print_table(results: &Results) {
    println!("{}\n", super::machine());
    println!(
        "{ROUNDS} rounds; in each, every way started (daemon with the default config: mark, MSS \
         clamp, masquerade), every one of {} flows' first segment sent through, then {:.1} s of \
         64-byte TCP segments each way (no SYNs: the MSS clamp only checks). CPU/pkt: the \
         receiving NAPI kthread's CPU time (the whole forwarding path) per packet; pps: \
         packets through per second of the measurement (flood and drain); busy: the \
         kthread's share of it; packets per sleep: few means wake-ups weigh; medians over \
         rounds, ratios: medians of per-round ratios.\n",
        thousands(FLOWS),
        WINDOW.as_secs_f64()
    );
    println!("| direction | way | CPU ns/pkt | pps | NAPI busy | packets per NAPI sleep | × kernel alone | iptables/bpf |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for direction in [Direction::TunnelToLan, Direction::LanToTunnel] {
        for way in Way::ALL {
            let samples = results.of(direction, way);
            let vs_bpf = if way == Way::Iptables {
                format!("{:.2}", results.ratio(direction, Way::Iptables, Way::Bpf))
            } else {
                String::new()
            };
            println!(
                "| {} | {} | {:.0} | {} | {:.0} % | {:.0} | {:.2} | {vs_bpf} |",
                match direction {
                    Direction::TunnelToLan => "tunnel → LAN",
                    Direction::LanToTunnel => "LAN → tunnel",
                },
                way.name(),
                median(samples, |s| s.ns_per_packet),
                thousands(median(samples, |s| s.pps) as usize),
                median(samples, |s| s.busy) * 100.0,
                median(samples, |s| s.packets as f64 / s.sleeps.max(1) as f64),
                results.ratio(direction, way, Way::Plain),
            );
        }
    }
    let other = results.samples.values().flatten().map(|s| s.other_load).fold(0.0, f64::max);
    if other > traffic::MAX_OTHER_LOAD {
        println!(
            "\nWARNING: other tasks took up to {:.0} % of CPU {} during the measurements: these \
             numbers are inflated and noisy.",
            other * 100.0,
            traffic::NAPI_CPU
        );
    }
    println!();
}
