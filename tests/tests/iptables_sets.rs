//! The iptables backend's prefix lists in kernel sets (ipset hash:net with `nomatch`
//! exceptions): the kernel answers as `policy::resolve` (longest prefix wins) and as the
//! model `explain` evaluates with; at 10,000 prefixes the policy holds end to end on both
//! backends; a set or set rule that another program flushes or deletes is back within a
//! second.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use proptest::prelude::*;
use tailgate::{
    backend::iptables::{
        exec::Available,
        render::{render, Wiring},
        sets,
        table::Family,
    },
    config::Config,
    policy::{self, Verdict},
};
use tailgate_tests::{
    daemon::{status, Daemon},
    netns::Netns,
    on_both_backends,
    topology::*,
    wait,
};

/// Exemptions in 100.120.0.0/16 that nothing sends from: they make the list 10,000 long.
fn filler(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("\"100.120.{}.{}/32\"", i / 250, i % 250 + 1)).collect()
}

const FILLER: usize = 10_000;

fn ipset(ns: &Netns, args: &[&str]) -> std::process::Output {
    ns.exec("ipset", args).unwrap()
}

/// `ipset restore` of `payload` in `ns`; whether it succeeded.
fn ipset_restore(ns: &Netns, payload: &str) -> bool {
    let restored = ns.enter(|| {
        use std::io::Write;
        let mut child =
            std::process::Command::new("ipset").arg("restore").stdin(std::process::Stdio::piped()).spawn()?;
        child.stdin.take().unwrap().write_all(payload.as_bytes())?;
        Ok(child.wait()?.success())
    });
    restored.unwrap()
}

/// A random prefix of `range` at least as long as the range.
fn prefix_in(range: IpNet) -> impl Strategy<Value = IpNet> {
    let max = range.max_prefix_len();
    (range.prefix_len()..=max, any::<u128>()).prop_map(move |(len, bits)| match range {
        IpNet::V4(r) => {
            let host = (bits as u32) & !u32::from(r.netmask());
            let addr = std::net::Ipv4Addr::from(u32::from(r.network()) | host);
            IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc())
        }
        IpNet::V6(r) => {
            let host = bits & !u128::from(r.netmask());
            let addr = std::net::Ipv6Addr::from(u128::from(r.network()) | host);
            IpNet::V6(ipnet::Ipv6Net::new(addr, len).unwrap().trunc())
        }
    })
}

/// Addresses that tell prefixes apart: each prefix's first, last and one inside, and their
/// neighbours just outside; plus addresses around and outside the ranges.
fn probes(prefixes: &[IpNet], salt: u128) -> Vec<IpAddr> {
    let mut out: BTreeSet<IpAddr> =
        ["100.63.255.255", "100.64.0.0", "100.127.255.255", "100.128.0.0", "8.8.8.8"]
            .iter()
            .chain(&["fd7a:115c:a1e0::", "fd7a:115c:a1df:ffff::1", "2001:db8::1"])
            .map(|a| a.parse().unwrap())
            .collect();
    for p in prefixes {
        let (first, last) = match p {
            IpNet::V4(n) => (u128::from(u32::from(n.network())), u128::from(u32::from(n.broadcast()))),
            IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast())),
        };
        let inside = first + salt % (last - first + 1);
        for value in [first, last, inside, first.wrapping_sub(1), last.wrapping_add(1)] {
            out.insert(match p {
                IpNet::V4(_) => IpAddr::V4((value as u32).into()),
                IpNet::V6(_) => IpAddr::V6(value.into()),
            });
        }
    }
    out.into_iter().collect()
}

