//! CGNAT filtering end to end: real packets through namespaces, veth and a TUN device, with
//! the real daemon. Every scenario runs once per backend and must observe the same results.

use std::{
    net::{IpAddr, UdpSocket},
    time::Duration,
};

use anyhow::Result;
use nix::sys::signal::Signal;
use tailgate_tests::{
    daemon::{status, Daemon},
    netns::Netns,
    on_both_backends,
    packets::{ip_echo4, ip_summary},
    topology::*,
    wait,
};

on_both_backends!(
    lan_neighbour_in_cgnat_space_is_blocked_until_allowed_then_reloaded,
    spoofed_cgnat_source_on_the_uplink_is_dropped_while_non_cgnat_passes,
    cgnat_source_injected_into_the_tunnel_is_delivered,
    cgnat_source_forwarded_into_the_tunnel_from_elsewhere_is_dropped,
    tailnet_ula_neighbour_is_dropped_until_allowed,
);

const SETTLE: Duration = Duration::from_secs(5);

/// A UDP socket bound inside `ns`.
fn listen_udp(ns: &Netns, port: u16) -> Result<UdpSocket> {
    let sock = ns.enter(move || Ok(UdpSocket::bind(("0.0.0.0", port))?))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(sock)
}

/// Sources of the datagrams that arrive within `timeout`.
fn received_from(sock: &UdpSocket, timeout: Duration) -> Vec<IpAddr> {
    let mut buf = [0u8; 64];
    let mut from = Vec::new();
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok((_, addr)) = sock.recv_from(&mut buf) {
            from.push(addr.ip());
        }
    }
    from
}

fn status_json(t: &Topology) -> serde_json::Value {
    status(&t.gw, &t.pins)
}

fn counter(t: &Topology, name: &str) -> u64 {
    status_json(t)["counters"][name].as_u64().unwrap()
}

fn lan_neighbour_in_cgnat_space_is_blocked_until_allowed_then_reloaded(backend: &str) {
    let t = Topology::new().unwrap();
    assert!(t.cgnat_neighbours_ping(), "control: without tailgate the neighbours ping");
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let pid = daemon.pid();

    assert!(!t.cgnat_neighbours_ping(), "default policy: CGNAT neighbour must be dropped");
    assert!(t.lan.ping(GW_LAN, Some(LAN)), "non-CGNAT addresses on the same link still work");

    // Allow the LAN's /24 and reload with SIGHUP: no restart, same process.
    std::fs::write(daemon.config_path(), config(backend, "allow = [\"100.64.0.0/24\"]")).unwrap();
    daemon.signal(Signal::SIGHUP).unwrap();
    assert!(
        wait::until(SETTLE, || t.cgnat_neighbours_ping()),
        "after the allow + reload the neighbours ping\n{}",
        daemon.log()
    );
    assert_eq!(daemon.pid(), pid);

    // Take the exemption away by rewriting the file (the watcher reloads, no signal).
    daemon.write_config(&config(backend, "")).unwrap();
    let gone = wait::until(SETTLE, || {
        status_json(&t)["rules"].as_array().unwrap().iter().all(|r| r["prefix"] != "100.64.0.0/24")
    });
    assert!(gone, "file change was not picked up\n{}", daemon.log());
    assert!(!t.cgnat_neighbours_ping(), "exemption removed: dropped again");
    assert_eq!(daemon.pid(), pid);
}

fn spoofed_cgnat_source_on_the_uplink_is_dropped_while_non_cgnat_passes(backend: &str) {
    let t = Topology::new().unwrap();
    let sock = listen_udp(&t.gw, 5353).unwrap();
    t.lan.send_udp(LAN_SPOOF, GW_LAN, 5353, 3).unwrap();
    assert!(
        received_from(&sock, Duration::from_secs(1)).contains(&LAN_SPOOF.parse().unwrap()),
        "control: arrives without tailgate"
    );

    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let drops = counter(&t, "uplink_drop");
    t.lan.send_udp(LAN_SPOOF, GW_LAN, 5353, 5).unwrap();
    t.lan.send_udp(LAN, GW_LAN, 5353, 5).unwrap();
    let from = received_from(&sock, Duration::from_secs(1));
    assert!(!from.contains(&LAN_SPOOF.parse().unwrap()), "spoofed CGNAT source got through");
    assert_eq!(
        from.iter().filter(|a| **a == LAN.parse::<IpAddr>().unwrap()).count(),
        5,
        "non-CGNAT host must pass"
    );
    assert_eq!(counter(&t, "uplink_drop") - drops, 5);
}

