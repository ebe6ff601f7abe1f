//! What only the iptables backend has to prove: it repairs what other programs remove,
//! `divert = false` leaves the built-in chains to the user, and a reload rewrites only the
//! chains that changed.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tailgate_tests::{daemon::Daemon, netns::Netns, topology::*, wait};

fn iptables(ns: &Netns, family: &str, args: &[&str]) -> String {
    let bin = if family == "v6" { "ip6tables" } else { "iptables" };
    let out = ns.exec(bin, args).unwrap();
    assert!(out.status.success(), "{bin} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn save(ns: &Netns, family: &str, table: &str) -> String {
    iptables(ns, family, &["-S", "-t", table]) + &counters(ns, family, table)
}

/// `iptables-save -c` of one table.
fn counters(ns: &Netns, family: &str, table: &str) -> String {
    let bin = if family == "v6" { "ip6tables-save" } else { "iptables-save" };
    String::from_utf8_lossy(&ns.exec(bin, &["-c", "-t", table]).unwrap().stdout).into_owned()
}

/// Packets counted by the rule of `chain` whose comment contains `label`.
fn packets(ns: &Netns, family: &str, table: &str, chain: &str, label: &str) -> u64 {
    let text = counters(ns, family, table);
    let line = text
        .lines()
        .find(|l| l.contains(&format!("-A {chain} ")) && l.contains(label))
        .unwrap_or_else(|| panic!("no rule {label:?} in {chain}:\n{text}"));
    line.trim_start_matches('[').split(':').next().unwrap().parse().unwrap()
}

#[test]
fn rules_flushed_by_another_program_are_back_within_a_second() {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config("iptables", "")).unwrap();
    assert!(!t.cgnat_neighbours_ping());
    for (what, cmds) in [
        ("flush of every filter chain", vec![vec!["-F"]]),
        (
            "flush and delete of every chain",
            vec![vec!["-F"], vec!["-X"], vec!["-t", "nat", "-F"], vec!["-t", "nat", "-X"]],
        ),
        (
            "delete of the INPUT hook only",
            vec![vec!["-D", "INPUT", "-m", "comment", "--comment", "tailgate:hook", "-j", "tg-input"]],
        ),
    ] {
        for cmd in &cmds {
            iptables(&t.gw, "v4", cmd);
        }
        let start = Instant::now();
        let back = wait::until(Duration::from_secs(3), || {
            let rules = save(&t.gw, "v4", "filter");
            rules.contains("-A INPUT -m comment --comment \"tailgate:hook\" -j tg-input")
                && rules.contains("builtin: CGNAT range")
        });
        assert!(back, "{what}: not repaired\n{}", daemon.log());
        let took = start.elapsed();
        assert!(took < Duration::from_millis(1500), "{what}: repaired after {took:?}");
        println!("{what}: repaired after {took:?}");
        assert!(!t.cgnat_neighbours_ping(), "{what}: policy in force again");
    }
    daemon.wait_for_log("rules changed by another program; restored");
}

#[test]
fn divert_false_leaves_the_hooks_to_the_user_and_keeps_their_jump_across_restarts() {
    let t = Topology::new().unwrap();
    let toml = format!("{}\n[iptables]\ndivert = false\n", config("iptables", ""));
    let mut daemon = Daemon::start(&t.gw, &t.pins, &toml).unwrap();
    let filter = save(&t.gw, "v4", "filter");
    assert!(filter.contains("-N tg-input") && !filter.contains("-j tg-input"), "no hook expected:\n{filter}");
    assert!(t.cgnat_neighbours_ping(), "not wired in yet: no effect");

    // The user wires the chain in, below a rule of their own.
    iptables(&t.gw, "v4", &["-A", "INPUT", "-s", "198.51.100.0/24", "-j", "ACCEPT"]);
    iptables(&t.gw, "v4", &["-A", "INPUT", "-j", "tg-input"]);
    assert!(!t.cgnat_neighbours_ping(), "wired in: dropped");

    let user_rules = || -> Vec<String> {
        iptables(&t.gw, "v4", &["-S", "INPUT"])
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(String::from)
            .collect()
    };
    let wired = vec!["-A INPUT -s 198.51.100.0/24 -j ACCEPT".to_string(), "-A INPUT -j tg-input".to_string()];
    assert_eq!(user_rules(), wired);

    // Stop: the user's jump stays (the chain is emptied, not deleted); restart: in force again.
    assert_eq!(daemon.stop(), Some(0));
    assert_eq!(user_rules(), wired, "stop must not touch the user's jump");
    assert!(t.cgnat_neighbours_ping(), "stopped: the chain is empty");
    daemon = Daemon::start(&t.gw, &t.pins, &toml).unwrap();
    assert_eq!(user_rules(), wired, "restart must not touch the user's jump");
    assert!(!t.cgnat_neighbours_ping(), "restarted: dropped again");
    // Repairs do not add hooks either: make one happen, wait for it, look.
    iptables(&t.gw, "v4", &["-F", "tg-input"]);
    let repaired =
        wait::until(Duration::from_secs(3), || save(&t.gw, "v4", "filter").contains("builtin: CGNAT range"));
    assert!(repaired, "{}", daemon.log());
    assert_eq!(user_rules(), wired);
    drop(daemon);
}