/// A configuration's allow and drop lists (no prefix in both, as the config requires; a
/// prefix may repeat within one, and does now and then).
fn lists() -> impl Strategy<Value = (Vec<IpNet>, Vec<IpNet>)> {
    let v4 = prefix_in("100.64.0.0/10".parse().unwrap());
    let v6 = prefix_in("fd7a:115c:a1e0::/48".parse().unwrap());
    let prefix = prop_oneof![3 => v4, 1 => v6];
    (prop::collection::vec((prefix, any::<bool>(), 0..8u8), 1..24)).prop_map(|list| {
        let (mut allow, mut drop): (Vec<IpNet>, Vec<IpNet>) = (Vec::new(), Vec::new());
        for (p, allowed, repeat) in list {
            let (list, other) = if allowed { (&mut allow, &drop) } else { (&mut drop, &allow) };
            if !other.contains(&p) {
                list.push(p);
                if repeat == 0 {
                    list.push(p);
                }
            }
        }
        (allow, drop)
    })
}

#[test]
fn hash_net_sets_answer_as_the_longest_prefix_and_as_the_model() {
    let ns = Netns::new("tg-sets").unwrap();
    let cases = std::cell::Cell::new(0);
    let answers = std::cell::Cell::new([0usize; 2]);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 40,
        failure_persistence: None,
        ..Default::default()
    });
    let outcome = runner.run(&(lists(), any::<u128>()), |((allow, drop), salt)| {
        let quote = |l: &[IpNet]| l.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", ");
        let toml = format!("[cgnat]\nallow = [{}]\ndrop = [{}]", quote(&allow), quote(&drop));
        let config = Config::parse(&toml, &Default::default()).unwrap();
        let state = policy::compile(&config, policy::System::default());
        let rendered = render(&state, Wiring::standard(), &Available::all());
        for set in &rendered.sets {
            let payload = set.payload();
            prop_assert!(ipset_restore(&ns, &payload), "ipset restore of\n{payload}");
            let list = if set.name.contains("-in") { &state.cgnat.inbound } else { &state.cgnat.forward };
            let prefixes: Vec<IpNet> = set.entries.iter().map(|e| e.prefix).collect();
            for addr in probes(&prefixes, salt) {
                if addr.is_ipv4() != (set.family == Family::V4) {
                    continue;
                }
                let kernel = ipset(&ns, &["test", &set.name, &addr.to_string()]).status.success();
                let resolved = policy::resolve(list, addr).map(|r| r.verdict);
                let model = sets::lookup(set, addr).is_some_and(|e| !e.nomatch);
                prop_assert_eq!(
                    kernel,
                    resolved == Some(Verdict::Pass),
                    "{} {}: kernel vs resolve ({:?})\n{}",
                    set.name,
                    addr,
                    resolved,
                    toml
                );
                prop_assert_eq!(kernel, model, "{} {}: kernel vs model\n{}", set.name, addr, toml);
                let mut counted = answers.get();
                counted[usize::from(kernel)] += 1;
                answers.set(counted);
            }
            prop_assert!(ipset(&ns, &["destroy", &set.name]).status.success());
        }
        cases.set(cases.get() + 1);
        Ok(())
    });
    outcome.unwrap();
    let (cases, answers) = (cases.get(), answers.get());
    println!("{cases} policies; set lookups answering no match / match: {answers:?}");
    assert!(answers[0] > 500 && answers[1] > 500, "both answers well represented: {answers:?}");
}

on_both_backends!(ten_thousand_prefixes_pass_and_drop_by_the_longest_prefix);

