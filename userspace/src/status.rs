//! `tailgate status`: reads the pinned state directly, no daemon needed.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{Context, Result};
use aya::maps::{LpmTrie, Map, MapData, PerCpuArray};
use ipnet::IpNet;
use serde::Serialize;
use tailgate_abi::{
    cgnat::{PrefixRule, MAP_FWD_V4, MAP_FWD_V6, MAP_IN_V4, MAP_IN_V6},
    counters::Counter,
    verdict, MAP_COUNTERS, MAP_RULE_HITS, MAX_RULES,
};

use crate::backend::bpf::{Hook, Pins};

#[derive(Debug, Serialize)]
pub struct Status {
    pub backend: &'static str,
    pub pin_dir: String,
    pub attachments: Vec<Attachment>,
    /// Packets per verdict reason, summed over CPUs.
    pub counters: BTreeMap<&'static str, u64>,
    pub rules: Vec<RuleStatus>,
}

#[derive(Debug, Serialize)]
pub struct Attachment {
    pub hook: Hook,
    pub interface: String,
    pub pin: String,
}

#[derive(Debug, Serialize)]
pub struct RuleStatus {
    /// "inbound" (entering an uplink) or "forward" (forwarded into the tunnel).
    pub direction: &'static str,
    pub prefix: String,
    pub verdict: &'static str,
    pub rule_id: u32,
    /// Packets that matched, summed over CPUs; absent for a rule without a counter slot.
    pub packets: Option<u64>,
}

/// Reads the state pinned under `pins`; `None` when nothing is pinned there.
pub fn read(pins: &Pins) -> Result<Option<Status>> {
    if !pins.exists() {
        return Ok(None);
    }
    let attachments = pins
        .pinned_links()?
        .into_iter()
        .map(|(hook, interface, pin)| Attachment { hook, interface, pin: pin.display().to_string() })
        .collect();
    let counters_map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(pins, MAP_COUNTERS)?)?;
    let counters =
        Counter::ALL.iter().map(|c| Ok((c.name(), sum(&counters_map, *c as u32)?))).collect::<Result<_>>()?;
    let hits: PerCpuArray<MapData, u64> = PerCpuArray::try_from(open(pins, MAP_RULE_HITS)?)?;
    let mut rules = Vec::new();
    for (direction, v4, v6) in [("inbound", MAP_IN_V4, MAP_IN_V6), ("forward", MAP_FWD_V4, MAP_FWD_V6)] {
        let mut found: Vec<(IpNet, PrefixRule)> = Vec::new();
        let trie: LpmTrie<MapData, [u8; 4], PrefixRule> = LpmTrie::try_from(open(pins, v4)?)?;
        for item in trie.iter() {
            let (key, rule) = item?;
            let net = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8)?;
            found.push((net.into(), rule));
        }
        let trie: LpmTrie<MapData, [u8; 16], PrefixRule> = LpmTrie::try_from(open(pins, v6)?)?;
        for item in trie.iter() {
            let (key, rule) = item?;
            let net = ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8)?;
            found.push((net.into(), rule));
        }
        found.sort_by_key(|(net, _)| (net.addr().is_ipv6(), std::cmp::Reverse(net.prefix_len()), net.addr()));
        for (net, rule) in found {
            rules.push(RuleStatus {
                direction,
                prefix: net.to_string(),
                verdict: if rule.verdict == verdict::DROP { "drop" } else { "pass" },
                rule_id: rule.rule_id,
                packets: if rule.rule_id < MAX_RULES { Some(sum(&hits, rule.rule_id)?) } else { None },
            });
        }
    }
    Ok(Some(Status {
        backend: "bpf",
        pin_dir: pins.root().display().to_string(),
        attachments,
        counters,
        rules,
    }))
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
    let _ = writeln!(out, "backend: {}  (pins under {})", s.backend, s.pin_dir);
    let _ = writeln!(out, "attached:");
    if s.attachments.is_empty() {
        let _ = writeln!(out, "  nothing");
    }
    for a in &s.attachments {
        let _ = writeln!(out, "  {:<10} {}", a.hook.pin_prefix(), a.interface);
    }
    let _ = writeln!(out, "counters (packets):");
    for (name, value) in &s.counters {
        let _ = writeln!(out, "  {name:<26} {value}");
    }
    let _ = writeln!(out, "rules (longest prefix wins):");
    if s.rules.is_empty() {
        let _ = writeln!(out, "  none (cgnat filtering off)");
    }
    for r in &s.rules {
        let packets = r.packets.map_or("-".to_string(), |p| p.to_string());
        let _ = writeln!(
            out,
            "  {:<8} {:<5} {:<28} id {:<6} packets {packets}",
            r.direction, r.verdict, r.prefix, r.rule_id
        );
    }
    out
}
