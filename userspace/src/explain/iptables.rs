//! `explain` on the iptables backend: the rules the daemon renders for the desired state,
//! evaluated in netfilter's order (nat PREROUTING, the kernel's routing, filter INPUT or
//! mangle/filter FORWARD, nat POSTROUTING; mangle OUTPUT for the host's own packets), first
//! match per chain. Only tailgate's chains are evaluated: the rest of the built-in chains
//! and their policies are the host's. A rule using a match this evaluator does not know is
//! an error, never a silent miss.

use std::net::{IpAddr, SocketAddr};

use anyhow::{anyhow, bail, Context, Result};
use ipnet::IpNet;

use super::{
    packet::{self, Proto},
    Device, Devices, Query, Report, Routed, RuleHit, Step,
};
use crate::{
    backend::{
        bpf::Pins,
        iptables::{
            cgnat::labelled_set,
            exec::Available,
            render::{self, Wiring},
            sets::{self, SetSpec},
            table::{Family, Table, TableSpec},
        },
    },
    netdev,
    policy::DesiredState,
};

/// IPv4 + TCP and IPv6 + TCP headers without options (TCPMSS's clamp-to-PMTU arithmetic).
const V4_HEADERS: u32 = 40;
const V6_HEADERS: u32 = 60;

pub fn explain(pins: &Pins, query: &Query) -> Result<Report> {
    let (config, state) = super::desired_state(pins, query)?;
    let devices = Devices::read()?;
    let input = query.input.as_deref().map(|n| devices.named(n, "--in")).transpose()?;
    let output = query.output.as_deref().map(|n| devices.named(n, "--out")).transpose()?;
    let mut notes = Vec::new();
    if !config.iptables.divert {
        notes.push(
            "iptables.divert = false: tailgate's chains are evaluated as if jumped to; your own rules decide \
             whether they are"
                .into(),
        );
    }
    notes.push(
        "explained as the first packet of a connection: conntrack handles the rest of a connection as \
         its first packet was handled (replies to the gateway's own connections pass by 'own flows: replies')"
            .into(),
    );
    if let Some(differs) = in_force_differs(pins, &config, &state) {
        notes.insert(0, differs);
    }
    let host = Kernel { devices, addresses: netdev::addresses().context("reading the host's addresses")? };
    let mut evaluated = evaluate(&state, &query.packet, input.as_ref(), output.as_ref(), &host)?;
    evaluated.notes.splice(0..0, notes);
    evaluated.input = query.input.clone();
    evaluated.output = evaluated.output.or_else(|| query.output.clone());
    Ok(evaluated)
}

/// The rules `state` renders evaluated on `packet` arriving by `input` (`None`: sent by this
/// host) and leaving by `output` (`None`: where `host` routes it), in netfilter's order. No
/// notes about the config: the bare evaluation (what the differential tests compare).
pub fn evaluate(
    state: &DesiredState,
    packet: &packet::Described,
    input: Option<&Device>,
    output: Option<&Device>,
    host: &dyn Host,
) -> Result<Report> {
    evaluate_as(state, Lists::InSets, packet, input, output, host)
}

/// How the rules keep prefix lists: in sets (a host with ipset), or one rule per prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lists {
    InSets,
    AsRules,
}

/// `evaluate`, with the prefix lists kept as `lists` says.
pub fn evaluate_as(
    state: &DesiredState,
    lists: Lists,
    packet: &packet::Described,
    input: Option<&Device>,
    output: Option<&Device>,
    host: &dyn Host,
) -> Result<Report> {
    let query = Query {
        packet: packet.clone(),
        input: input.map(|d| d.name.clone()),
        output: output.map(|d| d.name.clone()),
        config: None,
    };
    let mut report = Report::new("iptables", &query);
    let walk = Walk::new(state, lists);
    let before = packet::read(&packet::build(packet)?).ok_or_else(|| anyhow!("unreadable packet"))?;
    let mut p = Packet::new(&query, &before);
    let outcome = walk.traverse(&mut p, input, output, host, &mut report)?;
    report.verdict = outcome;
    report.mark = p.mark;
    let after = packet::Seen { checksums_ok: before.checksums_ok, ..p.now() };
    super::finish(&mut report, &before, (outcome != "drop" && outcome != "unroutable").then_some(&after));
    Ok(report)
}

