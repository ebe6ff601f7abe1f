//! CGNAT filtering on crafted packets through BPF_PROG_TEST_RUN: exact verdicts, exact
//! counter changes. Maps are filled by the daemon's own map sync from a config.

use std::collections::HashMap;

use tailgate::backend::bpf::Datapath;
use tailgate_abi::counters::Counter;
use tailgate_tests::{
    packets::*,
    testrun::{self, TCX_NEXT, TC_ACT_SHOT, XDP_DROP, XDP_PASS},
};

const CONFIG: &str = r#"
[cgnat]
allow = ["100.100.0.0/16", "fd7a:115c:a1e0:ab::/64"]
drop  = ["100.100.100.200/32"]
"#;

/// Runs `frame` through the uplink program and checks the verdict and that exactly
/// `counter` went up by one.
fn uplink(dp: &mut Datapath, what: &str, frame: &[u8], verdict: u32, counter: Counter) {
    let before = testrun::counters(dp).unwrap();
    let got = testrun::run_xdp(dp, frame).unwrap();
    assert_eq!(got, verdict, "{what}: XDP verdict");
    assert_counted(what, &before, &testrun::counters(dp).unwrap(), counter);
}

fn tunnel(dp: &mut Datapath, what: &str, frame: &[u8], ingress: u32, verdict: u32, counter: Counter) {
    let before = testrun::counters(dp).unwrap();
    let got = testrun::run_tunnel_egress(dp, frame, ingress).unwrap();
    assert_eq!(got, verdict, "{what}: TC verdict");
    assert_counted(what, &before, &testrun::counters(dp).unwrap(), counter);
}

fn assert_counted(
    what: &str,
    before: &HashMap<Counter, u64>,
    after: &HashMap<Counter, u64>,
    counter: Counter,
) {
    // Flow-table counters (a drop asks whether the packet is a reply) are the conntrack
    // tests' business.
    for c in Counter::ALL.into_iter().filter(|c| !c.name().starts_with("flow_")) {
        let want = before[&c] + u64::from(c == counter);
        assert_eq!(after[&c], want, "{what}: counter {}", c.name());
    }
}

#[test]
fn uplink_ipv4_verdicts() {
    let mut dp = testrun::datapath(CONFIG).unwrap();
    let d = "192.0.2.1";
    let cases = [
        ("non-CGNAT source", "198.51.100.7", XDP_PASS, Counter::UplinkPassNoMatch),
        ("CGNAT source", "100.64.1.1", XDP_DROP, Counter::UplinkDrop),
        ("CGNAT upper edge", "100.127.255.255", XDP_DROP, Counter::UplinkDrop),
        ("just below CGNAT", "100.63.255.255", XDP_PASS, Counter::UplinkPassNoMatch),
        ("just above CGNAT", "100.128.0.0", XDP_PASS, Counter::UplinkPassNoMatch),
        ("ChromeOS range", "100.115.92.5", XDP_PASS, Counter::UplinkPassRule),
        ("ChromeOS upper edge", "100.115.93.255", XDP_PASS, Counter::UplinkPassRule),
        ("past ChromeOS range", "100.115.94.0", XDP_DROP, Counter::UplinkDrop),
        ("exempt /16 (cloud DNS)", "100.100.2.136", XDP_PASS, Counter::UplinkPassRule),
        ("denied /32 inside the exempt /16", "100.100.100.200", XDP_DROP, Counter::UplinkDrop),
        ("neighbour of the denied /32", "100.100.100.201", XDP_PASS, Counter::UplinkPassRule),
    ];
    for (what, src, verdict, counter) in cases {
        uplink(&mut dp, what, &eth_udp4(src, d), verdict, counter);
    }
}

