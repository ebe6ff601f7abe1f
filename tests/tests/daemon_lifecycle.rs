//! The daemon's life: refusing bad configs, reload failures, SIGTERM, keep_datapath,
//! backend selection and switching, status and cleanup.

use nix::sys::signal::Signal;
use tailgate_tests::{
    daemon::{tailgate, Daemon, PinDir},
    on_both_backends,
    topology::*,
    wait,
};

on_both_backends!(
    refused_reload_keeps_the_running_state,
    a_config_file_written_slowly_is_reloaded_only_once_complete,
    a_config_file_rewritten_unchanged_is_not_reloaded,
    a_config_file_that_keeps_changing_does_not_hold_up_a_stop,
    sigterm_removes_everything,
    keep_datapath_survives_a_restart_and_cleanup_is_idempotent,
);

fn status(t: &Topology) -> serde_json::Value {
    status_of(t, &t.pins)
}

fn status_of(t: &Topology, pins: &PinDir) -> serde_json::Value {
    let out = tailgate(&t.gw, pins, &["status", "--json"]).unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn invalid_config_at_start_is_refused_and_nothing_is_installed() {
    let t = Topology::new().unwrap();
    t.gw.ip(&["tuntap", "add", "dev", "tun1", "mode", "tun"]).unwrap();
    let cases = [
        ("allow = [\"100.100.0.0/33\"]", "cgnat.allow[0]"),
        ("drop = [\"10.0.0.0/8\"]", "cgnat.drop[0]"),
        ("mode = \"maybe\"", "mode = \"maybe\""),
        ("exempt = []", "unknown field `exempt`"),
    ];
    for backend in BACKENDS {
        for (cgnat, expected) in cases {
            let (code, log) = Daemon::run_to_exit(&t.gw, &t.pins, &config(backend, cgnat)).unwrap();
            assert_ne!(code, 0, "{cgnat}");
            assert!(log.contains(expected), "{cgnat}: log does not name {expected}:\n{log}");
            assert!(!t.pins.path().exists(), "{cgnat}: pins created");
            assert!(!t.installed(backend), "{cgnat}: {backend} datapath installed");
        }
    }
    for (toml, expected) in [
        ("tunnel = \"tun0\"\ninterfaces = [\"eth9\"]", "interfaces[0]: no interface named \"eth9\""),
        ("tunnel = \"tun0\"\ninterfaces = [\"eth0\", \"tun0\"]", "interfaces[1]"),
        ("[iptables]\nrepair_interval_ms = 1", "iptables.repair_interval_ms"),
        ("tunnel = \"tun0\"\ninterfaces = [\"tun1\"]", "interfaces[0]: \"tun1\" is not an Ethernet device"),
    ] {
        let (code, log) = Daemon::run_to_exit(&t.gw, &t.pins, toml).unwrap();
        assert_ne!(code, 0);
        assert!(log.contains(expected), "log does not say {expected}:\n{log}");
        assert!(!t.pins.path().exists());
        assert!(!t.installed("bpf") && !t.installed("iptables"));
    }
}

fn refused_reload_keeps_the_running_state(backend: &str) {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "allow = [\"100.100.0.0/16\"]")).unwrap();
    let rules = status(&t)["rules"].clone();
    std::fs::write(daemon.config_path(), config(backend, "allow = [\"100.64.0.0/24\", \"bogus\"]")).unwrap();
    daemon.signal(Signal::SIGHUP).unwrap();
    daemon.wait_for_log("reload refused");
    assert!(daemon.log().contains("cgnat.allow[1]"), "{}", daemon.log());
    assert_eq!(status(&t)["rules"], rules, "rules changed after a refused reload");
    assert!(!t.cgnat_neighbours_ping(), "policy must still be in force");
    assert!(t.installed(backend));
}