/// What the evaluator asks of the host: where a packet is routed, the source MASQUERADE
/// picks, which addresses are local (`-m addrtype --dst-type LOCAL`).
pub trait Host {
    fn route(&self, seen: &packet::Seen, input: Option<&Device>, mark: u32) -> Result<Routed>;
    fn source(&self, src: IpAddr, dst: IpAddr, mark: u32) -> Result<IpAddr>;
    fn local(&self, ip: IpAddr) -> bool;
}

/// This host, as the kernel tells.
struct Kernel {
    devices: Devices,
    addresses: std::collections::BTreeMap<u32, Vec<IpAddr>>,
}

impl Host for Kernel {
    fn route(&self, seen: &packet::Seen, input: Option<&Device>, mark: u32) -> Result<Routed> {
        super::route(&self.devices, seen, input, mark)
    }

    fn source(&self, src: IpAddr, dst: IpAddr, mark: u32) -> Result<IpAddr> {
        // The kernel's source for the destination out of that device, as MASQUERADE.
        match netdev::route(src, dst, 0, mark)? {
            netdev::Route::Out(_, Some(source)) => Ok(source),
            _ => bail!("MASQUERADE: the kernel has no source address for {dst}"),
        }
    }

    fn local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.addresses.values().flatten().any(|a| *a == ip)
    }
}

/// A host given in full, for evaluating without asking the kernel: packets arriving are
/// routed to `route` (`None`: delivered here), MASQUERADE picks `source`, `local` are the
/// host's addresses.
pub struct Given {
    pub route: Option<Device>,
    pub source: IpAddr,
    pub local: Vec<IpAddr>,
}

impl Host for Given {
    fn route(&self, _: &packet::Seen, _: Option<&Device>, _: u32) -> Result<Routed> {
        Ok(self.route.clone().map_or(Routed::Local, Routed::Out))
    }

    fn source(&self, _: IpAddr, _: IpAddr, _: u32) -> Result<IpAddr> {
        Ok(self.source)
    }

    fn local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local.contains(&ip)
    }
}

/// A warning when the rules in force are not the ones `state` renders (a reload not done
/// yet, `--config` naming another file, rules changed by hand before a repair).
fn in_force_differs(pins: &Pins, config: &crate::config::Config, state: &DesiredState) -> Option<String> {
    use crate::backend::iptables::{
        exec::Iptables,
        table::{plan, SavedTable},
    };
    let variant = crate::runstate::read(pins).and_then(|r| r.variant)?;
    let ip = Iptables::probe_quiet(variant).ok()?;
    // Rendered as the daemon renders: sets named after this pin directory, where ipset is.
    let prefix = crate::backend::iptables::sets::name_prefix(&crate::lock::instance_name(pins));
    let has_sets = crate::backend::iptables::sets::Ipset::installed().is_ok();
    let wiring = Wiring { divert: config.iptables.divert, first: false, sets: has_sets.then_some(prefix) };
    let desired = render::render(state, wiring, &Available::all()).tables;
    let differs = ip.tables().any(|(family, table)| {
        let Some(spec) = desired.iter().find(|t| t.family == family && t.table == table) else {
            return false;
        };
        match ip.save(family, table, false) {
            Ok(text) => plan(spec, &SavedTable::parse(&text, table.name())).is_some(),
            Err(_) => true,
        }
    });
    differs.then(|| {
        "WARNING: the rules in force differ from this config's (a reload not done yet, --config naming \
         another file, or rules changed by hand): explained for this config"
            .to_string()
    })
}

/// The packet as the rules see it.
#[derive(Debug, Clone)]
struct Packet {
    proto: Proto,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    syn: bool,
    rst: bool,
    ack: bool,
    fin: bool,
    psh: bool,
    mss: Option<u16>,
    mark: u32,
    connmark: u32,
    input: Option<String>,
    output: Option<String>,
    /// MTUs of the devices in and out (TCPMSS --clamp-mss-to-pmtu).
    mtus: (Option<u32>, Option<u32>),
}

impl Packet {
    fn new(query: &Query, seen: &packet::Seen) -> Self {
        let flags = query.packet.flags.unwrap_or_default();
        Self {
            proto: query.packet.proto,
            src: seen.src,
            dst: seen.dst,
            sport: seen.sport,
            dport: seen.dport,
            syn: flags.syn,
            rst: flags.rst,
            ack: flags.ack,
            fin: flags.fin,
            psh: flags.psh,
            mss: seen.mss,
            mark: 0,
            connmark: 0,
            input: None,
            output: None,
            mtus: (None, None),
        }
    }