type Case = (&'static str, Vec<u8>, u32, Counter);

fn uplink_cases(dp: &mut Datapath, cases: Vec<Case>) {
    for (what, frame, verdict, counter) in cases {
        uplink(dp, what, &frame, verdict, counter);
    }
}

#[test]
fn uplink_ipv6_verdicts() {
    let mut dp = testrun::datapath(CONFIG).unwrap();
    let d = "2001:db8::1";
    use Counter::*;
    uplink_cases(
        &mut dp,
        vec![
            ("tailnet ULA", eth_udp6("fd7a:115c:a1e0::5", d), XDP_DROP, UplinkDrop),
            ("exempt ULA /64", eth_udp6("fd7a:115c:a1e0:ab::9", d), XDP_PASS, UplinkPassRule),
            ("next /48", eth_udp6("fd7a:115c:a1e1::5", d), XDP_PASS, UplinkPassNoMatch),
            ("global", eth_udp6("2001:db8::2", d), XDP_PASS, UplinkPassNoMatch),
        ],
    );
}

#[test]
fn uplink_non_ip_vlan_options_fragments() {
    let mut dp = testrun::datapath(CONFIG).unwrap();
    let (cgnat, lan, exempt, d) = ("100.64.1.1", "198.51.100.7", "100.100.2.136", "192.0.2.1");
    use Counter::*;
    uplink_cases(
        &mut dp,
        vec![
            ("ARP", arp(), XDP_PASS, UplinkPassNotIp),
            ("802.1Q CGNAT", vlan_udp4(cgnat, d), XDP_DROP, UplinkDrop),
            ("802.1Q non-CGNAT", vlan_udp4(lan, d), XDP_PASS, UplinkPassNoMatch),
            ("QinQ CGNAT", qinq_udp4(cgnat, d), XDP_DROP, UplinkDrop),
            ("QinQ exempt", qinq_udp4(exempt, d), XDP_PASS, UplinkPassRule),
            ("IP options CGNAT", eth_udp4_options(cgnat, d), XDP_DROP, UplinkDrop),
            ("IP options non-CGNAT", eth_udp4_options(lan, d), XDP_PASS, UplinkPassNoMatch),
            ("fragment CGNAT", eth_fragment4(cgnat, d), XDP_DROP, UplinkDrop),
            ("fragment non-CGNAT", eth_fragment4(lan, d), XDP_PASS, UplinkPassNoMatch),
        ],
    );
}

#[test]
fn uplink_truncated_and_malformed_pass() {
    let mut dp = testrun::datapath(CONFIG).unwrap();
    let full = eth_udp4("100.64.1.1", "192.0.2.1");
    let v6 = eth_udp6("fd7a:115c:a1e0::5", "2001:db8::1");
    // The kernel's test run needs 14 bytes at least: a VLAN tag cut short stands in for
    // a frame too short to parse.
    let mut vlan_cut = vlan_udp4("100.64.1.1", "192.0.2.1");
    vlan_cut.truncate(16);
    use Counter::*;
    uplink_cases(
        &mut dp,
        vec![
            ("VLAN tag cut", vlan_cut, XDP_PASS, UplinkPassMalformed),
            ("IPv4 header cut at 19 bytes", full[..14 + 19].to_vec(), XDP_PASS, UplinkPassMalformed),
            ("IPv6 header cut at 39 bytes", v6[..14 + 39].to_vec(), XDP_PASS, UplinkPassMalformed),
            ("IHL below 5", eth_bad_ihl4("100.64.1.1", "192.0.2.1"), XDP_PASS, UplinkPassMalformed),
            // A complete header with its payload cut still has a readable source.
            ("payload cut", full[..14 + 20].to_vec(), XDP_DROP, UplinkDrop),
        ],
    );
}

#[test]
fn rule_hits_are_counted_per_rule() {
    let mut dp = testrun::datapath(CONFIG).unwrap();
    let entries =
        tailgate::backend::bpf::cgnat::read_active::<4>(&dp.ebpf, tailgate_abi::cgnat::MAP_IN_V4).unwrap();
    let id = |addr: [u8; 4], len: u32| entries[&(len, addr)].rule_id;
    let (cgnat, exempt, denied) =
        (id([100, 64, 0, 0], 10), id([100, 100, 0, 0], 16), id([100, 100, 100, 200], 32));
    for _ in 0..3 {
        testrun::run_xdp(&mut dp, &eth_udp4("100.100.100.200", "192.0.2.1")).unwrap();
    }
    testrun::run_xdp(&mut dp, &eth_udp4("100.100.1.1", "192.0.2.1")).unwrap();
    assert_eq!(testrun::rule_hits(&dp, denied).unwrap(), 3);
    assert_eq!(testrun::rule_hits(&dp, exempt).unwrap(), 1);
    assert_eq!(testrun::rule_hits(&dp, cgnat).unwrap(), 0);
}

#[test]
fn mode_off_passes_everything() {
    let mut dp = testrun::datapath("[cgnat]\nmode = \"off\"").unwrap();
    use Counter::*;
    uplink_cases(
        &mut dp,
        vec![
            ("CGNAT", eth_udp4("100.64.1.1", "192.0.2.1"), XDP_PASS, UplinkPassNoMatch),
            ("ULA", eth_udp6("fd7a:115c:a1e0::5", "2001:db8::1"), XDP_PASS, UplinkPassNoMatch),
        ],
    );
    let frame = eth_udp4("100.64.1.1", "100.101.0.1");
    tunnel(&mut dp, "forwarded CGNAT", &frame, 7, TCX_NEXT, TunnelPassForward);
}

#[test]
fn tunnel_egress_verdicts() {
    let mut dp = testrun::datapath(CONFIG).unwrap();
    let (d, d6) = ("100.101.2.3", "fd7a:115c:a1e0::9");
    use Counter::*;
    // The test device is lo (ifindex 1): ingress 1 means "came in through the tunnel",
    // 0 "generated by this host", 7 "forwarded from another interface".
    let cases: Vec<(&str, Vec<u8>, u32, u32, Counter)> = vec![
        ("local CGNAT source", eth_udp4("100.101.0.1", d), 0, TCX_NEXT, TunnelPassLocal),
        ("hairpin from the tunnel", eth_udp4("100.90.0.1", d), 1, TCX_NEXT, TunnelPassFromTunnel),
        ("forwarded CGNAT", eth_udp4("100.64.7.2", d), 7, TC_ACT_SHOT, TunnelDrop),
        ("forwarded ChromeOS", eth_udp4("100.115.92.5", d), 7, TC_ACT_SHOT, TunnelDrop),
        ("forwarded LAN", eth_udp4("192.0.2.2", d), 7, TCX_NEXT, TunnelPassForward),
        ("forwarded exempt", eth_udp4("100.100.2.136", d), 7, TCX_NEXT, TunnelPassForward),
        ("forwarded denied", eth_udp4("100.100.100.200", d), 7, TC_ACT_SHOT, TunnelDrop),
        ("forwarded ULA", eth_udp6("fd7a:115c:a1e0::5", d6), 7, TC_ACT_SHOT, TunnelDrop),
        ("forwarded global v6", eth_udp6("2001:db8::2", d6), 7, TCX_NEXT, TunnelPassForward),
        ("forwarded ARP", arp(), 7, TCX_NEXT, TunnelPassOther),
    ];
    for (what, frame, ingress, verdict, counter) in cases {
        tunnel(&mut dp, what, &frame, ingress, verdict, counter);
    }
}

#[test]
fn reload_keeps_rule_ids_and_counters_of_unchanged_rules() {
    let mut dp = testrun::datapath(CONFIG).unwrap();
    let read = |dp: &Datapath| {
        tailgate::backend::bpf::cgnat::read_active::<4>(&dp.ebpf, tailgate_abi::cgnat::MAP_IN_V4).unwrap()
    };
    let before = read(&dp);
    let exempt_id = before[&(16, [100, 100, 0, 0])].rule_id;
    testrun::run_xdp(&mut dp, &eth_udp4("100.100.1.1", "192.0.2.1")).unwrap();

    // Drop the /32, add a /24 exemption.
    let config = tailgate::config::Config::parse(
        "[cgnat]\nallow = [\"100.100.0.0/16\", \"100.64.0.0/24\", \"fd7a:115c:a1e0:ab::/64\"]",
        &HashMap::new(),
    )
    .unwrap();
    let report = dp.sync(&tailgate::policy::compile(&config, Default::default())).unwrap().expect("a change");
    let after = read(&dp);
    assert_eq!(after[&(16, [100, 100, 0, 0])].rule_id, exempt_id);
    assert!(!after.contains_key(&(32, [100, 100, 100, 200])));
    assert!(after.contains_key(&(24, [100, 64, 0, 0])));
    assert_eq!(testrun::rule_hits(&dp, exempt_id).unwrap(), 1, "counter survived the reload");
    // inbound: +/24 -/32; forward: the same.
    assert_eq!((report.added, report.removed), (2, 2));
    assert_eq!(testrun::run_xdp(&mut dp, &eth_udp4("100.64.0.2", "192.0.2.1")).unwrap(), XDP_PASS);
    assert_eq!(testrun::run_xdp(&mut dp, &eth_udp4("100.100.100.200", "192.0.2.1")).unwrap(), XDP_PASS);

    // A verdict change gets a fresh id with a zeroed counter.
    let config =
        tailgate::config::Config::parse("[cgnat]\ndrop = [\"100.100.0.0/16\"]", &HashMap::new()).unwrap();
    dp.sync(&tailgate::policy::compile(&config, Default::default())).unwrap();
    let rule = read(&dp)[&(16, [100, 100, 0, 0])];
    assert_eq!(rule.verdict, tailgate_abi::verdict::DROP);
    assert_eq!(testrun::rule_hits(&dp, rule.rule_id).unwrap(), 0);
}

/// `count` distinct /28 exemptions starting at /28 slot `first` of 100.64.0.0/10.
fn many_exemptions(first: u32, count: u32) -> String {
    let base = u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0));
    let prefixes: Vec<String> = (first..first + count)
        .map(|slot| format!("\"{}/28\"", std::net::Ipv4Addr::from(base + slot * 16)))
        .collect();
    format!("[cgnat]\nallow = [{}]", prefixes.join(","))
}

