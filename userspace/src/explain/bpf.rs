//! `explain` on the BPF backend. A second copy of this version's object is loaded with
//! every policy map taken from the pins (prefix tables, settings, services, the active
//! generation: what the live programs read) and private flow tables, fragment tables and
//! counters; the flow tables are filled with a copy of the live entries. The programs
//! attached to the packet's devices then run on it through BPF_PROG_TEST_RUN in the order
//! the kernel runs them (the device's TCX list). Whatever they write lands in the copies:
//! the live flow tables and counters are never touched. (The code is this binary's; a
//! datapath pinned by another version is refused rather than explained with other code.)

use std::collections::{BTreeMap, HashMap};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray},
    programs::TcAttachType,
    Ebpf, EbpfLoader,
};
use ipnet::IpNet;
use tailgate_abi::{
    cgnat::{MAP_FWD_V4, MAP_FWD_V6, MAP_IN_V4, MAP_IN_V6},
    conntrack::{Flow, FlowKey4, FlowKey6, MAP_FRAGS_V4, MAP_FRAGS_V6, MAP_V4, MAP_V6},
    counters::Counter,
    generation::MAP_ACTIVE,
    globals, verdict, MAP_COUNTERS, MAP_RULE_HITS,
};

use super::{packet, Device, Devices, FlowChange, Query, Report, Routed, RuleHit};
use crate::backend::bpf::{
    cgnat, conntrack, layout,
    links::{self, Hook},
    pinned_maps,
    testrun::{self, Skb},
    Pins, OBJECT,
};

/// The maps the copy keeps to itself: what the programs write.
const PRIVATE: [&str; 6] = [MAP_V4, MAP_V6, MAP_FRAGS_V4, MAP_FRAGS_V6, MAP_COUNTERS, MAP_RULE_HITS];

/// BPF_PROG_TEST_RUN builds Ethernet frames: the tunnel programs read the IP header at 14.
const TEST_RUN_L3_OFFSET: u32 = 14;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TCX_NEXT: u32 = u32::MAX;

pub fn explain(pins: &Pins, query: &Query) -> Result<Report> {
    let mut copy = Copy::load(pins)?;
    let devices = Devices::read()?;
    let input = query.input.as_deref().map(|n| devices.named(n, "--in")).transpose()?;
    let output = query.output.as_deref().map(|n| devices.named(n, "--out")).transpose()?;
    let state = super::desired_state(pins, query);
    // A config asked for must be usable; the daemon's only names rules here.
    if let (Some(_), Err(e)) = (&query.config, &state) {
        bail!("{e:#}");
    }
    let mut report = Report::new("bpf", query);
    let origins = match &state {
        Ok((_, state)) => super::origins(state),
        Err(e) => {
            report.notes.push(format!("rules are not named by their config field ({e:#})"));
            HashMap::new()
        }
    };
    let links = attached(pins)?;
    let flows_before = copy.flows()?;
    let mut frame = packet::build(&query.packet)?;
    let before = packet::read(&frame).ok_or_else(|| anyhow!("built a packet that does not read back"))?;
    let mut mark = 0;
    let mut reasons: Vec<String> = Vec::new();
    let mut dropped = false;

    if let Some(dev) = &input {
        let skb = Skb { mark, ingress_ifindex: dev.index, ifindex: dev.index };
        let out = copy.chain(dev, TcAttachType::Ingress, &links, &mut frame, skb, &mut report, &origins)?;
        mark = out.mark;
        reasons.extend(out.reasons);
        dropped = out.dropped;
    }
    let mut verdict = "drop";
    if !dropped {
        let now = packet::read(&frame).ok_or_else(|| anyhow!("the programs left an unreadable packet"))?;
        let out_dev = match (&output, &input) {
            (Some(dev), _) => Some(dev.clone()),
            (None, input) => match super::route(&devices, &now, input.as_ref(), mark)? {
                Routed::Local => None,
                Routed::Out(dev) => Some(dev),
                Routed::Refused(why) => {
                    report.notes.push(format!("the kernel does not route it: {why}"));
                    verdict = "unroutable";
                    reasons.push(format!("no route ({why})"));
                    dropped = true;
                    None
                }
            },
        };
        match out_dev {
            _ if dropped => {}
            None => {
                verdict = "deliver";
                report
                    .notes
                    .push("delivered to this host (the host's own netfilter rules are not evaluated)".into());
            }
            Some(dev) => {
                report.output = Some(dev.name.clone());
                let skb =
                    Skb { mark, ingress_ifindex: input.as_ref().map_or(0, |d| d.index), ifindex: dev.index };
                let out =
                    copy.chain(&dev, TcAttachType::Egress, &links, &mut frame, skb, &mut report, &origins)?;
                mark = out.mark;
                reasons.extend(out.reasons);
                dropped = out.dropped;
                verdict = if dropped {
                    "drop"
                } else if input.is_some() {
                    "forward"
                } else {
                    "send"
                };
            }
        }
    }
    report.verdict = verdict;
    report.mark = mark;
    // Stages count too (marked, clamped, flow created): the reason is the last verdict
    // counter of the kind the packet got.
    let kind = if dropped { "drop" } else { "pass" };
    report.reason = match reasons.iter().rev().find(|r| r.contains(kind)) {
        Some(reason) => reason.clone(),
        None if dropped => reasons.last().cloned().unwrap_or_else(|| "dropped".into()),
        None if report.steps.is_empty() => "no tailgate program on the way".into(),
        None => "no tailgate program stopped it".into(),
    };
    super::finish(&mut report, &before, packet::read(&frame).as_ref().filter(|_| !dropped));
    report.flows = copy.flow_changes(&flows_before)?;
    Ok(report)
}

