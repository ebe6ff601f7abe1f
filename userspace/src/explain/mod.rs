//! `tailgate explain`: what the datapath in force would do with a packet described on the
//! command line. BPF: the pinned programs' code run on the packet by BPF_PROG_TEST_RUN
//! against the live policy maps, with copies of the flow tables and counters (see `bpf`);
//! iptables: the desired state's rules evaluated in netfilter's order (see `iptables`).
//! Between a device's ingress and another's egress the kernel's own routing decides.

pub mod bpf;
pub mod iptables;
pub mod packet;

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use serde::Serialize;

use self::packet::{Described, Seen};
use crate::{
    backend::bpf::{conntrack::FlowEntry, Pins},
    config::Config,
    daemon, netdev,
    policy::DesiredState,
    runstate,
};

/// The packet and where it is.
#[derive(Debug, Clone)]
pub struct Query {
    pub packet: Described,
    /// The device it arrives on; `None`: sent by this host.
    pub input: Option<String>,
    /// The device it leaves by; `None`: as the kernel routes it.
    pub output: Option<String>,
    /// The config to name rules by (and, for iptables, to evaluate); `None`: the running
    /// daemon's (path and `TAILGATE_*` variables from its run state).
    pub config: Option<PathBuf>,
}

/// What happened to the packet, hook by hook, and in the end.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub backend: String,
    pub packet: Described,
    #[serde(rename = "in")]
    pub input: Option<String>,
    #[serde(rename = "out")]
    pub output: Option<String>,
    pub steps: Vec<Step>,
    /// "drop", "deliver" (to this host), "forward" (out of `out`), "send" (this host's own
    /// packet out of `out`), "unroutable".
    pub verdict: &'static str,
    /// The counter (BPF) or rule (iptables) that decided.
    pub reason: String,
    /// The prefix rule that decided, if one did.
    pub rule: Option<RuleHit>,
    /// The skb mark (BPF) or packet mark (iptables) as the packet leaves.
    pub mark: u32,
    /// The packet as it leaves (after any NAT).
    pub result: Option<Seen>,
    /// Address translation, as "source A -> B" / "destination A -> B".
    pub nat: Vec<String>,
    /// The TCP MSS option before and after, when a stage changed it.
    pub mss: Option<(u16, u16)>,
    /// BPF: flow-table entries the packet created or matched (in a copy of the tables).
    pub flows: Vec<FlowChange>,
    pub notes: Vec<String>,
}

impl Report {
    /// A report on `query` with nothing found yet.
    pub fn new(backend: &str, query: &Query) -> Self {
        Self {
            backend: backend.into(),
            packet: query.packet.clone(),
            input: query.input.clone(),
            output: query.output.clone(),
            steps: Vec::new(),
            verdict: "drop",
            reason: String::new(),
            rule: None,
            mark: 0,
            result: None,
            nat: Vec::new(),
            mss: None,
            flows: Vec::new(),
            notes: Vec::new(),
        }
    }
}

/// One program (BPF) or chain (iptables) the packet went through.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub device: String,
    /// `xdp`, `tc ingress tc_ingress`, `filter FORWARD -> tg-forward`, ...
    pub hook: String,
    /// `pass`, `next` (on to the next program), `drop`, `accept`, `return`, a NAT target.
    pub result: String,
    /// BPF: the counters the program bumped; iptables: the counter of the rule that matched.
    pub counters: Vec<String>,
    /// iptables: the rule that matched (its spec and comment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
    /// The packet, when this step changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packet: Option<Seen>,
    /// The mark, when this step changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark: Option<u32>,
}

/// A prefix rule of the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleHit {
    /// "inbound" (entering an uplink) or "forward" (into the tunnel).
    pub direction: &'static str,
    pub prefix: String,
    pub verdict: &'static str,
    /// Where it comes from: `cgnat.allow[0]`, `builtin: CGNAT range`, ... (`None`: not in
    /// the config explain read — changed since the daemon applied it?).
    pub origin: Option<String>,
    /// BPF rule id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowChange {
    /// "created" or "matched".
    pub change: &'static str,
    #[serde(flatten)]
    pub entry: FlowEntry,
}

/// A device of this namespace, by name and ifindex.
#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    pub index: u32,
    pub mtu: Option<u32>,
}