fn a_config_file_written_slowly_is_reloaded_only_once_complete(backend: &str) {
    use std::io::Write;
    let t = Topology::new().unwrap();
    let full = config(backend, "allow = [\"100.64.0.0/24\"]");
    let daemon = Daemon::start(&t.gw, &t.pins, &full).unwrap();
    assert!(t.cgnat_neighbours_ping(), "exempted");

    // Truncated and closed before anything is written: never applied.
    let readies = daemon.readies();
    drop(std::fs::File::create(daemon.config_path()).unwrap());
    daemon.wait_ready_after(readies).unwrap();
    assert!(daemon.log().contains("is empty"), "{}", daemon.log());
    assert!(t.cgnat_neighbours_ping(), "the empty file was applied");
    let readies = daemon.readies();

    // Truncated, then written in two parts: the first part alone is a valid config without
    // the exemption. Until the file is closed, the policy in force must not lapse.
    let (head, tail) = full.split_at(full.find("allow").unwrap());
    let mut file = std::fs::File::create(daemon.config_path()).unwrap();
    file.write_all(head.as_bytes()).unwrap();
    file.flush().unwrap();
    let watch = std::time::Instant::now();
    while watch.elapsed() < std::time::Duration::from_millis(1500) {
        assert!(t.cgnat_neighbours_ping(), "the half-written file was applied:\n{}", daemon.log());
    }
    assert_eq!(daemon.readies(), readies, "reloaded before the file was complete");
    file.write_all(tail.as_bytes()).unwrap();
    drop(file);
    daemon.wait_ready_after(readies).unwrap();
    assert!(t.cgnat_neighbours_ping(), "the complete file keeps the exemption");
}

/// Config management rewriting the file with what it holds: no reload, no reload counted;
/// the change that follows is reloaded.
fn a_config_file_rewritten_unchanged_is_not_reloaded(backend: &str) {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let readies = daemon.readies();
    daemon.write_config(&config(backend, "")).unwrap();
    daemon.wait_for_log("config file rewritten unchanged");
    assert_eq!(daemon.readies(), readies, "reloaded an unchanged file:\n{}", daemon.log());
    assert!(!daemon.log().contains("reloading"), "{}", daemon.log());
    assert!(!t.cgnat_neighbours_ping(), "dropped");
    daemon.write_config(&config(backend, "allow = [\"100.64.0.0/24\"]")).unwrap();
    daemon.wait_ready_after(readies).unwrap();
    assert!(daemon.log().contains("config file changed: reloading"), "{}", daemon.log());
    assert!(t.cgnat_neighbours_ping(), "the changed file is in force");
}

