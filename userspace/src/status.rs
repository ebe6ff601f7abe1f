//! `tailgate status`: reads the state in force directly (pinned maps, or iptables-save),
//! no daemon needed.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use ipnet::IpNet;
use serde::Serialize;
use tailgate_abi::{
    cgnat::{PrefixRule, LEGACY_MAPS, MAP_FWD_V4, MAP_FWD_V6, MAP_IN_V4, MAP_IN_V6},
    counters::Counter,
    generation::MAP_ACTIVE,
    verdict, MAP_COUNTERS, MAP_RULE_HITS, MAX_RULES,
};

use crate::{
    backend::{
        bpf::{cgnat, conntrack, services, Pins},
        iptables::{
            self,
            exec::{detect_variant, Iptables, Variant},
            family_name,
            table::{SavedTable, CHAIN_PREFIX},
        },
    },
    lock::{self, Lock},
    runstate,
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub backend: String,
    /// Why this backend is in use (configured, or why BPF could not be used).
    pub reason: Option<String>,
    pub pin_dir: String,
    /// The PID of the daemon enforcing this, `None` when none runs (a kept datapath, or
    /// what a killed daemon left).
    pub daemon: Option<i32>,
    /// The daemon has not finished starting (not ready yet).
    pub starting: bool,
    /// What the daemon waits for (absent devices).
    pub pending: Vec<String>,
    /// Problems tailgate cannot fix itself, e.g. rules of others that bypass it.
    pub warnings: Vec<String>,
    /// Live attachments only: a link whose device is gone is not listed.
    pub attachments: Vec<Attachment>,
    /// Packets per verdict reason, summed over CPUs (iptables: over rules).
    pub counters: BTreeMap<String, u64>,
    pub rules: Vec<RuleStatus>,
    /// The flow tables (BPF; the iptables backend uses the kernel's conntrack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowsStatus>,
    /// Services and their backends' shares of the table (BPF).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<services::ServiceStatus>,
}

/// How full the flow tables are.
#[derive(Debug, Serialize)]
pub struct FlowsStatus {
    #[serde(flatten)]
    pub occupancy: conntrack::Occupancy,
    /// Flows the LRU evicted to make room (created, less expired, less live): non-zero
    /// means the table was full and replies of the evicted flows were judged as unsolicited.
    pub evicted: u64,
}

/// Where the datapath is hooked: `xdp` on `eth0`, or `ipv4 filter INPUT` to `tg-input`.
#[derive(Debug, Serialize)]
pub struct Attachment {
    pub hook: String,
    pub target: String,
    /// The device's ifindex (BPF).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct RuleStatus {
    /// "inbound" (entering an uplink) or "forward" (forwarded into the tunnel).
    pub direction: &'static str,
    pub prefix: String,
    pub verdict: &'static str,
    /// BPF rule id (index of its counter).
    pub rule_id: Option<u32>,
    pub packets: Option<u64>,
}

/// The state in force for the instance of `pins`; `None` when nothing is.
pub fn read(pins: &Pins) -> Result<Option<Status>> {
    let instance = lock::instance_path(pins);
    let daemon = Lock::holder(&instance)?;
    // The run state is written once a start stands: a daemon without one (or with one of an
    // earlier run) is still starting, and what is pinned may be half there.
    let run = runstate::read(pins);
    let starting = daemon.is_some() && run.as_ref().map(|r| r.lock) != Lock::current_id(&instance);
    let in_force = read_in_force(pins, run.as_ref());
    let mut status = match (in_force, starting) {
        (Ok(Some(status)), _) => status,
        (Err(_) | Ok(None), true) => empty("starting".into()),
        (Err(e), false) => return Err(e),
        (Ok(None), false) => match daemon {
            // A daemon holds the pin dir but nothing of it is in force (`cleanup --force`).
            Some(pid) => {
                let backend = run.as_ref().map_or("unknown".to_string(), |r| r.backend.clone());
                let mut status = empty(backend);
                status.warnings.push(format!(
                    "the daemon (PID {pid}) runs but nothing of its datapath is in force (removed by \
                     `cleanup --force`?): restart it"
                ));
                status
            }
            None => return Ok(None),
        },
    };
    status.starting = starting;
    status.pin_dir = pins.root().display().to_string();
    status.daemon = daemon;
    if let Some(run) = run {
        status.reason = Some(run.reason);
        // What the daemon waits for is only current while it runs.
        if daemon.is_some() {
            status.pending = run.pending;
        }
    }
    Ok(Some(status))
}