    /// The packet as it is now.
    fn now(&self) -> packet::Seen {
        packet::Seen {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            mss: self.mss,
            checksums_ok: true,
        }
    }

    fn family(&self) -> Family {
        if self.src.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// The rendered tables (and the sets their rules match against) and how to walk them.
struct Walk {
    tables: Vec<TableSpec>,
    sets: Vec<SetSpec>,
}

/// How a chain (or tailgate's part of a built-in chain) ended.
#[derive(Debug, Clone, PartialEq)]
enum End {
    Accept,
    Drop,
    /// Back to the built-in chain (RETURN, or no rule decided).
    Continue,
    /// On to the next rule (MARK, CONNMARK, TCPMSS).
    Next,
}

impl Walk {
    fn new(state: &DesiredState, lists: Lists) -> Self {
        let wiring = match lists {
            Lists::InSets => Wiring::standard(),
            Lists::AsRules => Wiring { sets: None, ..Wiring::standard() },
        };
        let rendered = render::render(state, wiring, &Available::all());
        Self { tables: rendered.tables, sets: rendered.sets }
    }

    fn traverse(
        &self,
        p: &mut Packet,
        input: Option<&Device>,
        output: Option<&Device>,
        host: &dyn Host,
        report: &mut Report,
    ) -> Result<&'static str> {
        p.input = input.map(|d| d.name.clone());
        p.mtus.0 = input.and_then(|d| d.mtu);
        let Some(input) = input else {
            let output = output.expect("explain checks that --in or --out is given");
            p.output = Some(output.name.clone());
            p.mtus.1 = output.mtu;
            if self.hook(host, Table::Mangle, "OUTPUT", p, report)? == End::Drop {
                return Ok("drop");
            }
            if self.hook(host, Table::Nat, "POSTROUTING", p, report)? == End::Drop {
                return Ok("drop");
            }
            unless_decided(&mut report.reason, "sent: no tailgate rule stops it");
            return Ok("send");
        };
        if self.hook(host, Table::Nat, "PREROUTING", p, report)? == End::Drop {
            return Ok("drop");
        }
        let seen = p.now();
        let out = match output {
            Some(dev) => Some(dev.clone()),
            None => match host.route(&seen, Some(input), p.mark)? {
                Routed::Local => None,
                Routed::Out(dev) => Some(dev),
                Routed::Refused(why) => {
                    report.notes.push(format!("the kernel does not route it: {why}"));
                    report.reason = format!("no route ({why})");
                    return Ok("unroutable");
                }
            },
        };
        let Some(out) = out else {
            return Ok(match self.hook(host, Table::Filter, "INPUT", p, report)? {
                End::Drop => "drop",
                end => {
                    if end == End::Continue {
                        unless_decided(
                            &mut report.reason,
                            "not decided by tailgate's rules (the rest of INPUT and its policy decide)",
                        );
                    }
                    "deliver"
                }
            });
        };
        report.output = Some(out.name.clone());
        p.output = Some(out.name.clone());
        p.mtus.1 = out.mtu;
        if self.hook(host, Table::Mangle, "FORWARD", p, report)? == End::Drop {
            return Ok("drop");
        }
        match self.hook(host, Table::Filter, "FORWARD", p, report)? {
            End::Drop => return Ok("drop"),
            End::Continue | End::Next => {
                unless_decided(
                    &mut report.reason,
                    "not decided by tailgate's rules (the rest of FORWARD and its policy decide)",
                );
            }
            End::Accept => {}
        }
        if self.hook(host, Table::Nat, "POSTROUTING", p, report)? == End::Drop {
            return Ok("drop");
        }
        Ok("forward")
    }

    /// tailgate's chains jumped to from `builtin` of `table`.
    fn hook(
        &self,
        host: &dyn Host,
        table: Table,
        builtin: &str,
        p: &mut Packet,
        report: &mut Report,
    ) -> Result<End> {
        let Some(spec) = self.tables.iter().find(|t| t.family == p.family() && t.table == table) else {
            return Ok(End::Continue);
        };
        for hook in spec.hooks.iter().filter(|h| h.builtin == builtin) {
            let chain = spec
                .chains
                .iter()
                .find(|c| c.name == hook.target)
                .ok_or_else(|| anyhow!("no chain {}", hook.target))?;
            let end = self.chain(host, (table, builtin), chain, p, report)?;
            if end != End::Continue {
                return Ok(end);
            }
        }
        Ok(End::Continue)
    }

    fn chain(
        &self,
        host: &dyn Host,
        (table, builtin): (Table, &str),
        chain: &crate::backend::iptables::table::Chain,
        p: &mut Packet,
        report: &mut Report,
    ) -> Result<End> {
        let device = p.input.clone().or_else(|| p.output.clone()).unwrap_or_default();
        let hook = format!("{table} {builtin} -> {}", chain.name);
        let mut matched = false;
        for (index, rule) in chain.rules.iter().enumerate() {
            let parsed =
                parse(&rule.spec).with_context(|| format!("rule `{}` of {}", rule.spec, chain.name))?;
            if !parsed.matches(p, host, &self.sets)? {
                continue;
            }
            if parsed.random.is_some() {
                // `statistic --mode random`: one of the rules from here on, by chance; the
                // walk follows the first.
                let list: Vec<String> = chances(&chain.rules[index..], p, host, &self.sets)?
                    .iter()
                    .map(|(label, c)| format!("{label} {:.1} %", c * 100.0))
                    .collect();
                report.notes.push(format!(
                    "{}: taken at random per connection: {}; explained for the first",
                    chain.name,
                    list.join(", ")
                ));
            }
            matched = true;
            let before = (p.src, p.sport, p.dst, p.dport, p.mark, p.mss);
            let end = parsed.target.apply(p, host)?;
            let counter = (rule.counter != "-").then(|| rule.counter.to_string());
            let changed =
                (before.0, before.1, before.2, before.3, before.5) != (p.src, p.sport, p.dst, p.dport, p.mss);
            report.steps.push(Step {
                device: device.clone(),
                hook: hook.clone(),
                result: parsed.target.name(),
                counters: counter.clone().into_iter().collect(),
                matched: Some(format!("{} ({})", rule.spec, rule.label)),
                packet: changed.then(|| p.now()),
                mark: (before.4 != p.mark).then_some(p.mark),
            });
            if matches!(parsed.target, Target::Masquerade | Target::Snat(_)) {
                report.notes.push("netfilter keeps the source port where it is free".into());
            }
            if let Some(hit) = prefix_rule(rule, p, &self.sets) {
                report.rule = Some(hit);
            }
            match counter {
                Some(counter) if end != End::Next || counter.contains("pass") || counter.contains("drop") => {
                    report.reason = counter;
                }
                None if end != End::Next => report.reason = format!("rule: {}", rule.label),
                _ => {}
            }
            if end != End::Next {
                return Ok(end);
            }
        }
        if chain.rules.is_empty() || matched {
            return Ok(End::Continue);
        }
        report.steps.push(Step {
            device,
            hook,
            result: "no rule matched".into(),
            counters: Vec::new(),
            matched: None,
            packet: None,
            mark: None,
        });
        Ok(End::Continue)
    }
}

/// Each rule's chance of taking the packet, for `rules` starting with a random one: the
/// random ones in turn, then the first that matches without chance.
fn chances(
    rules: &[crate::backend::iptables::table::Rule],
    p: &Packet,
    host: &dyn Host,
    sets: &[SetSpec],
) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    let mut left = 1.0;
    for rule in rules {
        let parsed = parse(&rule.spec)?;
        if !parsed.matches(p, host, sets)? {
            continue;
        }
        match parsed.random {
            Some(chance) => {
                out.push((rule.label.clone(), left * chance));
                left *= 1.0 - chance;
            }
            None => {
                out.push((rule.label.clone(), left));
                break;
            }
        }
    }
    Ok(out)
}