/// The LAN neighbour's CGNAT address is dropped inside an allowed /24, its second address
/// passes; 10,000 other exemptions around them.
fn ten_thousand_prefixes_pass_and_drop_by_the_longest_prefix(backend: &str) {
    let t = Topology::new().unwrap();
    const SECOND: &str = "100.64.0.3";
    t.lan.ip(&["addr", "add", &format!("{SECOND}/24"), "dev", "eth0"]).unwrap();
    let mut allow = filler(FILLER);
    allow.push("\"100.64.0.0/24\"".into());
    let cgnat = format!("allow = [{}]\ndrop = [\"{LAN_CGNAT}/32\"]", allow.join(", "));
    let started = Instant::now();
    let daemon = Daemon::start(&t.gw, &t.pins, &config(backend, &cgnat)).unwrap();
    println!("{backend}: started with {} prefixes in {:?}", FILLER + 2, started.elapsed());
    assert!(!t.cgnat_neighbours_ping(), "the /32 drop inside the allowed /24");
    assert!(t.lan.ping(GW_LAN_CGNAT, Some(SECOND)), "the rest of the /24 passes");
    assert!(!t.lan.ping(GW_LAN_CGNAT, Some(LAN_SPOOF)), "the CGNAT range drops the rest");
    assert!(t.lan.ping(GW_LAN, Some(LAN)), "non-CGNAT traffic passes");
    // Status names the prefix that decided, with its packets, on both backends.
    let s = status(&t.gw, &t.pins);
    let rules = s["rules"].as_array().unwrap();
    let rule = |prefix: &str| {
        rules
            .iter()
            .find(|r| r["direction"] == "inbound" && r["prefix"] == prefix)
            .unwrap_or_else(|| panic!("no inbound rule {prefix}"))
    };
    assert_eq!(rule(&format!("{LAN_CGNAT}/32"))["verdict"], "drop");
    assert!(rule(&format!("{LAN_CGNAT}/32"))["packets"].as_u64().unwrap() >= 1);
    assert!(rule("100.64.0.0/24")["packets"].as_u64().unwrap() >= 1);
    assert!(rule("100.64.0.0/10")["packets"].as_u64().unwrap() >= 1);
    assert!(rules.len() > FILLER, "every prefix listed: {}", rules.len());
    // The seconds of pings above ran several repairs, with the sets' counters moving: none
    // took its own sets for changed.
    assert!(!daemon.log().contains("restored"), "{}", daemon.log());
}

/// The name of this gateway's set whose name ends with `suffix`.
fn set_named(ns: &Netns, suffix: &str) -> String {
    let names = String::from_utf8_lossy(&ipset(ns, &["list", "-n"]).stdout).into_owned();
    names
        .lines()
        .find(|n| n.ends_with(suffix))
        .unwrap_or_else(|| panic!("no set *{suffix} in {names}"))
        .into()
}

fn entries(ns: &Netns, set: &str) -> Option<usize> {
    let out = ipset(ns, &["list", "-t", set]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("Number of entries: ")).and_then(|n| n.trim().parse().ok())
}

