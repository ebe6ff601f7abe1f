//! The daemon's life: refusing bad configs, reload failures, SIGTERM, keep_datapath,
//! status and cleanup.

use nix::sys::signal::Signal;
use tailgate_tests::{
    daemon::{tailgate, Daemon},
    netns::Netns,
    topology::*,
};

fn xdp_attached(ns: &Netns, dev: &str) -> bool {
    let out = ns.exec("ip", &["-d", "link", "show", "dev", dev]).unwrap();
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

fn status(t: &Topology) -> serde_json::Value {
    let out = tailgate(&t.gw, &t.pins, &["status", "--json"]).unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn invalid_config_at_start_is_refused_and_nothing_is_attached() {
    let t = Topology::new().unwrap();
    let cases = [
        ("allow = [\"100.100.0.0/33\"]", "cgnat.allow[0]"),
        ("drop = [\"10.0.0.0/8\"]", "cgnat.drop[0]"),
        ("mode = \"maybe\"", "mode"),
        ("exempt = []", "unknown field `exempt`"),
    ];
    for (cgnat, expected) in cases {
        let (code, log) = Daemon::run_to_exit(&t.gw, &t.pins, &config(cgnat)).unwrap();
        assert_ne!(code, 0, "{cgnat}");
        assert!(log.contains(expected), "{cgnat}: log does not name {expected}:\n{log}");
        assert!(!t.pins.path().exists(), "{cgnat}: pins created");
        assert!(!xdp_attached(&t.gw, "eth0"), "{cgnat}: XDP attached");
    }
    for (toml, expected) in [
        ("tunnel = \"tun0\"\ninterfaces = [\"eth9\"]", "interfaces[0]: no interface named \"eth9\""),
        ("tunnel = \"tun0\"\ninterfaces = [\"eth0\", \"tun0\"]", "interfaces[1]"),
        ("tunnel = \"tun7\"\ninterfaces = [\"eth0\"]", "tunnel: no interface named \"tun7\""),
    ] {
        let (code, log) = Daemon::run_to_exit(&t.gw, &t.pins, toml).unwrap();
        assert_ne!(code, 0);
        assert!(log.contains(expected), "log does not say {expected}:\n{log}");
        assert!(!t.pins.path().exists());
    }
}

#[test]
fn refused_reload_keeps_the_running_state() {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config("allow = [\"100.100.0.0/16\"]"), 2).unwrap();
    let rules = status(&t)["rules"].clone();
    std::fs::write(daemon.config_path(), config("allow = [\"100.64.0.0/24\", \"bogus\"]")).unwrap();
    daemon.signal(Signal::SIGHUP).unwrap();
    daemon.wait_for_log("reload refused");
    assert!(daemon.log().contains("cgnat.allow[1]"), "{}", daemon.log());
    assert_eq!(status(&t)["rules"], rules, "rules changed after a refused reload");
    assert!(!t.cgnat_neighbours_ping(), "policy must still be in force");
    assert_eq!(t.pins.link_count(), 2);
}

#[test]
fn sigterm_detaches_and_unpins_everything() {
    let t = Topology::new().unwrap();
    let mut daemon = Daemon::start(&t.gw, &t.pins, &config(""), 2).unwrap();
    assert!(xdp_attached(&t.gw, "eth0"));
    let s = status(&t);
    let hooks: Vec<String> = s["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}@{}", a["hook"].as_str().unwrap(), a["interface"].as_str().unwrap()))
        .collect();
    assert_eq!(hooks, ["xdp@eth0", "tc_egress@tun0"]);
    assert_eq!(daemon.stop(), Some(0));
    assert!(!t.pins.path().exists(), "pins left behind");
    assert!(!xdp_attached(&t.gw, "eth0"), "XDP left attached");
    assert!(t.cgnat_neighbours_ping(), "policy left in force");
    let out = tailgate(&t.gw, &t.pins, &["status"]).unwrap();
    assert_eq!(out.status.code(), Some(3), "status of a stopped instance");
}

#[test]
fn keep_datapath_survives_a_restart_and_cleanup_is_idempotent() {
    let t = Topology::new().unwrap();
    let toml = format!("keep_datapath = true\n{}", config(""));
    let mut first = Daemon::start(&t.gw, &t.pins, &toml, 2).unwrap();
    assert!(!t.cgnat_neighbours_ping());
    assert_eq!(first.stop(), Some(0));

    // No process, policy still enforced by the pinned links, counters readable.
    assert!(xdp_attached(&t.gw, "eth0"));
    assert!(!t.cgnat_neighbours_ping(), "kept datapath must still drop");
    let drops = status(&t)["counters"]["uplink_drop"].as_u64().unwrap();
    assert!(drops >= 2, "drops counted: {drops}");

    // A new run takes the links over (atomic program replacement) and keeps the counters.
    let second = Daemon::start(&t.gw, &t.pins, &toml, 2).unwrap();
    second.wait_for_log("took over");
    assert!(status(&t)["counters"]["uplink_drop"].as_u64().unwrap() >= drops, "counters reset by restart");
    assert!(!t.cgnat_neighbours_ping());
    drop(second);

    for _ in 0..2 {
        let out = tailgate(&t.gw, &t.pins, &["cleanup"]).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!t.pins.path().exists());
    assert!(!xdp_attached(&t.gw, "eth0"));
    assert!(t.cgnat_neighbours_ping());
}
