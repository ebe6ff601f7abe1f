//! Devices that come and go while the daemon runs: the tunnel deleted and re-created by a
//! restart of the overlay daemon (or absent at start), an uplink deleted and re-created,
//! a new uplink when `interfaces` is omitted. Protection is back within a second, and
//! `status` lists only live attachments.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use tailgate_tests::{
    daemon::{attachments, status, Daemon},
    netns::{veth, Netns},
    on_both_backends,
    packets::ip_summary,
    topology::*,
    wait,
};

on_both_backends!(
    tunnel_absent_at_start_then_deleted_and_recreated_is_filtered_again,
    uplink_deleted_and_recreated_is_protected_again,
    new_uplink_is_protected_when_interfaces_are_omitted,
    uplinks_added_by_a_reload_stay_attached_through_device_events,
    a_reload_while_a_listed_uplink_is_absent_is_applied,
);

/// How soon a device change must be followed.
const FOLLOW: Duration = Duration::from_secs(1);

/// Whether a CGNAT-sourced datagram forwarded from the side network reaches the tunnel,
/// checked with a non-CGNAT control datagram that must arrive.
fn forwarded_cgnat_reaches_tunnel(t: &mut Topology) -> bool {
    let from = |src: &'static str| move |p: &[u8]| matches!(ip_summary(p), Some((s, _, _)) if s == src.parse::<IpAddr>().unwrap());
    t.side.send_udp(SIDE_CGNAT, PEER, 9, 1).unwrap();
    t.side.send_udp(SIDE, PEER, 9, 1).unwrap();
    let control = t.tun.recv_matching(Duration::from_secs(2), from(SIDE));
    assert!(control.is_some(), "control: a non-CGNAT source must reach the tunnel");
    // Both were sent before the control arrived; anything CGNAT is already queued.
    t.tun.recv_matching(Duration::from_millis(200), from(SIDE_CGNAT)).is_some()
}

/// Waits until `status` (BPF) lists `hook@dev` with the device's current ifindex; returns
/// how long that took.
fn attached_within(t: &Topology, hook: &str, dev: &str) -> Duration {
    let start = Instant::now();
    let ok = wait::until(Duration::from_secs(5), || {
        let index = t.ifindex(dev);
        status(&t.gw, &t.pins)["attachments"].as_array().unwrap().iter().any(|a| {
            a["hook"] == hook
                && a["target"] == dev
                && a["ifindex"].as_u64().is_some()
                && a["ifindex"].as_u64() == index
        })
    });
    assert!(ok, "{hook} on {dev} never attached: {}", status(&t.gw, &t.pins));
    start.elapsed()
}

fn tunnel_absent_at_start_then_deleted_and_recreated_is_filtered_again(backend: &str) {
    let mut t = Topology::new().unwrap();
    t.delete_tunnel().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    // What does not need the tunnel is enforced, and the daemon says what it waits for.
    assert!(!t.cgnat_neighbours_ping(), "uplink filtering without a tunnel");
    let s = status(&t.gw, &t.pins);
    if backend == "bpf" {
        assert_eq!(
            attachments(&s),
            ["xdp@eth0", "uplink_egress@eth0", "masquerade_in@eth0", "masquerade_out@eth0"]
        );
        assert_eq!(
            s["pending"],
            serde_json::json!(["tc_egress on tun0 (absent)", "tc_ingress on tun0 (absent)"]),
            "{s}"
        );
    }

    for round in ["appears", "is re-created"] {
        t.create_tunnel().unwrap();
        if backend == "bpf" {
            for hook in ["tc_egress", "tc_ingress"] {
                let took = attached_within(&t, hook, "tun0");
                println!("tunnel {round}: {hook} attached after {took:?}");
                assert!(took < FOLLOW, "tunnel {round}: {hook} attached after {took:?}");
            }
            // The run state is written once the device event is handled.
            let none_pending =
                wait::until(FOLLOW, || status(&t.gw, &t.pins)["pending"] == serde_json::json!([]));
            assert!(none_pending, "{}", status(&t.gw, &t.pins));
        }
        assert!(!forwarded_cgnat_reaches_tunnel(&mut t), "tunnel {round}: forwarded CGNAT source reached it");

        // The overlay daemon restarts: the device goes.
        t.delete_tunnel().unwrap();
        if backend == "bpf" {
            let gone = wait::until(FOLLOW, || {
                !attachments(&status(&t.gw, &t.pins)).contains(&"tc_egress@tun0".into())
            });
            assert!(gone, "status still lists the dead attachment: {}", status(&t.gw, &t.pins));
        }
    }
    assert!(!t.cgnat_neighbours_ping());
    drop(daemon);
}

fn uplink_deleted_and_recreated_is_protected_again(backend: &str) {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    assert!(!t.cgnat_neighbours_ping());
    for round in 0..2 {
        t.recreate_lan().unwrap();
        if backend == "bpf" {
            let took = attached_within(&t, "xdp", "eth0");
            println!("uplink re-created ({round}): attached after {took:?}");
            assert!(took < FOLLOW, "attached after {took:?}");
            let listed = attachments(&status(&t.gw, &t.pins));
            assert_eq!(listed, BPF_ATTACHMENTS, "one live attachment each");
        }
        assert!(t.lan.ping(GW_LAN, Some(LAN)), "the new link works");
        assert!(!t.cgnat_neighbours_ping(), "re-created uplink ({round}) unprotected\n{}", daemon.log());
    }
}