/// The devices of this namespace.
pub struct Devices(BTreeMap<String, netdev::Interface>);

impl Devices {
    pub fn read() -> Result<Self> {
        Ok(Self(netdev::interfaces().context("listing the devices")?))
    }

    /// The device named by option `option`.
    pub fn named(&self, name: &str, option: &str) -> Result<Device> {
        match self.0.get(name) {
            Some(i) => Ok(Device { name: name.to_string(), index: i.index, mtu: i.mtu }),
            None => bail!("{option} {name}: no such device in this network namespace"),
        }
    }

    pub fn by_index(&self, index: u32) -> Option<Device> {
        self.0.iter().find(|(_, i)| i.index == index).map(|(name, i)| Device {
            name: name.clone(),
            index,
            mtu: i.mtu,
        })
    }
}

/// Where routing sends the packet after `device`'s ingress: the kernel's answer.
pub fn route(devices: &Devices, seen: &Seen, input: Option<&Device>, mark: u32) -> Result<Routed> {
    let iif = input.map_or(0, |d| d.index);
    // Multicast and broadcast arriving: the host takes them if it listens (an input route
    // query answers EINVAL for them).
    let group = match seen.dst {
        IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_multicast(),
    };
    if group && input.is_some() {
        return Ok(Routed::Local);
    }
    Ok(match netdev::route(seen.src, seen.dst, iif, mark).context("asking the kernel for a route")? {
        netdev::Route::Local => Routed::Local,
        netdev::Route::Out(oif, _) => match devices.by_index(oif) {
            Some(device) => Routed::Out(device),
            None => Routed::Refused(format!("routed to ifindex {oif}, which is gone")),
        },
        netdev::Route::Refused(why) => Routed::Refused(why),
    })
}

pub enum Routed {
    Local,
    Out(Device),
    Refused(String),
}

/// The config the daemon runs with (or `query.config` with this process's environment),
/// compiled against this host's devices.
pub fn desired_state(pins: &Pins, query: &Query) -> Result<(Config, DesiredState)> {
    let run = runstate::read(pins);
    let (path, env): (Option<PathBuf>, HashMap<String, String>) = match (&query.config, &run) {
        (Some(path), _) => (Some(path.clone()), std::env::vars().collect()),
        (None, Some(run)) => (run.config.clone(), run.env.clone().into_iter().collect()),
        (None, None) => (None, std::env::vars().collect()),
    };
    let text = match &path {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => String::new(),
    };
    let which = match (&query.config, &path) {
        (Some(path), _) => format!("--config {}", path.display()),
        (None, Some(path)) => format!("the daemon's config {}", path.display()),
        (None, None) => "the daemon's config (TAILGATE_* variables only)".into(),
    };
    let config = Config::parse(&text, &env).with_context(|| which.clone())?;
    let state = daemon::compile(&config, netdev::Check::Config).with_context(|| which.clone())?;
    Ok((config, state))
}

/// The policy's prefix rules by (direction, prefix): verdict and origin.
pub fn origins(state: &DesiredState) -> HashMap<(&'static str, IpNet), String> {
    let mut out = HashMap::new();
    for (direction, rules) in [("inbound", &state.cgnat.inbound), ("forward", &state.cgnat.forward)] {
        for rule in rules.iter() {
            out.insert((direction, rule.prefix), rule.origin.to_string());
        }
    }
    out
}

/// Runs the explanation with the backend in force for `pins`.
pub fn explain(pins: &Pins, query: &Query) -> Result<Report> {
    query.packet.check()?;
    if query.input.is_none() && query.output.is_none() {
        bail!("give --in DEV (a packet arriving), --out DEV (one this host sends), or both (forwarded)");
    }
    // What is in force: a daemon's run state says which backend; a BPF datapath can also
    // be in force without one (kept, or left by a killed daemon).
    let run = runstate::read(pins);
    let mut report = match &run {
        Some(run) if run.backend == "iptables" => iptables::explain(pins, query)?,
        Some(_) => bpf::explain(pins, query)?,
        None if pins.exists() => bpf::explain(pins, query)?,
        None => bail!(
            "nothing is in force for pin dir {} (no daemon runs with it and no datapath is pinned there): \
             start tailgate, or give the --pin-dir it runs with",
            pins.root().display()
        ),
    };
    if let Some(run) = run {
        for what in run.pending {
            report.notes.push(format!("the daemon waits for {what}: not attached yet"));
        }
    }
    Ok(report)
}