/// The live links of this instance: (ifindex, program id) -> hook.
fn attached(pins: &Pins) -> Result<HashMap<(u32, u32), Hook>> {
    let mut out = HashMap::new();
    for link in pins.pinned_links()?.into_iter().filter(|l| l.live) {
        let program = links::pinned_program(&link.path)?;
        out.insert((link.name.ifindex, program), link.name.hook);
    }
    Ok(out)
}

struct ChainOutcome {
    mark: u32,
    dropped: bool,
    /// The counters that moved, in order.
    reasons: Vec<String>,
}

/// This version's object loaded against the live policy.
struct Copy {
    ebpf: Ebpf,
    pins: Pins,
    /// The live generation's prefix rules by direction (read once, when first needed).
    rules: Option<Vec<(&'static str, IpNet, tailgate_abi::cgnat::PrefixRule)>>,
}

impl Copy {
    fn load(pins: &Pins) -> Result<Self> {
        if !pins.exists() {
            bail!("no BPF datapath pinned under {}", pins.root().display());
        }
        let maps = pinned_maps();
        match layout::pinned_version(pins, &maps)? {
            Some(v) if v == tailgate_abi::layout::VERSION => {}
            found => bail!(
                "the datapath under {} was pinned by another tailgate version (map layout {found:?}, this \
                 one has {}): use that version's explain",
                pins.root().display(),
                tailgate_abi::layout::VERSION
            ),
        }
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &0u8, true);
        loader.override_global(globals::TUNNEL_L3_OFFSET, &TEST_RUN_L3_OFFSET, true);
        for name in [MAP_V4, MAP_V6] {
            loader.map_max_entries(name, capacity(pins, name)?);
        }
        let shared: Vec<_> =
            maps.into_iter().filter(|m| !PRIVATE.contains(m)).map(|m| (m, pins.map(m))).collect();
        for (name, path) in &shared {
            // aya would create (and pin) a map that is not there: nothing may be created in
            // the live pin dir.
            if !path.exists() {
                bail!("{} is missing: the datapath there is incomplete", path.display());
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).context("loading a copy of the eBPF object")?;
        for hook in Hook::ALL {
            links::load(&mut ebpf, hook).with_context(|| format!("the {} program", hook.pin_prefix()))?;
        }
        copy_table::<FlowKey4, Flow>(pins, &mut ebpf, MAP_V4)?;
        copy_table::<FlowKey6, Flow>(pins, &mut ebpf, MAP_V6)?;
        copy_table::<FlowKey4, u64>(pins, &mut ebpf, MAP_FRAGS_V4)?;
        copy_table::<FlowKey6, u64>(pins, &mut ebpf, MAP_FRAGS_V6)?;
        Ok(Self { ebpf, pins: pins.clone(), rules: None })
    }