fn a_config_file_that_keeps_changing_does_not_hold_up_a_stop(backend: &str) {
    use std::{
        io::Write,
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };
    let t = Topology::new().unwrap();
    let mut daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let done = AtomicBool::new(false);
    let path = daemon.config_path();
    std::thread::scope(|s| {
        // A writer that never pauses long: one line every 50 ms, for at most 10 s.
        s.spawn(|| {
            let start = Instant::now();
            while !done.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(10) {
                let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
                writeln!(file, "# still writing").unwrap();
                drop(file);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let asked = Instant::now();
        daemon.signal(Signal::SIGTERM).unwrap();
        let stopped = wait::until(Duration::from_secs(2), || !daemon.alive());
        done.store(true, Ordering::Relaxed);
        assert!(stopped, "still running {:?} after SIGTERM:\n{}", asked.elapsed(), daemon.log());
    });
    assert_eq!(daemon.exit_code().unwrap(), 0);
    assert!(!t.installed(backend));
}

fn sigterm_removes_everything(backend: &str) {
    let t = Topology::new().unwrap();
    let mut daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    assert!(t.installed(backend));
    let s = status(&t);
    assert_eq!(s["backend"].as_str().unwrap().split(' ').next(), Some(backend));
    assert_eq!(s["reason"], format!("configured: backend = \"{backend}\""));
    let hooks: Vec<String> = s["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}@{}", a["hook"].as_str().unwrap(), a["target"].as_str().unwrap()))
        .collect();
    let expected: &[&str] = match backend {
        "bpf" => &BPF_ATTACHMENTS,
        _ => &[
            "ipv4 filter FORWARD@tg-forward",
            "ipv4 filter INPUT@tg-input",
            "ipv4 nat POSTROUTING@tg-postrouting",
            "ipv4 mangle FORWARD@tg-mss",
            "ipv4 mangle OUTPUT@tg-output",
            "ipv6 filter FORWARD@tg-forward",
            "ipv6 filter INPUT@tg-input",
            "ipv6 nat POSTROUTING@tg-postrouting",
            "ipv6 mangle FORWARD@tg-mss",
            "ipv6 mangle OUTPUT@tg-output",
        ],
    };
    assert_eq!(hooks, expected);
    assert_eq!(daemon.stop(), Some(0));
    assert!(!t.pins.path().exists(), "pins left behind");
    assert!(!t.installed(backend), "datapath left installed");
    assert!(!t.netfilter_rules(), "netfilter rules left behind");
    assert!(t.cgnat_neighbours_ping(), "policy left in force");
    let out = tailgate(&t.gw, &t.pins, &["status"]).unwrap();
    assert_eq!(out.status.code(), Some(3), "status of a stopped instance");
    // Nothing probed the unused legacy variant into existence (iptables-nft would then
    // warn about "iptables-legacy tables present" on every call).
    let legacy = t.gw.exec("cat", &["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&legacy.stdout).trim(), "", "legacy tables created");
}

fn keep_datapath_survives_a_restart_and_cleanup_is_idempotent(backend: &str) {
    let t = Topology::new().unwrap();
    // An exemption the neighbour is not in: the iptables backend keeps it in a set.
    let toml = format!("keep_datapath = true\n{}", config(backend, "allow = [\"100.100.0.0/16\"]"));
    let mut first = Daemon::start(&t.gw, &t.pins, &toml).unwrap();
    assert!(!t.cgnat_neighbours_ping());
    assert_eq!(first.stop(), Some(0));

    // No process, policy still enforced, counters readable.
    assert!(t.installed(backend));
    assert!(!t.cgnat_neighbours_ping(), "kept datapath must still drop");
    let drops = status(&t)["counters"]["uplink_drop"].as_u64().unwrap();
    assert!(drops >= 2, "drops counted: {drops}");

    // A new run takes over (BPF: atomic program replacement on the pinned links; iptables:
    // the rules are already as desired) and keeps the counters.
    let second = Daemon::start(&t.gw, &t.pins, &toml).unwrap();
    if backend == "bpf" {
        second.wait_for_log("took over");
    } else {
        second.wait_for_log("iptables: wrote []");
    }
    assert!(status(&t)["counters"]["uplink_drop"].as_u64().unwrap() >= drops, "counters reset by restart");
    assert!(!t.cgnat_neighbours_ping());
    drop(second);

    for _ in 0..2 {
        let out = tailgate(&t.gw, &t.pins, &["cleanup"]).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!t.pins.path().exists());
    assert!(!t.installed(backend));
    assert_eq!(t.ipsets(), Vec::<String>::new(), "sets left by cleanup");
    assert!(t.cgnat_neighbours_ping());
}

#[test]
fn auto_falls_back_to_iptables_when_bpf_cannot_attach_and_says_why() {
    let t = Topology::new().unwrap();
    // Another XDP program already owns eth0: the BPF attach must fail.
    let other_pins = PinDir::new(&t.gw);
    // (Without masquerade: two daemons writing netfilter rules in one namespace are refused.)
    let other = "tunnel = \"tun0\"\ninterfaces = [\"eth0\"]\nbackend = \"bpf\"\n[subnet_routes]\nmasquerade = false\n";
    let _other = Daemon::start(&t.gw, &other_pins, other).unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config("auto", "")).unwrap();
    daemon.wait_for_log("falling back to iptables");
    let s = status(&t);
    assert!(s["backend"].as_str().unwrap().starts_with("iptables"), "{s}");
    let reason = s["reason"].as_str().unwrap();
    assert!(reason.starts_with("auto: BPF attach failed") && reason.contains("eth0"), "{reason}");
    assert!(!t.pins.path().exists(), "the failed BPF start left pins");
    assert!(t.installed("iptables"));
    // backend = "bpf" fails hard instead.
    let third = PinDir::new(&t.gw);
    let (code, log) = Daemon::run_to_exit(&t.gw, &third, &config("bpf", "")).unwrap();
    assert_ne!(code, 0);
    assert!(log.contains("attach failed"), "{log}");
    assert!(!third.path().exists());
    let _ = status_of(&t, &other_pins);
}

#[test]
fn switching_backends_leaves_nothing_of_the_other() {
    let t = Topology::new().unwrap();
    let allow = "allow = [\"100.100.0.0/16\"]";
    for (from, to) in [("iptables", "bpf"), ("bpf", "iptables")] {
        let kept = format!("keep_datapath = true\n{}", config(from, allow));
        let mut first = Daemon::start(&t.gw, &t.pins, &kept).unwrap();
        first.stop();
        assert!(t.installed(from), "{from} kept");
        assert_eq!(t.ipsets().len(), if from == "iptables" { 2 } else { 0 }, "{:?}", t.ipsets());
        let mut second = Daemon::start(&t.gw, &t.pins, &config(to, allow)).unwrap();
        assert!(t.installed(to));
        assert!(!t.installed(from), "{from} left behind after switching to {to}");
        assert_eq!(t.ipsets().len(), if to == "iptables" { 2 } else { 0 }, "{:?}", t.ipsets());
        assert!(!t.cgnat_neighbours_ping());
        second.stop();
        assert!(!t.installed(to) && !t.installed(from));
        assert_eq!(t.ipsets(), Vec::<String>::new(), "sets left after stopping {to}");
    }
}

#[test]
fn kernel_logging_is_off_by_default_and_on_with_the_flag() {
    let t = Topology::new().unwrap();
    let drops = |t: &Topology| status(t)["counters"]["uplink_drop"].as_u64().unwrap();
    let mut quiet = Daemon::start(&t.gw, &t.pins, &config("bpf", "")).unwrap();
    assert!(!t.cgnat_neighbours_ping());
    assert!(drops(&t) >= 1);
    quiet.stop();
    assert!(!quiet.log().contains("uplink: drop"), "kernel logged without the flag:\n{}", quiet.log());

    let loud = Daemon::start_with(&t.gw, &t.pins, &config("bpf", ""), &["--kernel-log", "debug"]).unwrap();
    assert!(!t.cgnat_neighbours_ping());
    loud.wait_for_log("uplink: drop");
}

#[test]
fn omitted_interfaces_mean_every_up_ethernet_interface_but_the_tunnel() {
    let t = Topology::new().unwrap();
    // Another L3 tunnel (no Ethernet header) must not get the Ethernet XDP program.
    t.gw.ip(&["tuntap", "add", "dev", "tun1", "mode", "tun"]).unwrap();
    t.gw.ip(&["link", "set", "tun1", "up"]).unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, "tunnel = \"tun0\"\nbackend = \"bpf\"\n").unwrap();
    daemon.wait_for_log("not Ethernet, not used as uplinks: tun1");
    let attached: Vec<String> = status(&t)["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}@{}", a["hook"].as_str().unwrap(), a["target"].as_str().unwrap()))
        .collect();
    assert_eq!(
        attached,
        [
            "xdp@eth0",
            "xdp@eth1",
            "uplink_egress@eth0",
            "uplink_egress@eth1",
            "tc_egress@tun0",
            "tc_ingress@tun0",
            "masquerade_in@eth0",
            "masquerade_in@eth1",
            "masquerade_out@eth0",
            "masquerade_out@eth1"
        ]
    );
}

#[test]
fn forwarding_off_is_reported_not_changed() {
    let t = Topology::new().unwrap();
    // The topology turns IPv4 forwarding on and leaves IPv6 forwarding off.
    let daemon = Daemon::start(&t.gw, &t.pins, &config("bpf", "")).unwrap();
    daemon.wait_for_log("IPv6 forwarding is off");
    assert!(!daemon.log().contains("IPv4 forwarding is off"), "{}", daemon.log());
    let out = t.gw.exec("sysctl", &["-n", "net.ipv6.conf.all.forwarding"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "read, never written");
}