#[test]
fn replacing_most_rules_in_one_reload_keeps_every_rule_counted() {
    // 70,000 rules in both tries, then a disjoint 70,000: more than the id space holds
    // while old and new overlap.
    let mut dp = testrun::datapath(&many_exemptions(0, 70_000)).unwrap();
    let config = tailgate::config::Config::parse(&many_exemptions(100_000, 70_000), &HashMap::new()).unwrap();
    dp.sync(&tailgate::policy::compile(&config, Default::default())).unwrap();
    assert_every_rule_counted(&dp, 70_000);
    // The new rules work and count.
    let src = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) + 100_000 * 16 + 3);
    assert_eq!(testrun::run_xdp(&mut dp, &eth_udp4(&src.to_string(), "192.0.2.1")).unwrap(), XDP_PASS);
}

/// Every entry has a counter slot; ids are unique within a trie, and a prefix has the same id
/// inbound and forward (one rule, one counter).
fn assert_every_rule_counted(dp: &Datapath, user_prefixes: usize) {
    use tailgate::backend::bpf::cgnat::{read_active, read_generation};
    use tailgate_abi::cgnat::{MAP_FWD_V4, MAP_IN_V4};
    let inbound = read_active::<4>(&dp.ebpf, MAP_IN_V4).unwrap();
    let forward = read_active::<4>(&dp.ebpf, MAP_FWD_V4).unwrap();
    // Both policy generations hold the same policy at rest.
    for name in [MAP_IN_V4, MAP_FWD_V4] {
        let generation = |g| read_generation::<4>(&dp.ebpf, name, g).unwrap();
        assert_eq!(generation(0), generation(1));
    }
    assert_eq!(inbound.len(), user_prefixes + 2, "user rules, CGNAT range, ChromeOS range");
    assert_eq!(forward.len(), user_prefixes + 1, "user rules, CGNAT range");
    let ids: std::collections::HashSet<u32> = inbound.values().map(|r| r.rule_id).collect();
    assert_eq!(ids.len(), inbound.len(), "an id used twice");
    assert!(ids.iter().all(|id| *id < tailgate_abi::MAX_RULES), "a rule without a counter");
    for (key, rule) in &forward {
        assert_eq!(inbound[key].rule_id, rule.rule_id, "{key:?}: inbound and forward ids differ");
    }
}