/// Fills `verdict`-independent parts of the report from the packet before and after.
pub fn finish(report: &mut Report, before: &Seen, after: Option<&Seen>) {
    let Some(after) = after else { return };
    let at = |ip: IpAddr, port: u16| std::net::SocketAddr::new(ip, port).to_string();
    if (before.src, before.sport) != (after.src, after.sport) {
        report.nat.push(format!("source {} -> {}", at(before.src, before.sport), at(after.src, after.sport)));
    }
    if (before.dst, before.dport) != (after.dst, after.dport) {
        report.nat.push(format!(
            "destination {} -> {}",
            at(before.dst, before.dport),
            at(after.dst, after.dport)
        ));
    }
    if let (Some(a), Some(b)) = (before.mss, after.mss) {
        if a != b {
            report.mss = Some((a, b));
        }
    }
    if !after.checksums_ok {
        report.notes.push("the packet leaves with a wrong checksum".into());
    }
    report.result = Some(after.clone());
}

/// The report as text.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let p = &r.packet;
    let flags = p.flags.map_or(String::new(), |f| format!(" [{f}]"));
    let mss = p.mss.filter(|_| p.flags.is_some_and(|f| f.syn)).map_or(String::new(), |m| format!(" mss {m}"));
    let _ = writeln!(
        out,
        "packet:  {} {} -> {}{flags}{mss}",
        p.proto,
        std::net::SocketAddr::new(p.src, p.sport),
        std::net::SocketAddr::new(p.dst, p.dport)
    );
    let place = match (&r.input, &r.output) {
        (Some(i), Some(o)) => format!("in {i}, out {o}"),
        (Some(i), None) => format!("in {i}"),
        (None, Some(o)) => format!("sent by this host out {o}"),
        (None, None) => String::new(),
    };
    let _ = writeln!(out, "where:   {place} ({} backend)", r.backend);
    let _ = writeln!(out, "steps:");
    for s in &r.steps {
        let counters =
            if s.counters.is_empty() { String::new() } else { format!("  [{}]", s.counters.join(", ")) };
        let _ = writeln!(out, "  {:<10} {:<38} {}{counters}", s.device, s.hook, s.result);
        if let Some(rule) = &s.matched {
            let _ = writeln!(out, "  {:<10}   rule: {rule}", "");
        }
        if let Some(packet) = &s.packet {
            let _ = writeln!(out, "  {:<10}   packet now {packet}", "");
        }
        if let Some(mark) = s.mark {
            let _ = writeln!(out, "  {:<10}   mark now {mark:#x}", "");
        }
    }
    let verdict = match (r.verdict, &r.output) {
        ("forward", Some(o)) => format!("forward out {o}"),
        ("send", Some(o)) => format!("send out {o}"),
        ("deliver", _) => "deliver to this host".to_string(),
        (v, _) => v.to_string(),
    };
    let _ = writeln!(out, "verdict: {verdict} ({})", r.reason);
    if let Some(rule) = &r.rule {
        let origin =
            rule.origin.as_deref().unwrap_or("not in the config read (changed since the last reload?)");
        let id = rule.id.map_or(String::new(), |id| format!(", rule id {id}"));
        let _ = writeln!(out, "rule:    {} {} {} ({origin}{id})", rule.direction, rule.verdict, rule.prefix);
    }
    let _ = writeln!(out, "mark:    {:#x}", r.mark);
    for nat in &r.nat {
        let _ = writeln!(out, "nat:     {nat}");
    }
    if let Some((before, after)) = r.mss {
        let _ = writeln!(out, "mss:     {before} -> {after}");
    }
    for f in &r.flows {
        let e = &f.entry;
        let nat = e.nat.map_or(String::new(), |n| format!(" translated to {n}"));
        let _ = writeln!(
            out,
            "flow:    {} {} {} {} -> {} ({}){nat}",
            f.change,
            e.zone,
            crate::backend::bpf::conntrack::proto_name(e.proto),
            std::net::SocketAddr::new(e.src, e.sport),
            std::net::SocketAddr::new(e.dst, e.dport),
            e.state
        );
    }
    for note in &r.notes {
        let _ = writeln!(out, "note:    {note}");
    }
    out
}