fn new_uplink_is_protected_when_interfaces_are_omitted(backend: &str) {
    let t = Topology::new().unwrap();
    let toml = format!("tunnel = \"tun0\"\nbackend = \"{backend}\"\n");
    let daemon = Daemon::start(&t.gw, &t.pins, &toml).unwrap();
    let extra = Netns::new("tg-extra").unwrap();
    veth(&t.gw, "eth2", &extra, "eth0").unwrap();
    t.gw.ip(&["addr", "add", "100.64.9.1/24", "dev", "eth2"]).unwrap();
    extra.ip(&["addr", "add", "100.64.9.2/24", "dev", "eth0"]).unwrap();
    if backend == "bpf" {
        let took = attached_within(&t, "xdp", "eth2");
        println!("new uplink: attached after {took:?}");
        assert!(took < FOLLOW, "attached after {took:?}");
    }
    assert!(!extra.ping("100.64.9.1", Some("100.64.9.2")), "CGNAT source on the new uplink passed");

    // Gone again: no attachment left behind, nothing logged as an error.
    t.gw.ip(&["link", "del", "eth2"]).unwrap();
    if backend == "bpf" {
        let gone = wait::until(FOLLOW, || !attachments(&status(&t.gw, &t.pins)).contains(&"xdp@eth2".into()));
        assert!(gone, "{}", status(&t.gw, &t.pins));
        assert!(!std::fs::read_dir(t.pins.path().join("links"))
            .unwrap()
            .any(|e| { e.unwrap().file_name().to_string_lossy().starts_with("xdp@eth2") }));
    }
    assert!(!daemon.log().contains("ERROR"), "{}", daemon.log());
}

/// Whether the side host reaches the gateway's CGNAT address on eth1.
fn side_cgnat_pings(t: &Topology) -> bool {
    t.side.ping("100.64.7.1", Some(SIDE_CGNAT))
}

fn uplinks_added_by_a_reload_stay_attached_through_device_events(backend: &str) {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let both = config(backend, "").replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\", \"eth1\"]");
    let readies = daemon.readies();
    daemon.write_config(&both).unwrap();
    daemon.wait_ready_after(readies).unwrap();
    // An unrelated device comes and goes: the uplinks are those of the reloaded config.
    t.gw.ip(&["link", "add", "x7", "type", "veth", "peer", "name", "y7"]).unwrap();
    t.gw.ip(&["link", "del", "x7"]).unwrap();
    if backend == "bpf" {
        attached_within(&t, "xdp", "eth1");
        let stays =
            wait::until(FOLLOW, || !attachments(&status(&t.gw, &t.pins)).contains(&"xdp@eth1".into()));
        assert!(!stays, "eth1 detached by a device event after the reload\n{}", daemon.log());
    }
    assert!(!side_cgnat_pings(&t), "the uplink added by the reload is unprotected");
}

fn a_reload_while_a_listed_uplink_is_absent_is_applied(backend: &str) {
    let t = Topology::new().unwrap();
    let both = config(backend, "").replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\", \"eth1\"]");
    let daemon = Daemon::start(&t.gw, &t.pins, &both).unwrap();
    t.gw.ip(&["link", "del", "eth1"]).unwrap();
    let readies = daemon.readies();
    daemon.write_config(&both.replace("[cgnat]\n", "[cgnat]\nallow = [\"100.64.0.0/24\"]\n")).unwrap();
    daemon.wait_ready_after(readies).unwrap();
    assert!(t.cgnat_neighbours_ping(), "the reload was not applied:\n{}", daemon.log());
    if backend == "bpf" {
        let s = status(&t.gw, &t.pins);
        assert_eq!(
            s["pending"],
            serde_json::json!([
                "xdp on eth1 (absent)",
                "uplink_egress on eth1 (absent)",
                "masquerade_in on eth1 (absent)",
                "masquerade_out on eth1 (absent)"
            ]),
            "{s}"
        );
    }
}

#[test]
fn a_failed_reload_is_not_applied_by_a_later_device_event() {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config("bpf", "")).unwrap();
    // Another program owns eth1's XDP hook: a reload moving the uplink there fails.
    let other = tailgate_tests::daemon::PinDir::new(&t.gw);
    // (Without masquerade: two daemons writing netfilter rules in one namespace are refused.)
    let owner = "tunnel = \"tun0\"\ninterfaces = [\"eth1\"]\nbackend = \"bpf\"\n[subnet_routes]\nmasquerade = false\n";
    let _owner = Daemon::start(&t.gw, &other, owner).unwrap();
    let readies = daemon.readies();
    daemon
        .write_config(&config("bpf", "").replace("interfaces = [\"eth0\"]", "interfaces = [\"eth1\"]"))
        .unwrap();
    daemon.wait_ready_after(readies).unwrap();
    assert!(daemon.log().contains("reload failed, running state unchanged"), "{}", daemon.log());
    // A device event: the uplinks stay those of the config in force.
    t.gw.ip(&["link", "add", "x7", "type", "veth", "peer", "name", "y7"]).unwrap();
    t.gw.ip(&["link", "del", "x7"]).unwrap();
    let detached = wait::until(FOLLOW, || !attachments(&status(&t.gw, &t.pins)).contains(&"xdp@eth0".into()));
    assert!(!detached, "eth0 detached after a failed reload\n{}", daemon.log());
    assert!(!t.cgnat_neighbours_ping());
}