#[test]
fn a_hundred_thousand_prefixes_all_have_counters() {
    let dp = testrun::datapath(&many_exemptions(0, 100_000)).unwrap();
    assert_every_rule_counted(&dp, 100_000);
}

/// Exemptions scattered over the /10 (every 7th /28 from `first`), so tables have runs.
fn scattered_exemptions(first: u32, count: u32) -> Vec<std::net::Ipv4Addr> {
    let base = u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0));
    (first..first + count).map(|i| std::net::Ipv4Addr::from(base + (i * 7 % 262_144) * 16)).collect()
}

fn sync_exemptions(dp: &mut Datapath, prefixes: &[std::net::Ipv4Addr]) {
    let list: Vec<String> = prefixes.iter().map(|a| format!("\"{a}/28\"")).collect();
    let config =
        tailgate::config::Config::parse(&format!("[cgnat]\nallow = [{}]", list.join(",")), &HashMap::new())
            .unwrap();
    dp.sync(&tailgate::policy::compile(&config, Default::default())).unwrap();
}

/// Every exempt prefix passes and its neighbours drop, in both programs.
fn assert_exactly_exempt(dp: &mut Datapath, exempt: &[std::net::Ipv4Addr], gone: &[std::net::Ipv4Addr]) {
    for (addrs, uplink, forward) in [(exempt, XDP_PASS, TCX_NEXT), (gone, XDP_DROP, TC_ACT_SHOT)] {
        for a in addrs {
            let src = std::net::Ipv4Addr::from(u32::from(*a) + 9).to_string();
            let frame = eth_udp4(&src, "192.0.2.1");
            assert_eq!(testrun::run_xdp(dp, &frame).unwrap(), uplink, "uplink, source {src}");
            assert_eq!(testrun::run_tunnel_egress(dp, &frame, 7).unwrap(), forward, "forward, source {src}");
        }
    }
}