    /// Runs the programs of `dev` at `direction` (XDP first on ingress) on `frame`.
    #[allow(clippy::too_many_arguments)]
    fn chain(
        &mut self,
        dev: &Device,
        direction: TcAttachType,
        links: &HashMap<(u32, u32), Hook>,
        frame: &mut Vec<u8>,
        mut skb: Skb,
        report: &mut Report,
        origins: &HashMap<(&'static str, IpNet), String>,
    ) -> Result<ChainOutcome> {
        let mut outcome = ChainOutcome { mark: skb.mark, dropped: false, reasons: Vec::new() };
        let mut hooks = Vec::new();
        if direction == TcAttachType::Ingress
            && links.iter().any(|((i, _), h)| *i == dev.index && *h == Hook::Xdp)
        {
            hooks.push(Hook::Xdp);
        }
        let (_, programs) = aya::programs::SchedClassifier::query_tcx(&dev.name, direction)
            .with_context(|| format!("listing the TC programs of {}", dev.name))?;
        for program in programs {
            match links.get(&(dev.index, program.id())) {
                Some(hook) => hooks.push(*hook),
                None => report.notes.push(format!(
                    "{}: program {} (id {}) of another tool runs there too; not evaluated",
                    dev.name,
                    program.name_as_str().unwrap_or("?"),
                    program.id()
                )),
            }
        }
        for hook in hooks {
            let counters_before = self.counters()?;
            let testrun::Run { verdict: code, frame: out, mark } = self.run(hook, frame, skb)?;
            let moved = changed(&counters_before, &self.counters()?);
            let result = verdict_name(hook, code);
            let changed_packet = (out != *frame).then(|| packet::read(&out)).flatten();
            let changed_mark = (mark != skb.mark).then_some(mark);
            report.steps.push(super::Step {
                device: dev.name.clone(),
                hook: hook_name(hook),
                result: result.to_string(),
                counters: moved.iter().map(|c| c.name().to_string()).collect(),
                matched: None,
                packet: changed_packet,
                mark: changed_mark,
            });
            if let Some(rule) = self.rule_hit(hook, frame, &moved, origins)? {
                report.steps.last_mut().expect("just pushed").matched =
                    Some(format!("{} {} {}", rule.direction, rule.verdict, rule.prefix));
                report.rule = Some(rule);
            }
            outcome.reasons.extend(moved.iter().map(|c| c.name().to_string()));
            *frame = out;
            skb.mark = mark;
            outcome.mark = mark;
            match result {
                "drop" => {
                    outcome.dropped = true;
                    break;
                }
                // TC_ACT_OK ends the device's list: the programs after it do not run.
                "pass" if hook != Hook::Xdp => break,
                _ => {}
            }
        }
        Ok(outcome)
    }

    /// One test run.
    fn run(&mut self, hook: Hook, frame: &[u8], skb: Skb) -> Result<testrun::Run> {
        match hook {
            Hook::Xdp => testrun::xdp(&mut self.ebpf, frame, skb.ingress_ifindex),
            _ => testrun::tc(&mut self.ebpf, hook, frame, skb),
        }
    }

    fn counters(&self) -> Result<HashMap<Counter, u64>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_COUNTERS)?)?;
        Counter::ALL.iter().map(|c| Ok((*c, map.get(&(*c as u32), 0)?.iter().sum()))).collect()
    }

    /// The prefix rule a filter program hit: among the live rules whose prefix holds the
    /// packet's source, the one whose (private) hit counter moved.
    fn rule_hit(
        &mut self,
        hook: Hook,
        frame: &[u8],
        moved: &[Counter],
        origins: &HashMap<(&'static str, IpNet), String>,
    ) -> Result<Option<RuleHit>> {
        let direction = match hook {
            Hook::Xdp => "inbound",
            Hook::TcEgress => "forward",
            _ => return Ok(None),
        };
        let judged =
            [Counter::UplinkDrop, Counter::UplinkPassRule, Counter::TunnelDrop, Counter::TunnelPassForward];
        if !moved.iter().any(|c| judged.contains(c)) {
            return Ok(None);
        }
        let Some(seen) = packet::read(frame) else { return Ok(None) };
        if self.rules.is_none() {
            self.rules = Some(self.live_rules()?);
        }
        let hits: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_RULE_HITS)?)?;
        for (d, net, rule) in self.rules.as_ref().expect("read above") {
            if *d != direction || !net.contains(&seen.src) || rule.rule_id >= tailgate_abi::MAX_RULES {
                continue;
            }
            if hits.get(&rule.rule_id, 0)?.iter().sum::<u64>() > 0 {
                return Ok(Some(RuleHit {
                    direction,
                    prefix: net.to_string(),
                    verdict: if rule.verdict == verdict::DROP { "drop" } else { "pass" },
                    origin: origins.get(&(direction, *net)).cloned(),
                    id: Some(rule.rule_id),
                }));
            }
        }
        Ok(None)
    }

    /// The prefix rules of the live generation, as `status` reads them.
    fn live_rules(&self) -> Result<Vec<(&'static str, IpNet, tailgate_abi::cgnat::PrefixRule)>> {
        let active =
            aya::maps::Array::<MapData, u32>::try_from(open(&self.pins, MAP_ACTIVE)?)?.get(&0, 0)? & 1;
        let mut out = Vec::new();
        for (direction, names) in [("inbound", [MAP_IN_V4, MAP_IN_V6]), ("forward", [MAP_FWD_V4, MAP_FWD_V6])]
        {
            for (v6, name) in [false, true].into_iter().zip(names) {
                for (net, rule) in cgnat::rules(&open(&self.pins, name)?, v6, active)? {
                    out.push((direction, net, rule));
                }
            }
        }
        Ok(out)
    }

    fn map(&self, name: &str) -> Result<&Map> {
        self.ebpf.map(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    /// Every entry of the copies of the flow tables, by raw key.
    fn flows(&self) -> Result<BTreeMap<Vec<u8>, (conntrack::FlowEntry, Flow)>> {
        let now = conntrack::monotonic_now();
        let mut out = entries::<FlowKey4>(self.map(MAP_V4)?, now)?;
        out.extend(entries::<FlowKey6>(self.map(MAP_V6)?, now)?);
        Ok(out)
    }

    /// Entries the run created, and those it refreshed.
    fn flow_changes(
        &self,
        before: &BTreeMap<Vec<u8>, (conntrack::FlowEntry, Flow)>,
    ) -> Result<Vec<FlowChange>> {
        let mut out = Vec::new();
        for (key, (entry, flow)) in self.flows()? {
            let change = match before.get(&key) {
                None => "created",
                Some((_, old)) if bytes(old) != bytes(&flow) => "matched",
                Some(_) => continue,
            };
            out.push(FlowChange { change, entry });
        }
        Ok(out)
    }
}

fn entries<K: aya::Pod + Into<conntrack::FlowEntry>>(
    map: &Map,
    now: std::time::Duration,
) -> Result<BTreeMap<Vec<u8>, (conntrack::FlowEntry, Flow)>> {
    let table: BpfHashMap<&MapData, K, Flow> = BpfHashMap::try_from(map)?;
    let mut out = BTreeMap::new();
    for item in table.iter() {
        let (key, flow) = item?;
        out.insert(bytes(&key).to_vec(), (conntrack::describe(key, &flow, now), flow));
    }
    Ok(out)
}

/// The bytes of a plain-old-data value.
fn bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain data without padding the kernel would not also see.
    unsafe { std::slice::from_raw_parts(value as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// Copies the live entries of `name` into the copy's map of that name.
fn copy_table<K: aya::Pod, V: aya::Pod>(pins: &Pins, ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let live = open(pins, name)?;
    let live: BpfHashMap<&MapData, K, V> = BpfHashMap::try_from(&live)?;
    let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    let mut copy: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map)?;
    for item in live.iter() {
        let (key, value) = item.with_context(|| format!("reading {name}"))?;
        copy.insert(key, value, 0).with_context(|| format!("copying {name}"))?;
    }
    Ok(())
}

fn capacity(pins: &Pins, name: &str) -> Result<u32> {
    match open(pins, name)? {
        Map::LruHashMap(data) | Map::HashMap(data) => Ok(data.info()?.max_entries()),
        _ => bail!("{name} is not a hash map"),
    }
}

fn open(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

fn changed(before: &HashMap<Counter, u64>, after: &HashMap<Counter, u64>) -> Vec<Counter> {
    Counter::ALL.into_iter().filter(|c| after[c] != before[c]).collect()
}

fn verdict_name(hook: Hook, code: u32) -> &'static str {
    match (hook, code) {
        (Hook::Xdp, XDP_PASS) => "next",
        (Hook::Xdp, XDP_DROP) => "drop",
        (Hook::Xdp, _) => "other xdp action",
        (_, TCX_NEXT) => "next",
        (_, TC_ACT_OK) => "pass",
        (_, TC_ACT_SHOT) => "drop",
        _ => "other tc action",
    }
}

fn hook_name(hook: Hook) -> String {
    match hook {
        Hook::Xdp => format!("xdp {}", hook.program()),
        Hook::TcIngress | Hook::ServiceIn | Hook::ServiceUplinkIn | Hook::MasqueradeIn => {
            format!("tc ingress {}", hook.program())
        }
        _ => format!("tc egress {}", hook.program()),
    }
}
