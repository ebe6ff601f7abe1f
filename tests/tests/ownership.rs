//! Who owns what: one daemon per pin dir (and, for the iptables backend, per network
//! namespace), `cleanup` refusing while a daemon runs, `status` telling whether one does,
//! and a pin dir that is not on bpffs, where tailgate creates and removes nothing.

use nix::sys::signal::Signal;
use tailgate_tests::{
    daemon::{status, tailgate, Daemon, PinDir},
    on_both_backends,
    topology::*,
    wait,
};

on_both_backends!(
    a_second_daemon_on_the_same_pin_dir_is_refused_and_cleanup_waits_for_the_first,
    status_after_kill_9_says_no_daemon_runs,
);

fn a_second_daemon_on_the_same_pin_dir_is_refused_and_cleanup_waits_for_the_first(backend: &str) {
    let t = Topology::new().unwrap();
    // No repair while the test looks: it would restore, within its interval, the rules the
    // forced cleanup below removes, before status reads them.
    let quiet = format!("{}[iptables]\nrepair_interval_ms = 600000\n", config(backend, ""));
    let mut first = Daemon::start(&t.gw, &t.pins, &quiet).unwrap();
    let pid = first.pid().unwrap();

    // The same directory spelled differently is the same pin dir.
    let name = t.pins.path().file_name().unwrap().to_str().unwrap();
    let respelled = PinDir::at(&t.gw, format!("/sys/fs/bpf/../bpf/./{name}/").into());
    for pins in [&t.pins, &respelled] {
        let (code, log) = Daemon::run_to_exit(&t.gw, pins, &config(backend, "mode = \"off\"")).unwrap();
        assert_ne!(code, 0, "a second daemon on the same pin dir must not start:\n{log}");
        assert!(log.contains(&format!("another tailgate (PID {pid}) is running with pin dir")), "{log}");
    }
    std::mem::forget(respelled); // its guard would clean the first daemon's pin dir
    assert!(!t.cgnat_neighbours_ping(), "the first daemon's policy is still in force");
    assert_eq!(status(&t.gw, &t.pins)["daemon"], pid, "status names the running daemon");

    let out = tailgate(&t.gw, &t.pins, &["cleanup"]).unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains(&format!("PID {pid}")),
        "cleanup of a live daemon: {said}"
    );
    assert!(t.installed(backend) && !t.cgnat_neighbours_ping(), "cleanup removed a live daemon's datapath");

    // Forced, it goes ahead; status then says the daemon runs with nothing in force.
    let out = tailgate(&t.gw, &t.pins, &["cleanup", "--force"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = status(&t.gw, &t.pins);
    assert_eq!(s["daemon"], pid, "{s}");
    assert!(s["warnings"][0].as_str().unwrap().contains("nothing of its datapath is in force"), "{s}");
    assert_eq!(first.stop(), Some(0));
    assert!(!t.installed(backend));
    // Once it is gone, the pin dir is free again.
    let second = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    assert!(!t.cgnat_neighbours_ping());
    drop(second);
}

#[test]
fn a_second_iptables_daemon_in_the_same_namespace_is_refused() {
    let t = Topology::new().unwrap();
    let first = Daemon::start(&t.gw, &t.pins, &config("iptables", "")).unwrap();
    let other = PinDir::new(&t.gw);
    let (code, log) = Daemon::run_to_exit(&t.gw, &other, &config("iptables", "mode = \"off\"")).unwrap();
    assert_ne!(code, 0, "{log}");
    let pid = first.pid().unwrap();
    assert!(
        log.contains(&format!(
            "another tailgate (PID {pid}) writes iptables rules in this network namespace"
        )),
        "{log}"
    );
    assert!(!t.cgnat_neighbours_ping(), "the first daemon's rules are untouched");
    // Nor may another instance's cleanup take the rules away.
    let out = tailgate(&t.gw, &other, &["cleanup"]).unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.installed("iptables"));
    drop(first);
}

#[test]
fn an_empty_pin_dir_variable_means_the_default() {
    let t = Topology::new().unwrap();
    // In the test's namespace: status reads iptables too.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", t.gw.path()))
        .arg(tailgate_tests::daemon::binary())
        .args(["status", "--json"])
        .env("TAILGATE_PIN_DIR", "")
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(s["pin_dir"], "/sys/fs/bpf/tailgate", "{}", String::from_utf8_lossy(&out.stderr));
    drop(t);
}

fn status_after_kill_9_says_no_daemon_runs(backend: &str) {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let s = status(&t.gw, &t.pins);
    assert_eq!(s["daemon"], daemon.pid().unwrap());
    daemon.signal(Signal::SIGKILL).unwrap();
    assert!(wait::until(std::time::Duration::from_secs(5), || status(&t.gw, &t.pins)["daemon"].is_null()));

    // What it left still enforces; status says so and that no daemon runs.
    assert!(!t.cgnat_neighbours_ping());
    let out = tailgate(&t.gw, &t.pins, &["status"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("daemon:  none (datapath kept, no daemon)"), "{text}");
    // With no daemon, cleanup goes ahead.
    let out = tailgate(&t.gw, &t.pins, &["cleanup"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!t.installed(backend) && t.cgnat_neighbours_ping());
    drop(daemon);
}

#[test]
fn a_pin_dir_off_bpffs_is_refused_for_bpf_and_nothing_there_is_ever_removed() {
    let t = Topology::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pins");
    // Files of the user's that look like tailgate's layout.
    let mine = [
        root.join("maps/COUNTERS"),
        root.join("links/xdp@eth0"),
        root.join("links/xdp@eth0:2"),
        root.join("notes.txt"),
    ];
    for file in &mine {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, "mine").unwrap();
    }
    let pins = PinDir::at(&t.gw, root.clone());
    let untouched = || mine.iter().all(|f| std::fs::read_to_string(f).is_ok_and(|s| s == "mine"));

    let (code, log) = Daemon::run_to_exit(&t.gw, &pins, &config("bpf", "")).unwrap();
    assert_ne!(code, 0);
    assert!(log.contains("is not on a bpffs mount"), "{log}");
    assert!(untouched(), "the refused BPF start touched the user's files");

    let mut fallback = Daemon::start(&t.gw, &pins, &config("auto", "")).unwrap();
    let reason = status(&t.gw, &pins)["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("not on a bpffs mount"), "{reason}");
    assert!(untouched(), "the fallback removed the user's files");
    assert!(!t.cgnat_neighbours_ping());
    assert_eq!(fallback.stop(), Some(0));
    assert!(untouched(), "stopping removed the user's files");

    let out = tailgate(&t.gw, &pins, &["cleanup"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(untouched(), "cleanup removed the user's files");
}