/// The state in force as the daemon itself sees it (for its metrics): no look at the
/// locks, which it holds (a POSIX lock goes when its holder closes any descriptor of the
/// file, so the daemon must never open its own lock files).
pub fn read_by_daemon(pins: &Pins) -> Result<Option<Status>> {
    let run = runstate::read(pins);
    let Some(mut status) = read_in_force(pins, run.as_ref())? else { return Ok(None) };
    status.pin_dir = pins.root().display().to_string();
    status.daemon = Some(std::process::id() as i32);
    if let Some(run) = run {
        status.reason = Some(run.reason);
        status.pending = run.pending;
    }
    Ok(Some(status))
}

/// What is in force: the pinned BPF datapath, or tailgate's iptables chains.
fn read_in_force(pins: &Pins, run: Option<&runstate::RunState>) -> Result<Option<Status>> {
    let backend = run.map(|r| r.backend.as_str());
    if backend != Some("iptables") && pins.exists() {
        return read_bpf(pins).map(Some);
    }
    read_iptables(run.and_then(|r| r.tunnel.as_deref()), run.and_then(|r| r.variant))
}

fn read_bpf(pins: &Pins) -> Result<Status> {
    let attachments = pins
        .pinned_links()?
        .into_iter()
        .filter(|link| link.live)
        .map(|link| Attachment {
            hook: link.name.hook.pin_prefix().into(),
            target: link.name.ifname,
            ifindex: Some(link.name.ifindex),
        })
        .collect();
    // A datapath kept by a version before policy generations has no GENERATION map and
    // untagged keys.
    let generation = match pins.map(MAP_ACTIVE).exists() {
        true => Some(Array::<MapData, u32>::try_from(open(pins, MAP_ACTIVE)?)?.get(&0, 0)? & 1),
        false => None,
    };
    let counters_map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(pins, MAP_COUNTERS)?)?;
    let counters = Counter::ALL
        .iter()
        .map(|c| Ok((c.name().to_string(), sum(&counters_map, *c as u32)?)))
        .collect::<Result<_>>()?;
    let hits: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(pins, MAP_RULE_HITS)?)?;
    let mut rules = Vec::new();
    let tries = [
        ("inbound", [MAP_IN_V4, MAP_IN_V6], [LEGACY_MAPS[0], LEGACY_MAPS[1]]),
        ("forward", [MAP_FWD_V4, MAP_FWD_V6], [LEGACY_MAPS[2], LEGACY_MAPS[3]]),
    ];
    for (direction, names, legacy) in tries {
        let mut found: Vec<(IpNet, PrefixRule)> = Vec::new();
        for (v6, (name, legacy)) in [false, true].into_iter().zip(names.into_iter().zip(legacy)) {
            found.extend(match generation {
                Some(generation) => cgnat::rules(&open(pins, name)?, v6, generation)?,
                None => cgnat::legacy_rules(&open(pins, legacy)?, v6)?,
            });
        }
        found.sort_by_key(|(net, _)| (net.addr().is_ipv6(), std::cmp::Reverse(net.prefix_len()), net.addr()));
        for (net, rule) in found {
            let counted = rule.rule_id < MAX_RULES;
            rules.push(RuleStatus {
                direction,
                prefix: net.to_string(),
                verdict: if rule.verdict == verdict::DROP { "drop" } else { "pass" },
                rule_id: Some(rule.rule_id),
                packets: if counted { Some(sum(&hits, rule.rule_id)?) } else { None },
            });
        }
    }
    let flows = read_flows(pins, &counters)?;
    let services = read_services(pins, generation.unwrap_or(0))?;
    Ok(Status { attachments, counters, rules, flows, services, ..empty("bpf".into()) })
}

/// The flow tables' occupancy; `None` for pins of a version without them.
fn read_flows(pins: &Pins, counters: &BTreeMap<String, u64>) -> Result<Option<FlowsStatus>> {
    let Some((v4, v6)) = flow_maps(pins)? else { return Ok(None) };
    let occupancy = conntrack::occupancy(&v4, &v6)?;
    let counter = |c: Counter| counters.get(c.name()).copied().unwrap_or(0);
    let live = occupancy.entries_v4 + occupancy.entries_v6;
    // Every entry created is live, was deleted as expired, or was evicted.
    let evicted = counter(Counter::FlowCreated).saturating_sub(counter(Counter::FlowExpired) + live);
    Ok(Some(FlowsStatus { occupancy, evicted }))
}

/// The services the datapath balances; none for pins of a version without them.
fn read_services(pins: &Pins, generation: u32) -> Result<Vec<services::ServiceStatus>> {
    use tailgate_abi::services::{MAP_BACKENDS, MAP_SERVICES, MAP_TABLES};
    let names = [MAP_SERVICES, MAP_TABLES, MAP_BACKENDS];
    if names.iter().any(|name| !pins.map(name).exists()) {
        return Ok(Vec::new());
    }
    let [services, tables, backends] = names.map(|name| open(pins, name));
    services::read(&services?, &tables?, &backends?, generation)
}

