//! Start is one transaction: a stop while it runs, or a failure after the datapath is in
//! force, leaves nothing behind; and it removes what a run with the other iptables variant
//! left.

use std::time::Duration;

use nix::sys::signal::Signal;
use tailgate_tests::{
    daemon::{status, Daemon, PinDir},
    netns::Netns,
    on_both_backends,
    topology::*,
    wait,
};

on_both_backends!(
    sigterm_during_start_rolls_everything_back,
    a_failure_after_the_datapath_is_in_force_rolls_it_back,
    a_failed_start_over_a_kept_datapath_leaves_it_as_it_was,
);

/// `count` distinct /28 exemptions: enough for the policy write to take a while.
fn many_exemptions(count: u32) -> String {
    let base = u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0));
    let prefixes: Vec<String> =
        (0..count).map(|i| format!("\"{}/28\"", std::net::Ipv4Addr::from(base + (i + 1) * 16))).collect();
    format!("allow = [{}]", prefixes.join(","))
}

/// Nothing of tailgate is left in the gateway namespace.
fn assert_nothing_left(t: &Topology, what: &str) {
    assert!(!t.pins.path().exists(), "{what}: pins left");
    assert!(!t.installed("bpf") && !t.installed("iptables"), "{what}: datapath left installed");
    assert!(!t.pins.run_state().exists(), "{what}: run state left");
    assert!(t.cgnat_neighbours_ping(), "{what}: policy left in force");
}

fn sigterm_during_start_rolls_everything_back(backend: &str) {
    let t = Topology::new().unwrap();
    // Long enough a start that the signal lands in the middle of writing the policy.
    let count = if backend == "bpf" { 100_000 } else { 20_000 };
    let mut daemon = Daemon::spawn(&t.gw, &t.pins, &config(backend, &many_exemptions(count)), &[]).unwrap();
    let writing = wait::until(Duration::from_secs(20), || {
        daemon.notifications().iter().any(|n| n.starts_with("STATUS=writing")) || !daemon.alive()
    });
    assert!(writing && daemon.alive(), "never reported writing the policy:\n{}", daemon.log());
    let s = status(&t.gw, &t.pins);
    assert_eq!(
        (s["daemon"].as_u64(), &s["starting"]),
        (daemon.pid().map(u64::from), &serde_json::json!(true)),
        "{s}"
    );
    daemon.signal(Signal::SIGTERM).unwrap();
    assert!(wait::until(Duration::from_secs(30), || !daemon.alive()), "still running:\n{}", daemon.log());
    assert_eq!(daemon.exit_code().unwrap(), 0, "{}", daemon.log());
    let said = daemon.notifications();
    assert!(!said.contains(&"READY=1".to_string()), "the stop came after the start finished: {said:?}");
    assert_nothing_left(&t, "stopped during start");
}

fn a_failure_after_the_datapath_is_in_force_rolls_it_back(backend: &str) {
    let t = Topology::new().unwrap();
    // The last step of a start, recording the run state, fails: a directory is in the way.
    let run_state = t.pins.run_state().with_extension("json.tmp");
    std::fs::create_dir_all(&run_state).unwrap();
    let result = Daemon::run_to_exit(&t.gw, &t.pins, &config(backend, ""));
    std::fs::remove_dir(&run_state).unwrap();
    let (code, log) = result.unwrap();
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("recording the run state; start rolled back"), "{log}");
    assert_nothing_left(&t, "failed start");
}

/// Runs `backend` with `keep_datapath` and an exemption for the LAN's /24, stops it, and
/// returns the rules it left in force.
fn keep(t: &Topology, backend: &str) -> Vec<String> {
    let kept = format!("keep_datapath = true\n{}", config(backend, "allow = [\"100.64.0.0/24\"]"));
    let mut first = Daemon::start(&t.gw, &t.pins, &kept).unwrap();
    assert_eq!(first.stop(), Some(0));
    assert!(t.cgnat_neighbours_ping(), "kept: the exemption holds");
    rules(t)
}