#[test]
fn a_reload_rewrites_only_the_chains_that_changed() {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config("iptables", "")).unwrap();
    // Traffic counted in v4 tg-input (dropped CGNAT neighbour) and v4 tg-forward (LAN host
    // to the tailnet, forwarded into the tunnel).
    assert!(!t.cgnat_neighbours_ping());
    assert!(!t.lan.ping(PEER, Some(LAN)), "nobody answers in the tunnel");
    let input_drops = packets(&t.gw, "v4", "filter", "tg-input", "builtin: CGNAT range");
    let forwarded = packets(&t.gw, "v4", "filter", "tg-forward", "into the tunnel");
    let hook = packets(&t.gw, "v4", "filter", "INPUT", "tailgate:hook");
    assert!(input_drops >= 1 && forwarded >= 1 && hook >= 1);
    let v6_before = save(&t.gw, "v6", "filter");

    // An IPv6 exemption: the IPv6 list goes into a set, only the IPv6 filter chains change.
    std::fs::write(daemon.config_path(), config("iptables", "allow = [\"fd7a:115c:a1e0:ab::/64\"]")).unwrap();
    daemon.signal(Signal::SIGHUP).unwrap();
    daemon.wait_for_log("iptables: wrote [ipv6 filter]");
    let v6 = save(&t.gw, "v6", "filter");
    assert!(v6 != v6_before && v6.contains("-in6 src -j RETURN"), "{v6}");
    assert!(members(&t.gw, "-in6").contains("fd7a:115c:a1e0:ab::/64"));
    assert!(
        packets(&t.gw, "v4", "filter", "tg-input", "builtin: CGNAT range") >= input_drops,
        "v4 tg-input rewritten"
    );
    assert!(
        packets(&t.gw, "v4", "filter", "tg-forward", "into the tunnel") >= forwarded,
        "v4 tg-forward rewritten"
    );
    assert!(packets(&t.gw, "v4", "filter", "INPUT", "tailgate:hook") >= hook, "hook rewritten");

    // An IPv4 exemption rewrites the v4 filter chains (their counters restart) and nothing
    // else: the hook keeps counting.
    let v4 = |allow: &str| config("iptables", &format!("allow = [\"fd7a:115c:a1e0:ab::/64\", {allow}]"));
    std::fs::write(daemon.config_path(), v4("\"100.100.0.0/16\"")).unwrap();
    daemon.signal(Signal::SIGHUP).unwrap();
    daemon.wait_for_log("iptables: wrote [ipv4 filter]");
    assert!(!t.cgnat_neighbours_ping());
    let drops = packets(&t.gw, "v4", "filter", "tg-input", "-in4: drop");
    assert!(drops >= 1, "the set's drop rule counts from zero: {drops}");
    assert!(packets(&t.gw, "v4", "filter", "INPUT", "tailgate:hook") >= hook);

    // Another IPv4 prefix: only the sets' contents change (swapped in); no chain is
    // rewritten, the drop rule keeps counting.
    let readies = daemon.readies();
    std::fs::write(daemon.config_path(), v4("\"100.100.0.0/16\", \"100.101.0.0/16\"")).unwrap();
    daemon.signal(Signal::SIGHUP).unwrap();
    daemon.wait_ready_after(readies).unwrap();
    let log = daemon.log();
    let last = log.lines().rev().find(|l| l.contains("iptables: wrote")).unwrap();
    assert!(last.ends_with("iptables: wrote []"), "{last}");
    assert!(
        log.lines().rev().find(|l| l.contains("ipset: wrote")).unwrap().contains("-in4 (4 prefixes)"),
        "{log}"
    );
    assert!(members(&t.gw, "-in4").contains("100.101.0.0/16"));
    assert!(packets(&t.gw, "v4", "filter", "tg-input", "-in4: drop") >= drops);
}