#[test]
fn slot_tables_hold_every_prefix_through_removals_growth_and_shrinking() {
    // 3,000 prefixes: a table of 8,192 slots with runs. Then half removed in place (the
    // runs behind them move back), then grown past the table (a new, larger one), then
    // shrunk far below it (a smaller one): every prefix found, no removed one left.
    let first = scattered_exemptions(0, 3_000);
    let mut dp = testrun::datapath("").unwrap();
    sync_exemptions(&mut dp, &first);
    assert_exactly_exempt(&mut dp, &first, &scattered_exemptions(3_000, 500));
    let kept: Vec<_> = first.iter().step_by(2).copied().collect();
    let removed: Vec<_> = first.iter().skip(1).step_by(2).copied().collect();
    sync_exemptions(&mut dp, &kept);
    assert_exactly_exempt(&mut dp, &kept, &removed);
    let grown = scattered_exemptions(0, 9_000);
    sync_exemptions(&mut dp, &grown);
    assert_exactly_exempt(&mut dp, &grown, &scattered_exemptions(9_000, 500));
    let shrunk = scattered_exemptions(8_000, 100);
    sync_exemptions(&mut dp, &shrunk);
    assert_exactly_exempt(&mut dp, &shrunk, &scattered_exemptions(0, 1_000));
}

