//! The ratios the real-traffic sections support, in one table: what tailgate's program adds
//! to the floor, what the iptables backend costs next to it as the policy grows, forwarding,
//! the control plane.

use super::{
    control,
    forwarding::Results as Forwarding,
    receive::{Row as Receive, Traffic, Way},
    thousands,
};
use tailgate_tests::forwarding::{Direction, Way as Forward};

pub fn print(receive: &[Receive], forwarding: Option<&Forwarding>, control: &[control::Row]) {
    println!("## Ratios (one run; medians of per-round ratios, growth rows: ratios of medians)\n");
    println!(
        "| ratio | traffic | {} |",
        sizes(receive).iter().map(|n| thousands(*n)).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|---|{}", "---:|".repeat(sizes(receive).len()));
    let line = |name: &str, traffic: Traffic, f: &dyn Fn(&Receive) -> f64| {
        let cells: Vec<String> = sizes(receive)
            .iter()
            .map(|n| {
                receive
                    .iter()
                    .find(|r| r.prefixes == *n && r.traffic == traffic)
                    .map(|r| format!("{:.2}", f(r)))
                    .unwrap_or_default()
            })
            .collect();
        println!("| {name} | {} | {} |", traffic.name(), cells.join(" | "));
    };
    for traffic in Traffic::ALL {
        line("bpf / xdp_floor", traffic, &|r| r.ratio(Way::Bpf, Way::Floor));
    }
    for traffic in Traffic::ALL {
        line("iptables_N / bpf_N", traffic, &|r| r.ratio(Way::Iptables, Way::Bpf));
    }
    for traffic in Traffic::ALL {
        line("iptables_N / no filtering", traffic, &|r| r.ratio(Way::Iptables, Way::None));
    }
    // Growth with the policy: ratios of the medians (different sizes are not measured in
    // the same round).
    let smallest =
        |traffic: Traffic| receive.iter().filter(|r| r.traffic == traffic).min_by_key(|r| r.prefixes);
    for (name, way) in [("bpf_N / bpf_smallest", Way::Bpf), ("iptables_N / iptables_smallest", Way::Iptables)]
    {
        for traffic in Traffic::ALL {
            if let Some(first) = smallest(traffic).map(|r| r.ns(way)) {
                line(name, traffic, &|r| r.ns(way) / first);
            }
        }
    }
    println!();
    if let Some(f) = forwarding {
        println!("| forwarding | tunnel → LAN | LAN → tunnel |");
        println!("|---|---:|---:|");
        for (name, a, b) in [
            ("bpf / kernel alone", Forward::Bpf, Forward::Plain),
            ("iptables / kernel alone", Forward::Iptables, Forward::Plain),
            ("iptables / bpf", Forward::Iptables, Forward::Bpf),
        ] {
            println!(
                "| {name} | {:.2} | {:.2} |",
                f.ratio(Direction::TunnelToLan, a, b),
                f.ratio(Direction::LanToTunnel, a, b)
            );
        }
        println!();
    }
    if !control.is_empty() {
        println!("| control plane, iptables / bpf | start | reload: all replaced | stop | memory |");
        println!("|---|---:|---:|---:|---:|");
        for bpf in control.iter().filter(|r| r.backend == "bpf") {
            let Some(ipt) = control.iter().find(|r| r.backend == "iptables" && r.policy == bpf.policy) else {
                continue;
            };
            let q = |a: std::time::Duration, b: std::time::Duration| a.as_secs_f64() / b.as_secs_f64();
            println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                bpf.policy,
                q(ipt.start, bpf.start),
                q(ipt.reload_all, bpf.reload_all),
                q(ipt.stop, bpf.stop),
                ipt.rss_kib as f64 / bpf.rss_kib as f64
            );
        }
        println!();
    }
}

fn sizes(receive: &[Receive]) -> Vec<usize> {
    let mut sizes: Vec<usize> = receive.iter().map(|r| r.prefixes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}
