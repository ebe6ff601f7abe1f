//! Flow tracking in the BPF backend: the stage switches in `SETTINGS`, the tables' capacity
//! (set when the object is loaded), and reading the tables for `status` and `flows`.

use std::{net::IpAddr, time::Duration};

use anyhow::Result;
use aya::maps::{HashMap, Map, MapData};
use serde::Serialize;
use tailgate_abi::{
    conntrack::{proto, state, timeout_ns, zone, Flow, FlowKey4, FlowKey6, MAP_V4, MAP_V6},
    settings::{stage, Settings},
};

use crate::{config::FlowsConfig, policy::Conntrack};

pub fn fill(conntrack: &Conntrack, settings: &mut Settings) {
    if conntrack.own_replies {
        settings.stages |= stage::OWN_FLOWS;
    }
    if conntrack.stateful {
        settings.stages |= stage::STATEFUL;
    }
}

/// The flow maps and the capacity `flows` gives each.
pub fn capacities(flows: &FlowsConfig) -> [(&'static str, u32); 2] {
    [(MAP_V4, flows.max_entries_v4), (MAP_V6, flows.max_entries_v6)]
}

/// Zeroes the flow-table counters (the tables were created anew; see `status`).
pub fn reset_counters(ebpf: &mut aya::Ebpf) -> Result<()> {
    use aya::maps::{PerCpuArray, PerCpuValues};
    use tailgate_abi::{counters::Counter, MAP_COUNTERS};
    let map = ebpf.map_mut(MAP_COUNTERS).ok_or_else(|| anyhow::anyhow!("map {MAP_COUNTERS} missing"))?;
    let mut counters: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(map)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    for counter in [Counter::FlowCreated, Counter::FlowExpired, Counter::FlowCreateFailed] {
        counters.set(counter as u32, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
    }
    Ok(())
}

/// One entry of a flow table, for `tailgate flows`.
#[derive(Debug, Clone, Serialize)]
pub struct FlowEntry {
    /// "own" (the gateway's, out of an uplink) or "tunnel" (opened from the tunnel).
    pub zone: &'static str,
    pub ifindex: u32,
    pub proto: u8,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub state: &'static str,
    /// Since the last packet either way.
    pub idle_s: f64,
    /// Until the entry expires without further packets (0: expired, waiting for a lookup or
    /// the LRU to remove it).
    pub expires_in_s: f64,
}

/// How full the two tables are.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Occupancy {
    pub entries_v4: u64,
    pub capacity_v4: u32,
    pub entries_v6: u64,
    pub capacity_v6: u32,
}

/// Entries and capacity of both tables (one walk of the keys each).
pub fn occupancy(v4: &Map, v6: &Map) -> Result<Occupancy> {
    let t4: HashMap<&MapData, FlowKey4, Flow> = HashMap::try_from(v4)?;
    let t6: HashMap<&MapData, FlowKey6, Flow> = HashMap::try_from(v6)?;
    let mut o = Occupancy { capacity_v4: capacity(v4)?, capacity_v6: capacity(v6)?, ..Occupancy::default() };
    for key in t4.keys() {
        key?;
        o.entries_v4 += 1;
    }
    for key in t6.keys() {
        key?;
        o.entries_v6 += 1;
    }
    Ok(o)
}

fn capacity(map: &Map) -> Result<u32> {
    match map {
        Map::LruHashMap(data) | Map::HashMap(data) => Ok(data.info()?.max_entries()),
        _ => anyhow::bail!("not a hash map"),
    }
}

/// Every entry of both tables (expired ones too, until a lookup or the LRU removes them),
/// with ages measured at `now` (CLOCK_MONOTONIC), most recent first.
pub fn entries(v4: &Map, v6: &Map, now: Duration) -> Result<Vec<FlowEntry>> {
    let mut out = Vec::new();
    let t4: HashMap<&MapData, FlowKey4, Flow> = HashMap::try_from(v4)?;
    for item in t4.iter() {
        let (k, f) = item?;
        out.push(entry(k.zone, k.ifindex, k.proto, k.src.into(), k.sport, k.dst.into(), k.dport, &f, now));
    }
    let t6: HashMap<&MapData, FlowKey6, Flow> = HashMap::try_from(v6)?;
    for item in t6.iter() {
        let (k, f) = item?;
        out.push(entry(k.zone, k.ifindex, k.proto, k.src.into(), k.sport, k.dst.into(), k.dport, &f, now));
    }
    out.sort_by(|a, b| a.idle_s.total_cmp(&b.idle_s));
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn entry(
    zone: u8,
    ifindex: u32,
    proto: u8,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    flow: &Flow,
    now: Duration,
) -> FlowEntry {
    let idle = (now.as_nanos() as u64).saturating_sub(flow.last_seen);
    let left = timeout_ns(proto, flow.state).saturating_sub(idle);
    FlowEntry {
        zone: match zone {
            zone::OWN => "own",
            zone::TUNNEL => "tunnel",
            _ => "?",
        },
        ifindex,
        proto,
        src,
        sport,
        dst,
        dport,
        state: state::name(flow.state),
        idle_s: idle as f64 / 1e9,
        expires_in_s: left as f64 / 1e9,
    }
}

/// A protocol's name for display.
pub fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        other => format!("proto {other}"),
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: an out-parameter of the right type.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
