//! Subnet routing end to end, on both backends: a tailnet peer behind a TUN-to-TUN relay
//! opens real TCP connections and sends UDP to a LAN host that has no route back to the
//! tailnet. Masquerade, the mark (seen by a netfilter rule of the host's) and the MSS clamp
//! in both directions, IPv4 and IPv6.

use std::net::IpAddr;

use tailgate_tests::{
    daemon::Daemon,
    on_both_backends,
    tailnet::{config, Tailnet, GW_LAN, GW_LAN6, LAN, LAN6, PEER},
    wait,
};

const MARK: &str = "0x40000/0xff0000";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

on_both_backends!(
    defaults_masquerade_mark_and_clamp_both_ways,
    fixed_clamp_applies,
    clamp_off_and_masquerade_off_do_what_they_say,
    clamp_follows_the_tunnel_mtu,
);

fn defaults_masquerade_mark_and_clamp_both_ways(backend: &str) {
    let t = Tailnet::new().unwrap();
    t.watch_mark(MARK).unwrap();
    // Control: without tailgate the LAN host sees the peer's own address and cannot answer.
    assert_eq!(t.udp_source(PEER, LAN, 9000).unwrap(), Some(ip(PEER)));
    assert!(t.connect(LAN, 8000).is_err(), "control: no route back without masquerade");

    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    assert_eq!(t.udp_source(PEER, LAN, 9001).unwrap(), Some(ip(GW_LAN)), "masqueraded");
    let c = t.connect(LAN, 8001).unwrap();
    assert_eq!(c.seen_from, ip(GW_LAN));
    // Without the clamp both ends settle on 1460 (1448 with timestamps).
    assert!(c.lan_mss <= 1240 && c.peer_mss <= 1240, "IPv4 clamped to the 1280 tunnel: {c:?}");
    let c = t.connect(LAN6, 8002).unwrap();
    assert_eq!(c.seen_from, ip(GW_LAN6));
    assert!(c.lan_mss <= 1220 && c.peer_mss <= 1220, "IPv6 clamped to the 1280 tunnel: {c:?}");
    assert!(t.marked_packets(MARK).unwrap() > 0, "the host's own mark rule saw the marked packets");
}

fn fixed_clamp_applies(backend: &str) {
    let t = Tailnet::new().unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "[mss]\nclamp = 1100")).unwrap();
    for (dst, port) in [(LAN, 8010), (LAN6, 8011)] {
        let c = t.connect(dst, port).unwrap();
        assert!(c.lan_mss <= 1100 && c.peer_mss <= 1100 && c.lan_mss > 1000, "{dst}: {c:?}");
    }
}

fn clamp_off_and_masquerade_off_do_what_they_say(backend: &str) {
    let t = Tailnet::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "[mss]\nclamp = \"off\"")).unwrap();
    let c = t.connect(LAN, 8020).unwrap();
    assert!(c.lan_mss > 1240, "clamp off: the LAN host takes the peer's 1460: {c:?}");
    drop(daemon);
    let config = config(backend, "[subnet_routes]\nmasquerade = false\nmark = \"0x100/0xf00\"");
    let _daemon = Daemon::start(&t.gw, &t.pins, &config).unwrap();
    t.watch_mark("0x100/0xf00").unwrap();
    assert_eq!(t.udp_source(PEER, LAN, 9020).unwrap(), Some(ip(PEER)), "not masqueraded");
    assert!(t.marked_packets("0x100/0xf00").unwrap() > 0, "the configured mark is set");
}

fn clamp_follows_the_tunnel_mtu(backend: &str) {
    let t = Tailnet::new().unwrap();
    let _daemon = Daemon::start(&t.gw, &t.pins, &config(backend, "")).unwrap();
    let c = t.connect(LAN, 8030).unwrap();
    assert!(c.lan_mss <= 1240, "{c:?}");
    t.gw.ip(&["link", "set", "tun0", "mtu", "1400"]).unwrap();
    // The daemon follows the device event; new connections then get the new clamp.
    let mut port = 8031;
    let followed = wait::until(std::time::Duration::from_secs(5), || {
        port += 1;
        t.connect(LAN, port).is_ok_and(|c| c.lan_mss > 1240 && c.lan_mss <= 1360)
    });
    assert!(followed, "MSS clamp did not follow the tunnel MTU to 1400");
}