mod longest_prefix {
    //! The kernel's lookup (range check, one probe per prefix length, fallback) against
    //! `policy::resolve` on random policies, in both directions, through the real map sync.
    //! Policies follow each other in one datapath, so every case is also a reload.

    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use ipnet::{IpNet, Ipv4Net, Ipv6Net};
    use proptest::prelude::*;
    use tailgate::{
        backend::bpf::{Datapath, KernelLog, Params},
        config::Config,
        policy::{self, resolve, Rule, Verdict},
    };

    use super::*;

    /// A prefix inside the filtered range of its family (what the config accepts), from a
    /// small address space so that prefixes nest and overlap.
    fn prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 10u8..=32).prop_map(|(a, len)| {
                let a = (a & 0x003f_0f0f) | 0x6440_0000;
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc())
            }),
            (any::<u128>(), 48u8..=128).prop_map(|(a, len)| {
                let a = (a & 0x0000_00ff_0000_0000_0000_00ff) | (0xfd7a_115c_a1e0u128 << 80);
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc())
            }),
        ]
    }

    fn addresses(rules: &[Rule], random: &[u32]) -> Vec<IpAddr> {
        let mut addrs: Vec<IpAddr> = Vec::new();
        for r in rules {
            addrs.extend([r.prefix.network(), r.prefix.broadcast()]);
        }
        for &a in random {
            addrs.push(Ipv4Addr::from((a & 0x007f_0f0f) | 0x6400_0000).into());
            let v6 = (u128::from(a & 0xff) << 64) | u128::from(a >> 24) | (0xfd7a_115c_a1e0u128 << 80);
            addrs.push(Ipv6Addr::from(v6).into());
        }
        addrs.push("198.51.100.1".parse().unwrap());
        addrs
    }

    fn frame(src: IpAddr) -> Vec<u8> {
        match src {
            IpAddr::V4(a) => eth_udp4(&a.to_string(), "192.0.2.1"),
            IpAddr::V6(a) => eth_udp6(&a.to_string(), "2001:db8::1"),
        }
    }

    fn expected(rules: &[Rule], src: IpAddr) -> bool {
        resolve(rules, src).is_some_and(|r| r.verdict == Verdict::Drop)
    }

    #[test]
    fn kernel_lookup_is_longest_prefix_match() {
        // One datapath for every case (loading takes seconds); each case is a reload.
        let dp =
            Datapath::load_with(None, KernelLog::Off, Params { tunnel_l3_offset: 14, ..Params::default() })
                .unwrap();
        let dp = std::cell::RefCell::new(dp);
        let policy = (
            prop::collection::vec((prefix(), any::<bool>()), 0..16),
            prop::collection::vec(any::<u32>(), 12),
        );
        let mut runner =
            proptest::test_runner::TestRunner::new(ProptestConfig { cases: 64, ..Default::default() });
        let result = runner.run(&policy, |(prefixes, random)| {
            let mut config = Config::parse("tunnel = \"tun0\"", &Default::default()).unwrap();
            for (prefix, allow) in prefixes {
                if config.cgnat.allow.contains(&prefix) || config.cgnat.drop.contains(&prefix) {
                    continue;
                }
                if allow {
                    config.cgnat.allow.push(prefix)
                } else {
                    config.cgnat.drop.push(prefix)
                }
            }
            let state = policy::compile(
                &config,
                policy::System { uplinks: Vec::new(), tunnel_mtu: None, ..Default::default() },
            );
            let mut dp = dp.borrow_mut();
            dp.sync(&state).unwrap();
            for src in addresses(&state.cgnat.inbound, &random) {
                let uplink = testrun::run_xdp(&mut dp, &frame(src)).unwrap();
                let want = if expected(&state.cgnat.inbound, src) { XDP_DROP } else { XDP_PASS };
                prop_assert_eq!(uplink, want, "uplink, source {}", src);
                let forward = testrun::run_tunnel_egress(&mut dp, &frame(src), 7).unwrap();
                let want = if expected(&state.cgnat.forward, src) { TC_ACT_SHOT } else { TCX_NEXT };
                prop_assert_eq!(forward, want, "forward, source {}", src);
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