/// Every entry of the pinned flow tables.
pub fn flows(pins: &Pins) -> Result<Vec<conntrack::FlowEntry>> {
    let Some((v4, v6)) = flow_maps(pins)? else {
        anyhow::bail!(
            "no flow tables pinned under {} (the iptables backend tracks flows in the kernel's \
             conntrack: `conntrack -L`)",
            pins.root().display()
        );
    };
    conntrack::entries(&v4, &v6, conntrack::monotonic_now())
}

/// The pinned flow tables (IPv4, IPv6), when both are there.
fn flow_maps(pins: &Pins) -> Result<Option<(Map, Map)>> {
    use tailgate_abi::conntrack::{MAP_V4, MAP_V6};
    if !pins.map(MAP_V4).exists() || !pins.map(MAP_V6).exists() {
        return Ok(None);
    }
    Ok(Some((open(pins, MAP_V4)?, open(pins, MAP_V6)?)))
}

fn empty(backend: String) -> Status {
    Status {
        backend,
        reason: None,
        pin_dir: String::new(),
        daemon: None,
        starting: false,
        pending: Vec::new(),
        warnings: Vec::new(),
        attachments: Vec::new(),
        counters: BTreeMap::new(),
        rules: Vec::new(),
        flows: None,
        services: Vec::new(),
    }
}

/// The tailgate chains in iptables, if any (in the variant that holds rules). With the
/// tunnel's name, rules of others that bypass them are reported.
fn read_iptables(tunnel: Option<&str>, variant: Option<Variant>) -> Result<Option<Status>> {
    let Ok(ip) = Iptables::probe_quiet(variant.unwrap_or_else(detect_variant)) else { return Ok(None) };
    let warnings = match tunnel {
        Some(tunnel) => iptables::bypasses(&ip, tunnel)?
            .into_iter()
            .map(|rule| format!("{rule} comes before tailgate's hook and can accept what tailgate drops"))
            .collect(),
        None => Vec::new(),
    };
    let mut status = Status {
        warnings,
        counters: ["uplink_drop", "uplink_pass_rule", "tunnel_drop", "tunnel_pass_forward"]
            .into_iter()
            .map(|name| (name.to_string(), 0))
            .collect(),
        ..empty(format!("iptables ({})", ip.variant.name()))
    };
    let mut found = false;
    let ipset = iptables::sets::Ipset::installed().ok();
    for (family, table) in ip.tables() {
        let saved = SavedTable::parse(&ip.save(family, table, true)?, table.name());
        found |= saved.chains.keys().any(|c| c.starts_with(CHAIN_PREFIX));
        add_hooks(&mut status, &saved, &format!("{} {table}", family_name(family)));
        add_rules(&mut status, &saved, ipset.as_ref());
    }
    Ok(found.then_some(status))
}

/// Jumps from built-in chains to tailgate's chains (ours or the user's).
fn add_hooks(status: &mut Status, saved: &SavedTable, table: &str) {
    let ours: Vec<&String> = saved.chains.keys().filter(|c| c.starts_with(CHAIN_PREFIX)).collect();
    for (chain, rules) in saved.chains.iter().filter(|(c, _)| !c.starts_with(CHAIN_PREFIX)) {
        for rule in rules {
            if let Some(target) = ours.iter().find(|t| rule.targets(t)) {
                status.attachments.push(Attachment {
                    hook: format!("{table} {chain}"),
                    target: target.to_string(),
                    ifindex: None,
                });
            }
        }
    }
}

/// Every rule of tailgate's chains counts into the counter its comment names; prefix rules
/// (their label starts with the prefix) are listed too, and the entries of a set a pass
/// rule matches against (with the packets each decided).
fn add_rules(status: &mut Status, saved: &SavedTable, ipset: Option<&iptables::sets::Ipset>) {
    let rules = saved.chains.iter().filter(|(c, _)| c.starts_with(CHAIN_PREFIX)).flat_map(|(_, r)| r);
    for rule in rules {
        let Some((counter, label)) = rule.counter_and_label() else { continue };
        if counter == "-" {
            continue;
        }
        *status.counters.entry(counter.to_string()).or_default() += rule.packets;
        let (direction, verdict) = match counter {
            c if c == Counter::UplinkDrop.name() => ("inbound", "drop"),
            c if c == Counter::UplinkPassRule.name() => ("inbound", "pass"),
            c if c == Counter::TunnelDrop.name() => ("forward", "drop"),
            c if c == Counter::TunnelPassForward.name() => ("forward", "pass"),
            _ => continue,
        };
        if let Some(set) = iptables::cgnat::labelled_set(label) {
            if verdict != "pass" {
                continue;
            }
            let listed = match ipset {
                Some(ipset) => ipset.members(set),
                None => Err(anyhow::anyhow!("ipset unavailable here")),
            };
            if let Err(e) = &listed {
                status.warnings.push(format!("set {set} (the {direction} prefixes) not listed: {e:#}"));
            }
            if let Ok(mut members) = listed {
                members.sort_by_key(|m| (std::cmp::Reverse(m.prefix.prefix_len()), m.prefix.addr()));
                status.rules.extend(members.into_iter().map(|m| RuleStatus {
                    direction,
                    prefix: m.prefix.to_string(),
                    verdict: if m.nomatch { "drop" } else { "pass" },
                    rule_id: None,
                    packets: Some(m.packets),
                }));
            }
            continue;
        }
        status.rules.push(RuleStatus {
            direction,
            prefix: label.split_whitespace().next().unwrap_or_default().to_string(),
            verdict,
            rule_id: None,
            packets: Some(rule.packets),
        });
    }
}

