//! `tailgate-fuzz --cases N [--packets P]` (`cargo xtask fuzz`): the differential test of
//! `tests/differential.rs` for as long as asked — N random policies with up to P random
//! packets each through the kernel programs and the reference model, then N policies with
//! up to P first packets each through the rendered iptables rules and the model. Prints packets per
//! second and what the cases reached; on a mismatch, the shrunk case, and exits 1.

use std::process::ExitCode;

use tailgate_tests::differential;

fn main() -> ExitCode {
    let mut cases: u32 = 100_000;
    let mut packets: usize = 32;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.replace('_', "").parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--cases", Some(n)) => cases = u32::try_from(n).unwrap_or(u32::MAX),
            ("--packets", Some(n)) if n > 0 => packets = n as usize,
            _ => {
                eprintln!("usage: tailgate-fuzz [--cases N] [--packets PER_CASE]");
                return ExitCode::from(2);
            }
        }
    }
    eprintln!("{cases} cases of up to {packets} packets each");
    match differential::fuzz(cases, packets) {
        Ok(report) => {
            let secs = report.elapsed.as_secs_f64();
            println!(
                "{} cases, {} packets compared in {:.1} s ({:.0} packets/s), 0 mismatches",
                report.cases,
                report.packets,
                secs,
                report.packets as f64 / secs
            );
            println!("reached (packets):");
            for (what, n) in &report.tally {
                println!("  {what}: {n}");
            }
        }
        Err(mismatch) => {
            eprintln!("{mismatch}");
            return ExitCode::FAILURE;
        }
    }
    // The iptables rules against the same model: pure code, many more per second.
    let start = std::time::Instant::now();
    match differential::fuzz_iptables(cases, packets) {
        Ok(n) => {
            let secs = start.elapsed().as_secs_f64();
            println!(
                "iptables: {n} first packets compared in {secs:.1} s ({:.0} packets/s), 0 mismatches",
                n as f64 / secs
            );
            ExitCode::SUCCESS
        }
        Err(mismatch) => {
            eprintln!("{mismatch}");
            ExitCode::FAILURE
        }
    }
}