/// The prefix rule a CGNAT rule is (its label: "<prefix> <origin>"); for a set's rule, the
/// set's entry the lookup of the source ends on.
fn prefix_rule(
    rule: &crate::backend::iptables::table::Rule,
    p: &Packet,
    sets: &[SetSpec],
) -> Option<RuleHit> {
    use tailgate_abi::counters::Counter;
    let (direction, verdict) = match rule.counter.as_ref() {
        c if c == Counter::UplinkDrop.name() => ("inbound", "drop"),
        c if c == Counter::UplinkPassRule.name() => ("inbound", "pass"),
        c if c == Counter::TunnelDrop.name() => ("forward", "drop"),
        c if c == Counter::TunnelPassForward.name() => ("forward", "pass"),
        _ => return None,
    };
    if let Some(name) = labelled_set(&rule.label) {
        let entry = sets::lookup(sets.iter().find(|s| s.name == name)?, p.src)?;
        let (prefix, origin) = (entry.prefix.to_string(), Some(entry.comment.clone()));
        return Some(RuleHit { direction, prefix, verdict, origin, id: None });
    }
    let (prefix, origin) = rule.label.split_once(' ')?;
    Some(RuleHit { direction, prefix: prefix.into(), verdict, origin: Some(origin.into()), id: None })
}