/// `ipset list` of the set whose name ends with `suffix`.
fn members(ns: &Netns, suffix: &str) -> String {
    let names = String::from_utf8_lossy(&ns.exec("ipset", &["list", "-n"]).unwrap().stdout).into_owned();
    let name =
        names.lines().find(|n| n.ends_with(suffix)).unwrap_or_else(|| panic!("no set *{suffix}: {names}"));
    String::from_utf8_lossy(&ns.exec("ipset", &["list", name]).unwrap().stdout).into_owned()
}

#[test]
fn the_variant_follows_the_rules_already_on_the_host_unless_forced() {
    let t = Topology::new().unwrap();
    let has_rules = |save: &str| {
        let out = t.gw.exec(save, &[]).unwrap();
        String::from_utf8_lossy(&out.stdout).contains("tailgate:")
    };
    // The host already uses iptables-legacy: tailgate writes there.
    let legacy_rule = ["-A", "INPUT", "-s", "192.0.2.99/32", "-j", "ACCEPT"];
    let out = t.gw.exec("iptables-legacy", &legacy_rule).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut daemon = Daemon::start(&t.gw, &t.pins, &config("iptables", "")).unwrap();
    assert!(daemon.log().contains("iptables-legacy"), "{}", daemon.log());
    assert!(has_rules("iptables-legacy-save") && !has_rules("iptables-nft-save"));
    assert!(!t.cgnat_neighbours_ping());
    daemon.stop();
    assert!(!has_rules("iptables-legacy-save"), "legacy rules left behind");

    // Forced: nft, whatever the host has.
    let toml = format!("{}\n[iptables]\nvariant = \"nft\"\n", config("iptables", ""));
    let daemon = Daemon::start(&t.gw, &t.pins, &toml).unwrap();
    assert!(has_rules("iptables-nft-save") && !has_rules("iptables-legacy-save"));
    assert!(!t.cgnat_neighbours_ping());
    drop(daemon);
}

#[test]
fn an_accept_above_the_hook_is_reported_and_hook_position_first_undoes_it() {
    let t = Topology::new().unwrap();
    let warnings = |t: &Topology| -> Vec<String> {
        let s = tailgate_tests::daemon::status(&t.gw, &t.pins);
        s["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect()
    };
    let mut daemon = Daemon::start(&t.gw, &t.pins, &config("iptables", "")).unwrap();
    assert!(warnings(&t).is_empty());
    // Another tool puts an ACCEPT on top of INPUT: tailgate is bypassed.
    iptables(&t.gw, "v4", &["-I", "INPUT", "1", "-j", "ACCEPT"]);
    assert!(t.cgnat_neighbours_ping(), "the ACCEPT above the hook bypasses tailgate");
    let expected = "ipv4 filter INPUT rule 1 (-j ACCEPT) comes before tailgate's hook and can accept what tailgate drops";
    assert_eq!(warnings(&t), [expected]);
    // The daemon says so in its log (from a repair pass), and by default does not push the
    // other rule down.
    daemon.wait_for_log("comes before tailgate's hook");
    assert!(save(&t.gw, "v4", "filter")
        .contains("-A INPUT -j ACCEPT\n-A INPUT -m comment --comment \"tailgate:hook\""));
    daemon.stop();

    // hook_position = "first": the hook goes back on top, and stays there.
    let first = format!("{}\n[iptables]\nhook_position = \"first\"\n", config("iptables", ""));
    let _daemon = Daemon::start(&t.gw, &t.pins, &first).unwrap();
    assert!(!t.cgnat_neighbours_ping(), "the hook is first again\n{}", save(&t.gw, "v4", "filter"));
    assert!(warnings(&t).is_empty(), "{:?}", warnings(&t));
    iptables(&t.gw, "v4", &["-I", "INPUT", "1", "-j", "ACCEPT"]);
    let first_rule = || {
        let rules = save(&t.gw, "v4", "filter");
        rules.lines().find(|l| l.starts_with("-A INPUT ")).unwrap_or_default().to_string()
    };
    let back = wait::until(Duration::from_secs(2), || first_rule().contains("tailgate:hook"));
    assert!(back, "{}", save(&t.gw, "v4", "filter"));
    assert!(!t.cgnat_neighbours_ping(), "{}", counters(&t.gw, "v4", "filter"));
}