#[test]
fn a_set_or_set_rule_changed_by_another_program_is_back_within_a_second() {
    let t = Topology::new().unwrap();
    let mut allow = filler(FILLER);
    allow.push(format!("\"{LAN_CGNAT}/32\""));
    let daemon =
        Daemon::start(&t.gw, &t.pins, &config("iptables", &format!("allow = [{}]", allow.join(", "))))
            .unwrap();
    let set = set_named(&t.gw, "-in4");
    let full = entries(&t.gw, &set).unwrap();
    assert_eq!(full, FILLER + 3, "fillers, the neighbour, the CGNAT range, the ChromeOS range");
    assert!(t.cgnat_neighbours_ping());
    let iptables = |args: &[&str]| {
        let out = t.gw.exec("iptables", args).unwrap();
        assert!(out.status.success(), "iptables {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let set_rule = format!("-m set --match-set {set} src");
    let rules =
        || String::from_utf8_lossy(&t.gw.exec("iptables", &["-S", "tg-input"]).unwrap().stdout).into_owned();
    type Change<'a> = Box<dyn Fn() + 'a>;
    let changes: Vec<(&str, Change)> = vec![
        ("set flushed", Box::new(|| assert!(ipset(&t.gw, &["flush", &set]).status.success()))),
        (
            "one entry deleted",
            Box::new(|| assert!(ipset(&t.gw, &["del", &set, &format!("{LAN_CGNAT}/32")]).status.success())),
        ),
        (
            "the set's rule deleted",
            Box::new(|| {
                let line = rules().lines().find(|l| l.contains(&set_rule)).unwrap().replacen("-A ", "-D ", 1);
                let args: Vec<String> = shell_words(&line);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                iptables(&args);
            }),
        ),
        (
            "chain flushed and set destroyed",
            Box::new(|| {
                iptables(&["-F", "tg-input"]);
                assert!(ipset(&t.gw, &["destroy", &set]).status.success());
            }),
        ),
        (
            "another set of as many entries swapped in (the neighbour's exemption a drop)",
            Box::new(|| {
                let saved =
                    String::from_utf8_lossy(&ipset(&t.gw, &["save", &set]).stdout).replace(&set, "tg-other");
                // A set of its own (`ipset save` would carry over the hash's seed too).
                let saved: String = saved
                    .lines()
                    .map(|l| match l.find(" initval ") {
                        Some(at) if l.starts_with("create ") => format!("{}\n", &l[..at]),
                        _ => format!("{l}\n"),
                    })
                    .collect();
                let flipped = saved.replace(
                    &format!("add tg-other {LAN_CGNAT} "),
                    &format!("add tg-other {LAN_CGNAT} nomatch "),
                );
                assert_ne!(flipped, saved);
                let payload = format!("{flipped}swap tg-other {set}\ndestroy tg-other\n");
                assert!(ipset_restore(&t.gw, &payload));
            }),
        ),
    ];
    for (what, change) in changes {
        let start = Instant::now();
        change();
        let back = wait::until(Duration::from_secs(3), || {
            entries(&t.gw, &set) == Some(full)
                && rules().contains(&set_rule)
                && ipset(&t.gw, &["test", &set, LAN_CGNAT]).status.success()
        });
        let took = start.elapsed();
        assert!(back, "{what}: not repaired\n{}", daemon.log());
        println!("{what}: repaired after {took:?}");
        assert!(took < Duration::from_secs(1), "{what}: repaired after {took:?}");
        assert!(t.cgnat_neighbours_ping(), "{what}: the exemption is in force again");
        assert!(!t.lan.ping(GW_LAN_CGNAT, Some(LAN_SPOOF)), "{what}: the range drops again");
    }
    daemon.wait_for_log("restored");
}

/// `-D tg-input -m comment --comment "a b" ...` split as a shell would.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => words.extend((!word.is_empty()).then(|| std::mem::take(&mut word))),
            c => word.push(c),
        }
    }
    words.extend((!word.is_empty()).then_some(word));
    words
}

/// With iptables-legacy (no ruleset generation: the tables are read every interval) the
/// sets work the same, and a flushed set is back.
#[test]
fn sets_with_iptables_legacy_filter_and_repair_the_same() {
    let t = Topology::new().unwrap();
    const SECOND: &str = "100.64.0.3";
    t.lan.ip(&["addr", "add", &format!("{SECOND}/24"), "dev", "eth0"]).unwrap();
    let cgnat =
        format!("allow = [\"100.64.0.0/24\"]\ndrop = [\"{LAN_CGNAT}/32\"]\n[iptables]\nvariant = \"legacy\"");
    let daemon = Daemon::start(&t.gw, &t.pins, &config("iptables", &cgnat)).unwrap();
    let legacy = t.gw.exec("iptables-legacy-save", &["-t", "filter"]).unwrap();
    assert!(String::from_utf8_lossy(&legacy.stdout).contains("--match-set"), "rules in iptables-legacy");
    assert!(!t.cgnat_neighbours_ping(), "the /32 drop inside the allowed /24");
    assert!(t.lan.ping(GW_LAN_CGNAT, Some(SECOND)), "the rest of the /24 passes");
    let set = set_named(&t.gw, "-in4");
    let full = entries(&t.gw, &set).unwrap();
    let start = Instant::now();
    assert!(ipset(&t.gw, &["flush", &set]).status.success());
    assert!(wait::until(Duration::from_secs(3), || entries(&t.gw, &set) == Some(full)), "{}", daemon.log());
    println!("legacy: flushed set repaired after {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(!t.cgnat_neighbours_ping() && t.lan.ping(GW_LAN_CGNAT, Some(SECOND)));
    drop(daemon);
    assert_eq!(t.ipsets(), Vec::<String>::new(), "sets left after stop");
}