fn cgnat_source_injected_into_the_tunnel_is_delivered(backend: &str) {
    let mut t = Topology::new().unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();

    // A tailnet peer pings the gateway's tailnet address: delivered, answered.
    t.tun.send(&ip_echo4(PEER, GW_TAILNET, 7, 1)).unwrap();
    let reply = t.tun.recv_matching(SETTLE, |p| {
        ip_summary(p) == Some((GW_TAILNET.parse().unwrap(), PEER.parse().unwrap(), Some(0)))
    });
    assert!(reply.is_some(), "no echo reply from the gateway");

    // ... and a LAN host through the gateway (subnet route): forwarded, and the LAN host's
    // reply is forwarded back into the tunnel.
    t.tun.send(&ip_echo4(PEER, LAN, 7, 2)).unwrap();
    let reply = t.tun.recv_matching(SETTLE, |p| {
        ip_summary(p) == Some((LAN.parse().unwrap(), PEER.parse().unwrap(), Some(0)))
    });
    assert!(reply.is_some(), "no echo reply from the LAN host");
    if backend == "bpf" {
        // Netfilter has no counterpart of these counters (OUTPUT is not filtered).
        assert!(counter(&t, "tunnel_pass_local") >= 1);
        assert!(counter(&t, "tunnel_pass_forward") >= 1);
    }
}

fn cgnat_source_forwarded_into_the_tunnel_from_elsewhere_is_dropped(backend: &str) {
    let mut t = Topology::new().unwrap();
    let from = |src: &'static str| move |p: &[u8]| matches!(ip_summary(p), Some((s, _, _)) if s == src.parse::<IpAddr>().unwrap());
    t.side.send_udp(SIDE_CGNAT, PEER, 9, 1).unwrap();
    assert!(t.tun.recv_matching(SETTLE, from(SIDE_CGNAT)).is_some(), "control: forwarded without tailgate");

    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    t.side.send_udp(SIDE_CGNAT, PEER, 9, 3).unwrap();
    t.side.send_udp(SIDE, PEER, 9, 1).unwrap();
    assert!(
        t.tun.recv_matching(SETTLE, from(SIDE)).is_some(),
        "non-CGNAT forwarded source must reach the tunnel"
    );
    assert!(
        t.tun.recv_matching(Duration::from_millis(500), from(SIDE_CGNAT)).is_none(),
        "CGNAT source from a non-tunnel interface reached the tunnel"
    );
    assert_eq!(counter(&t, "tunnel_drop"), 3);
}

#[test]
fn jumbo_mtu_uplink_gets_generic_xdp_and_is_still_filtered() {
    let t = Topology::new().unwrap();
    // veth refuses native XDP for a single-buffer program above ~3.5k MTU.
    t.gw.ip(&["link", "set", "eth0", "mtu", "9000"]).unwrap();
    t.lan.ip(&["link", "set", "eth0", "mtu", "9000"]).unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config("bpf", "")).unwrap();
    daemon.wait_for_log("attached in generic mode");
    let link = t.gw.exec("ip", &["-d", "link", "show", "dev", "eth0"]).unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains(" xdpgeneric "), "{link:?}");
    assert!(!t.cgnat_neighbours_ping(), "generic XDP must filter too");
    assert!(t.lan.ping(GW_LAN, Some(LAN)));
}

fn tailnet_ula_neighbour_is_dropped_until_allowed(backend: &str) {
    let t = Topology::new().unwrap();
    let ping6 = |dst: &str, src: &str| t.lan.ping(dst, Some(src));
    assert!(ping6(GW_ULA, LAN_ULA), "control: without tailgate the ULA neighbours ping");
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    assert!(!ping6(GW_ULA, LAN_ULA), "a tailnet ULA source on the uplink must be dropped");
    assert!(ping6(GW_V6, LAN_V6), "other IPv6 sources pass");
    daemon.write_config(&config(backend, "allow = [\"fd7a:115c:a1e0::/64\"]")).unwrap();
    assert!(wait::until(SETTLE, || ping6(GW_ULA, LAN_ULA)), "allowed /64 must pass\n{}", daemon.log());
}