fn open(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

fn sum(map: &PerCpuArray<MapData, u64>, index: u32) -> Result<u64> {
    Ok(map.get(&index, 0)?.iter().sum())
}

pub fn render_text(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "backend: {}", s.backend);
    if let Some(reason) = &s.reason {
        let _ = writeln!(out, "reason:  {reason}");
    }
    let _ = writeln!(out, "pins:    {}", s.pin_dir);
    let _ = match s.daemon {
        Some(pid) if s.starting => writeln!(out, "daemon:  starting (PID {pid})"),
        Some(pid) => writeln!(out, "daemon:  running (PID {pid})"),
        None => writeln!(out, "daemon:  none (datapath kept, no daemon)"),
    };
    for what in &s.pending {
        let _ = writeln!(out, "waiting: {what}");
    }
    for warning in &s.warnings {
        let _ = writeln!(out, "WARNING: {warning}");
    }
    let _ = writeln!(out, "attached:");
    if s.attachments.is_empty() {
        let _ = writeln!(out, "  nothing");
    }
    for a in &s.attachments {
        let index = a.ifindex.map_or(String::new(), |i| format!(" (ifindex {i})"));
        let _ = writeln!(out, "  {:<22} {}{index}", a.hook, a.target);
    }
    let _ = writeln!(out, "counters (packets):");
    for (name, value) in &s.counters {
        let _ = writeln!(out, "  {name:<26} {value}");
    }
    if let Some(f) = &s.flows {
        let o = &f.occupancy;
        let _ = writeln!(out, "flows:");
        let _ = writeln!(
            out,
            "  ipv4 {:>10} of {:<10} ipv6 {:>10} of {}",
            o.entries_v4, o.capacity_v4, o.entries_v6, o.capacity_v6
        );
        if f.evicted > 0 {
            let _ = writeln!(
                out,
                "  evicted {} (the table was full: raise [flows] max_entries_v4/_v6)",
                f.evicted
            );
        }
    }
    if !s.services.is_empty() {
        let _ = writeln!(out, "services (backends by share of the table's slots):");
    }
    for svc in &s.services {
        let scope = if svc.uplinks_only { ", from the uplinks" } else { "" };
        let _ = writeln!(out, "  {}/{} ({} slots{scope})", svc.listen, svc.protocol, svc.table_size);
        for b in &svc.backends {
            let share = f64::from(b.slots) * 100.0 / f64::from(svc.table_size.max(1));
            let _ = writeln!(out, "    {:<46} {:>7} slots {share:>5.1} %", b.address, b.slots);
        }
    }
    let _ = writeln!(out, "rules (longest prefix wins):");
    if s.rules.is_empty() {
        let _ = writeln!(out, "  none (cgnat filtering off)");
    }
    for r in &s.rules {
        let packets = r.packets.map_or("-".to_string(), |p| p.to_string());
        let id = r.rule_id.map_or(String::new(), |id| format!("id {id:<6} "));
        let _ = writeln!(out, "  {:<8} {:<5} {:<28} {id}packets {packets}", r.direction, r.verdict, r.prefix);
    }
    out
}

/// `tailgate flows` as text: one line per entry.
pub fn render_flows(flows: &[conntrack::FlowEntry]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<8} {:<7} {:<46} {:<46} {:<12} {:>9} {:>11}  translated to",
        "zone", "ifindex", "proto", "original source", "original destination", "state", "idle s", "expires s"
    );
    for f in flows {
        let src = std::net::SocketAddr::new(f.src, f.sport).to_string();
        let dst = std::net::SocketAddr::new(f.dst, f.dport).to_string();
        let _ = writeln!(
            out,
            "{:<10} {:<8} {:<7} {:<46} {:<46} {:<12} {:>9.1} {:>11.1}  {}",
            f.zone,
            f.ifindex,
            conntrack::proto_name(f.proto),
            src,
            dst,
            f.state,
            f.idle_s,
            f.expires_in_s,
            f.nat.map_or(String::new(), |n| n.to_string())
        );
    }
    out
}
