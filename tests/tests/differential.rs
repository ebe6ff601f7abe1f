//! The kernel programs against the reference model on random policies and packets (valid
//! and malformed), through BPF_PROG_TEST_RUN: verdicts, counters, rule hits, marks, bytes
//! out, flow tables. 0 mismatches. A failure prints the shrunk case: the policy's config,
//! the hook, the frame in hex, the flow table before, both outcomes.

use tailgate_tests::differential;

/// Cases (a policy and up to `PACKETS` packets each); `TAILGATE_DIFF_CASES` overrides.
const CASES: u32 = 10_000;
const PACKETS: usize = 4;

/// What the random cases must have reached for 0 mismatches to mean something: every
/// verdict of every hook, each stage's decisions, the malformed and not-IP paths.
const COVERED: &[&str] = &[
    "Uplink Pass",
    "Uplink Drop",
    "UplinkEgress Next",
    "TunnelIngress Pass",
    "TunnelEgress Next",
    "TunnelEgress Drop",
    "rule hit",
    "rewritten",
    "uplink_pass_not_ip",
    "uplink_pass_malformed",
    "uplink_pass_no_match",
    "uplink_pass_rule",
    "uplink_drop",
    "uplink_pass_reply",
    "tunnel_pass_local",
    "tunnel_pass_from_tunnel",
    "tunnel_pass_forward",
    "tunnel_drop",
    "tunnel_pass_other",
    "tunnel_in_pass_other",
    "tunnel_in_marked",
    "tunnel_in_mss_clamped",
    "tunnel_out_mss_clamped",
    "mss_bad_options",
    "tunnel_pass_established",
    "tunnel_drop_stateful",
    "flow_created",
    "flow_expired",
    "flow_lookups",
];

#[test]
fn kernel_matches_the_model() {
    let cases = std::env::var("TAILGATE_DIFF_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(CASES);
    let report = differential::fuzz(cases, PACKETS).unwrap_or_else(|mismatch| panic!("{mismatch}"));
    println!(
        "{} cases, {} packets compared in {:.1?}, 0 mismatches",
        report.cases, report.packets, report.elapsed
    );
    for (what, n) in &report.tally {
        println!("  {what}: {n}");
    }
    if cases >= CASES {
        assert!(report.packets >= 10_000, "{report:?}");
        for what in COVERED {
            assert!(
                report.tally.get(*what).is_some_and(|&n| n >= 10),
                "{what} reached {:?} times",
                report.tally.get(*what)
            );
        }
    }
}

/// The rules the iptables backend renders, evaluated in pure code, against the same model.
#[test]
fn iptables_rules_match_the_model() {
    let cases = std::env::var("TAILGATE_DIFF_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(CASES);
    let packets = differential::fuzz_iptables(cases, PACKETS).unwrap_or_else(|mismatch| panic!("{mismatch}"));
    println!("{packets} first packets compared, 0 mismatches");
    assert!(cases < CASES || packets >= 10_000, "{packets}");
}