/// A rule as the evaluator reads it.
#[derive(Debug)]
struct Parsed {
    conds: Vec<(bool, Cond)>,
    random: Option<f64>,
    target: Target,
}

#[derive(Debug)]
enum Cond {
    In(String),
    Out(String),
    Src(IpNet),
    Dst(IpNet),
    Proto(String),
    DPort(u16),
    /// `--tcp-flags MASK COMP`.
    TcpFlags(Vec<String>, Vec<String>),
    Mark(u32, u32),
    ConnMark(u32, u32),
    CtState(Vec<String>),
    DstLocal,
    /// `-m set --match-set <name> src`.
    SrcInSet(String),
}

#[derive(Debug)]
enum Target {
    Accept,
    Drop,
    Return,
    SetMark(u32, u32),
    SetConnMark(u32, u32),
    SetMss(u16),
    ClampMss,
    Dnat(String),
    Snat(IpAddr),
    Masquerade,
}

fn parse(spec: &str) -> Result<Parsed> {
    let mut words = spec.split_whitespace();
    let mut conds = Vec::new();
    let mut random = None;
    let mut negate = false;
    let mut module = "";
    let mut target = None;
    let next = |what: &str, words: &mut std::str::SplitWhitespace| {
        words.next().map(str::to_string).ok_or_else(|| anyhow!("{what} without a value"))
    };
    while let Some(word) = words.next() {
        let cond = match word {
            "!" => {
                negate = true;
                continue;
            }
            "-m" => {
                module = match next("-m", &mut words)?.as_str() {
                    "mark" => "mark",
                    "connmark" => "connmark",
                    "set" => "set",
                    "tcp" | "udp" | "conntrack" | "addrtype" | "statistic" => "",
                    other => bail!("match module {other} is not known to explain"),
                };
                continue;
            }
            "-i" => Cond::In(next(word, &mut words)?),
            "-o" => Cond::Out(next(word, &mut words)?),
            "-s" => Cond::Src(net(&next(word, &mut words)?)?),
            "-d" => Cond::Dst(net(&next(word, &mut words)?)?),
            "-p" => Cond::Proto(next(word, &mut words)?),
            "--dport" => Cond::DPort(next(word, &mut words)?.parse()?),
            "--tcp-flags" => {
                let list = |s: String| s.split(',').map(str::to_string).collect();
                Cond::TcpFlags(list(next(word, &mut words)?), list(next(word, &mut words)?))
            }
            "--mark" => {
                let (value, mask) = mark(&next(word, &mut words)?)?;
                if module == "connmark" {
                    Cond::ConnMark(value, mask)
                } else {
                    Cond::Mark(value, mask)
                }
            }
            "--match-set" => {
                let name = next(word, &mut words)?;
                match next(word, &mut words)?.as_str() {
                    "src" => Cond::SrcInSet(name),
                    other => bail!("--match-set {name} {other} is not known to explain"),
                }
            }
            "--ctstate" => Cond::CtState(next(word, &mut words)?.split(',').map(str::to_string).collect()),
            "--dst-type" => match next(word, &mut words)?.as_str() {
                "LOCAL" => Cond::DstLocal,
                other => bail!("--dst-type {other} is not known to explain"),
            },
            "--mode" => match next(word, &mut words)?.as_str() {
                "random" => continue,
                other => bail!("statistic --mode {other} is not known to explain"),
            },
            "--probability" => {
                random = Some(next(word, &mut words)?.parse()?);
                continue;
            }
            "-j" => {
                target = Some(parse_target(&next(word, &mut words)?, &mut words)?);
                break;
            }
            other => bail!("{other} is not known to explain"),
        };
        conds.push((std::mem::take(&mut negate), cond));
    }
    if let Some(extra) = words.next() {
        bail!("{extra} after the target is not known to explain");
    }
    Ok(Parsed { conds, random, target: target.ok_or_else(|| anyhow!("no target"))? })
}