/// tailgate's iptables rules as written (comments and hashes included), both families.
fn iptables_rules(t: &Topology) -> Vec<String> {
    ["iptables-save", "ip6tables-save"]
        .iter()
        .flat_map(|tool| {
            let out = t.gw.exec(tool, &[]).unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("tailgate:"))
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn rules(t: &Topology) -> Vec<String> {
    let s = status(&t.gw, &t.pins);
    let mut rules: Vec<String> = s["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {} {}", r["direction"], r["prefix"], r["verdict"]))
        .collect();
    rules.sort();
    rules
}

/// What `keep` left is in force again, unchanged.
fn assert_kept(t: &Topology, backend: &str, before: &[String], log: &str) {
    assert!(t.installed(backend), "the kept datapath is gone:\n{log}");
    assert!(t.cgnat_neighbours_ping(), "the kept policy (with the exemption) is not in force:\n{log}");
    assert_eq!(rules(t), before, "the kept rules changed:\n{log}");
    // The record of the kept run is back too (status reads the backend and variant from it).
    let s = status(&t.gw, &t.pins);
    assert_eq!(s["reason"], format!("configured: backend = \"{backend}\""), "{s}\n{log}");
    assert_eq!(s["daemon"], serde_json::Value::Null);
}

/// Starts `config` with the run state unwritable (the last step of a start fails).
fn start_failing_at_the_end(t: &Topology, config: &str) -> (i32, String) {
    let run_state = t.pins.run_state().with_extension("json.tmp");
    std::fs::create_dir_all(&run_state).unwrap();
    let result = Daemon::run_to_exit(&t.gw, &t.pins, config);
    std::fs::remove_dir(&run_state).unwrap();
    result.unwrap()
}

fn a_failed_start_over_a_kept_datapath_leaves_it_as_it_was(backend: &str) {
    let t = Topology::new().unwrap();
    let before = keep(&t, backend);
    let written = iptables_rules(&t);
    // Another policy, and not even keep_datapath: what was in force before is put back.
    let (code, log) = start_failing_at_the_end(&t, &config(backend, ""));
    assert_ne!(code, 0, "{log}");
    assert_kept(&t, backend, &before, &log);
    // iptables: as written, hashes included (the next start of the kept config rewrites
    // nothing, so counters go on counting).
    assert_eq!(iptables_rules(&t), written, "{log}");
}

#[test]
fn a_bpf_start_failing_to_attach_over_a_kept_datapath_leaves_it_as_it_was() {
    let t = Topology::new().unwrap();
    let before = keep(&t, "bpf");
    // Another program owns eth1's XDP hook: attaching there fails after the policy changed.
    let other = PinDir::new(&t.gw);
    let owner = "tunnel = \"tun0\"\ninterfaces = [\"eth1\"]\nbackend = \"bpf\"\n[subnet_routes]\nmasquerade = false\n";
    let _owner = Daemon::start(&t.gw, &other, owner).unwrap();
    let both = config("bpf", "").replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\", \"eth1\"]");
    let (code, log) = Daemon::run_to_exit(&t.gw, &t.pins, &both).unwrap();
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("eth1"), "{log}");
    assert_kept(&t, "bpf", &before, &log);
}

#[test]
fn sigterm_during_an_auto_start_over_a_kept_datapath_leaves_it_as_it_was() {
    let t = Topology::new().unwrap();
    let before = keep(&t, "bpf");
    let mut daemon = Daemon::spawn(&t.gw, &t.pins, &config("auto", &many_exemptions(100_000)), &[]).unwrap();
    let writing = wait::until(Duration::from_secs(20), || {
        daemon.notifications().iter().any(|n| n.starts_with("STATUS=writing")) || !daemon.alive()
    });
    assert!(writing && daemon.alive(), "{}", daemon.log());
    // The run state of the kept run is still there: status must not take it for this one's.
    assert_eq!(status(&t.gw, &t.pins)["starting"], true);
    daemon.signal(Signal::SIGTERM).unwrap();
    assert!(wait::until(Duration::from_secs(30), || !daemon.alive()), "{}", daemon.log());
    assert_eq!(daemon.exit_code().unwrap(), 0);
    assert!(!daemon.notifications().contains(&"READY=1".to_string()));
    assert_kept(&t, "bpf", &before, &daemon.log());
}

#[test]
fn a_failed_bpf_start_over_kept_iptables_rules_leaves_them() {
    let t = Topology::new().unwrap();
    let before = keep(&t, "iptables");
    let (code, log) = start_failing_at_the_end(&t, &config("bpf", ""));
    assert_ne!(code, 0, "{log}");
    assert!(!t.installed("bpf"), "{log}");
    assert_kept(&t, "iptables", &before, &log);
}

#[test]
fn starting_with_one_iptables_variant_removes_the_other_variants_rules() {
    let t = Topology::new().unwrap();
    let saved = |ns: &Netns, variant: &str| {
        let out = ns.exec(&format!("iptables-{variant}-save"), &[]).unwrap();
        String::from_utf8_lossy(&out.stdout).contains("tailgate:")
    };
    // Someone else's rules in nft, more than tailgate's: the variant holding more rules is
    // not necessarily the one tailgate uses.
    let restore = format!("*filter\n:mine - [0:0]\n{}COMMIT\n", "-A mine -j RETURN\n".repeat(60));
    let mut child = std::process::Command::new("nsenter")
        .args([&format!("--net={}", t.gw.path()), "iptables-nft-restore", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), restore.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    for (from, to) in [("legacy", "nft"), ("nft", "legacy")] {
        let kept =
            format!("keep_datapath = true\n{}\n[iptables]\nvariant = \"{from}\"\n", config("iptables", ""));
        let mut first = Daemon::start(&t.gw, &t.pins, &kept).unwrap();
        first.stop();
        assert!(saved(&t.gw, from), "{from}: kept");
        let next = format!(
            "{}\n[iptables]\nvariant = \"{to}\"\n",
            config("iptables", "allow = [\"100.64.0.0/24\"]")
        );
        let mut second = Daemon::start(&t.gw, &t.pins, &next).unwrap();
        assert!(saved(&t.gw, to), "{to}: in force");
        // status reads the variant in force, not whichever holds more rules.
        let s = status(&t.gw, &t.pins);
        assert_eq!(s["backend"], format!("iptables ({to})"), "{s}");
        assert!(s["rules"].as_array().unwrap().iter().any(|r| r["prefix"] == "100.64.0.0/24"), "{s}");
        assert!(!saved(&t.gw, from), "{from}: its rules (the old policy) still enforce next to {to}'s");
        assert!(t.cgnat_neighbours_ping(), "the new policy decides");
        second.stop();
        assert!(!saved(&t.gw, "legacy") && !saved(&t.gw, "nft"));
        assert_eq!(status(&t.gw, &t.pins)["running"], false);
    }
}
