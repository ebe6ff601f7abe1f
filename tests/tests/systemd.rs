//! The systemd unit (`deploy/tailgate.service`): it verifies, its sandbox's exposure stays
//! low, the daemon works with only the capabilities it grants (and not with fewer), and
//! the daemon speaks the notify protocol a `Type=notify` / `notify-reload` unit relies on:
//! READY, RELOADING with the monotonic time, STOPPING, and watchdog pings when
//! `WatchdogSec=` is set.

use std::{path::PathBuf, process::Command, time::Duration};

use tailgate_tests::{
    daemon::{binary, Daemon, Launch},
    on_both_backends,
    topology::{config, Topology},
    wait,
};

fn unit_text() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/tailgate.service");
    std::fs::read_to_string(path).unwrap()
}

/// The unit as installed, with the binary where this build has it.
fn installed_unit() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tailgate.service");
    let text = unit_text().replace("/usr/local/bin/tailgate", binary().to_str().unwrap());
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn the_unit_verifies_and_its_exposure_is_low() {
    let (_dir, unit) = installed_unit();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    let out =
        Command::new("systemd-analyze").args(["security", "--offline=yes"]).arg(&unit).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for tailgate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    println!("systemd-analyze security exposure: {exposure}");
    assert!(exposure <= 3.0, "exposure {exposure} (README gives 2.7)");
}

/// The capabilities the unit's `CapabilityBoundingSet=` grants, as numbers.
fn unit_capabilities() -> Vec<u32> {
    let text = unit_text();
    let line = text.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("a bounding set");
    line.split_whitespace()
        .map(|name| match name {
            "CAP_NET_ADMIN" => 12,
            "CAP_NET_RAW" => 13,
            "CAP_SYS_ADMIN" => 21,
            "CAP_SYS_RESOURCE" => 24,
            "CAP_PERFMON" => 38,
            "CAP_BPF" => 39,
            other => panic!("capability {other} unknown to this test"),
        })
        .collect()
}

on_both_backends!(the_units_capabilities_are_enough);

fn the_units_capabilities_are_enough(backend: &str) {
    let t = Topology::new().unwrap();
    let launch = Launch { capabilities: Some(unit_capabilities()), ..Launch::default() };
    let mut daemon = Daemon::start_launched(&t.gw, &t.pins, &config(backend, ""), &launch).unwrap();
    assert!(daemon.log().contains(&format!("with the {backend} backend")), "{}", daemon.log());
    assert!(!t.cgnat_neighbours_ping(), "enforcing");
    daemon.write_config(&config(backend, "allow = [\"100.64.0.0/24\"]")).unwrap();
    daemon.reload().unwrap();
    assert!(t.cgnat_neighbours_ping(), "reloaded\n{}", daemon.log());
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
    assert!(!t.installed(backend), "cleaned up at stop");
}

/// The test above can fail: without CAP_BPF the BPF backend cannot load.
#[test]
fn fewer_capabilities_are_not_enough_for_bpf() {
    let t = Topology::new().unwrap();
    let caps: Vec<u32> = unit_capabilities().into_iter().filter(|c| *c != 39).collect();
    let launch = Launch { capabilities: Some(caps), ..Launch::default() };
    let err = Daemon::start_launched(&t.gw, &t.pins, &config("bpf", ""), &launch).err().expect("refused");
    assert!(format!("{err:#}").contains("did not come up"), "{err:#}");
}

#[test]
fn the_daemon_speaks_the_notify_protocol() {
    let t = Topology::new().unwrap();
    let launch = Launch { env: vec![("WATCHDOG_USEC".into(), "200000".into())], ..Launch::default() };
    let mut daemon = Daemon::start_launched(&t.gw, &t.pins, &config("bpf", ""), &launch).unwrap();
    // Watchdog pings at half the interval, from the main loop.
    let pings = || daemon.notifications().iter().filter(|n| *n == "WATCHDOG=1").count();
    assert!(wait::until(Duration::from_secs(5), || pings() >= 3), "{:?}", daemon.notifications());
    // A reload: RELOADING=1 with the monotonic time (Type=notify-reload needs it), then READY.
    let readies = daemon.readies();
    daemon.reload().unwrap();
    daemon.wait_ready_after(readies).unwrap();
    let notes = daemon.notifications();
    let reloading = notes.iter().position(|n| n == "RELOADING=1").expect("RELOADING=1");
    assert!(notes[reloading + 1].starts_with("MONOTONIC_USEC="), "{notes:?}");
    assert!(notes[reloading..].iter().any(|n| n == "READY=1"), "{notes:?}");
    assert_eq!(daemon.stop(), Some(0));
    assert!(daemon.notifications().iter().any(|n| n == "STOPPING=1"));
}