fn parse_target(name: &str, words: &mut std::str::SplitWhitespace) -> Result<Target> {
    let mut value = |option: &str| -> Result<String> {
        match words.next() {
            Some(o) if o == option => {
                words.next().map(str::to_string).ok_or_else(|| anyhow!("{option} without a value"))
            }
            other => bail!("{name}: expected {option}, found {other:?}"),
        }
    };
    Ok(match name {
        "ACCEPT" => Target::Accept,
        "DROP" => Target::Drop,
        "RETURN" => Target::Return,
        "MASQUERADE" => Target::Masquerade,
        "MARK" => {
            let (v, m) = mark(&value("--set-mark")?)?;
            Target::SetMark(v, m)
        }
        "CONNMARK" => {
            let (v, m) = mark(&value("--set-xmark")?)?;
            Target::SetConnMark(v, m)
        }
        "TCPMSS" => match words.next() {
            Some("--set-mss") => {
                Target::SetMss(words.next().ok_or_else(|| anyhow!("--set-mss without a value"))?.parse()?)
            }
            Some("--clamp-mss-to-pmtu") => Target::ClampMss,
            other => bail!("TCPMSS {other:?} is not known to explain"),
        },
        "DNAT" => Target::Dnat(value("--to-destination")?),
        "SNAT" => Target::Snat(value("--to-source")?.parse()?),
        other => bail!("target {other} is not known to explain"),
    })
}

fn net(s: &str) -> Result<IpNet> {
    Ok(match s.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(s.parse::<IpAddr>().with_context(|| format!("address {s}"))?),
    })
}

/// `value[/mask]`, hex or decimal.
fn mark(s: &str) -> Result<(u32, u32)> {
    let number = |s: &str| -> Result<u32> {
        Ok(match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16)?,
            None => s.parse()?,
        })
    };
    Ok(match s.split_once('/') {
        Some((v, m)) => (number(v)?, number(m)?),
        None => (number(s)?, u32::MAX),
    })
}

impl Parsed {
    fn matches(&self, p: &Packet, host: &dyn Host, sets: &[SetSpec]) -> Result<bool> {
        for (negated, cond) in &self.conds {
            let hit = match cond {
                Cond::In(dev) => p.input.as_deref() == Some(dev),
                Cond::Out(dev) => p.output.as_deref() == Some(dev),
                Cond::Src(net) => net.contains(&p.src),
                Cond::Dst(net) => net.contains(&p.dst),
                Cond::Proto(name) => match name.as_str() {
                    "tcp" => p.proto == Proto::Tcp,
                    "udp" => p.proto == Proto::Udp,
                    "icmp" | "ipv6-icmp" | "icmpv6" => p.proto == Proto::Icmp,
                    other => bail!("-p {other} is not known to explain"),
                },
                Cond::DPort(port) => p.proto != Proto::Icmp && p.dport == *port,
                Cond::TcpFlags(mask, comp) => {
                    let set = |name: &str| -> Result<bool> {
                        Ok(match name {
                            "SYN" => p.syn,
                            "ACK" => p.ack,
                            "FIN" => p.fin,
                            "RST" => p.rst,
                            "PSH" => p.psh,
                            "URG" => false,
                            other => bail!("TCP flag {other} is not known to explain"),
                        })
                    };
                    let mut ok = p.proto == Proto::Tcp;
                    for flag in mask {
                        ok &= set(flag)? == comp.contains(flag);
                    }
                    ok
                }
                Cond::Mark(value, mask) => p.mark & mask == *value,
                Cond::ConnMark(value, mask) => p.connmark & mask == *value,
                Cond::CtState(states) => states.iter().any(|s| s == "NEW"),
                Cond::DstLocal => host.local(p.dst),
                Cond::SrcInSet(name) => {
                    let set =
                        sets.iter().find(|s| &s.name == name).ok_or_else(|| anyhow!("no set {name}"))?;
                    sets::lookup(set, p.src).is_some_and(|e| !e.nomatch)
                }
            };
            if hit == *negated {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Accept => "accept".into(),
            Target::Drop => "drop".into(),
            Target::Return => "return".into(),
            Target::SetMark(v, m) => format!("mark {v:#x}/{m:#x}"),
            Target::SetConnMark(v, m) => format!("connmark {v:#x}/{m:#x}"),
            Target::SetMss(mss) => format!("mss {mss}"),
            Target::ClampMss => "mss clamp to the path MTU".into(),
            Target::Dnat(to) => format!("dnat to {to}"),
            Target::Snat(to) => format!("snat to {to}"),
            Target::Masquerade => "masquerade".into(),
        }
    }

    fn apply(&self, p: &mut Packet, host: &dyn Host) -> Result<End> {
        let clamp = |p: &mut Packet, limit: u32| {
            if let Some(mss) = p.mss.filter(|_| p.syn && !p.rst) {
                p.mss = Some(mss.min(u16::try_from(limit).unwrap_or(u16::MAX)));
            }
        };
        Ok(match self {
            Target::Accept => End::Accept,
            Target::Drop => End::Drop,
            Target::Return => End::Continue,
            Target::SetMark(v, m) => {
                p.mark = (p.mark & !m) | v;
                End::Next
            }
            Target::SetConnMark(v, m) => {
                p.connmark = (p.connmark & !m) ^ v;
                End::Next
            }
            Target::SetMss(mss) => {
                clamp(p, u32::from(*mss));
                End::Next
            }
            Target::ClampMss => {
                // xt_TCPMSS: the smaller of the route's MTU out and the MTU back to the source.
                let mtu = [p.mtus.0, p.mtus.1].into_iter().flatten().min().unwrap_or(1500);
                let headers = if p.src.is_ipv4() { V4_HEADERS } else { V6_HEADERS };
                clamp(p, mtu.saturating_sub(headers));
                End::Next
            }
            Target::Dnat(to) => {
                let to = to.trim();
                match to.parse::<SocketAddr>() {
                    Ok(at) => {
                        p.dst = at.ip();
                        p.dport = at.port();
                    }
                    Err(_) => p.dst = to.parse().with_context(|| format!("--to-destination {to}"))?,
                }
                End::Accept
            }
            Target::Snat(to) => {
                p.src = *to;
                End::Accept
            }
            Target::Masquerade => {
                p.src = host.source(p.src, p.dst, p.mark)?;
                End::Accept
            }
        })
    }
}

/// The reason, unless a rule already gave one.
fn unless_decided(reason: &mut String, why: &str) {
    if reason.is_empty() {
        *reason = why.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_the_renderer_writes_parses() {
        use std::collections::HashMap;
        let toml = r#"
            tunnel = "tun0"
            [cgnat]
            allow = ["100.64.0.0/24"]
            allow_replies = true
            [subnet_routes]
            stateful = true
            [mss]
            clamp = 1200
            [proxy]
            ingress_to = "192.0.2.10"
            [[service]]
            listen = "100.101.102.103:80"
            backends = ["192.0.2.11:8080", "192.0.2.12:8080"]
        "#;
        let config = crate::config::Config::parse(toml, &HashMap::new()).unwrap();
        let system = crate::policy::System {
            tunnel_addresses: vec!["100.101.0.1".parse().unwrap()],
            ..Default::default()
        };
        let state = crate::policy::compile(&config, system);
        let tables = render::render(&state, Wiring::standard(), &Available::all()).tables;
        let mut n = 0;
        for rule in tables.iter().flat_map(|t| t.chains.iter()).flat_map(|c| c.rules.iter()) {
            parse(&rule.spec).unwrap_or_else(|e| panic!("{}: {e:#}", rule.spec));
            n += 1;
        }
        assert!(n > 15, "{n} rules");
    }

    #[test]
    fn unknown_matches_are_errors() {
        for spec in
            ["-m set --match-set x dst -j DROP", "-s 10.0.0.0/8 -j LOG", "-s 10.0.0.0/8", "--sport 5 -j DROP"]
        {
            assert!(parse(spec).is_err(), "{spec}");
        }
        let p = parse("! -i tun0 -s 100.64.0.0/10 -j DROP").unwrap();
        assert!(p.conds[0].0 && !p.conds[1].0);
        assert_eq!(mark("0x40000/0xff0000").unwrap(), (0x40000, 0xff0000));
        assert_eq!(mark("7").unwrap(), (7, u32::MAX));
    }
}
