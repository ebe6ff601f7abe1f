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
    /// "own" (the gateway's, out of an uplink), "tunnel" (opened from the tunnel), "dnat"
    /// (a flow to a service), "dnat-reply" (its translated tuple).
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
    /// Zones `dnat` / `dnat-reply`: the address and port the flow is translated to (the
    /// backend; the service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<std::net::SocketAddr>,
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
    Ok(Occupancy {
        entries_v4: count::<FlowKey4>(v4)?,
        capacity_v4: capacity(v4)?,
        entries_v6: count::<FlowKey6>(v6)?,
        capacity_v6: capacity(v6)?,
    })
}

fn count<K: aya::Pod>(map: &Map) -> Result<u64> {
    let table: HashMap<&MapData, K, Flow> = HashMap::try_from(map)?;
    let mut n = 0;
    for key in table.keys() {
        key?;
        n += 1;
    }
    Ok(n)
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
    let mut out = table_entries::<FlowKey4>(v4, now)?;
    out.extend(table_entries::<FlowKey6>(v6, now)?);
    out.sort_by(|a, b| a.idle_s.total_cmp(&b.idle_s));
    Ok(out)
}

fn table_entries<K: aya::Pod + Into<FlowEntry>>(map: &Map, now: Duration) -> Result<Vec<FlowEntry>> {
    let table: HashMap<&MapData, K, Flow> = HashMap::try_from(map)?;
    let mut out = Vec::new();
    for item in table.iter() {
        let (key, flow) = item?;
        out.push(describe(key, &flow, now));
    }
    Ok(out)
}

/// The entry of `key` holding `flow`, with ages measured at `now`.
pub fn describe<K: Into<FlowEntry>>(key: K, flow: &Flow, now: Duration) -> FlowEntry {
    let mut entry: FlowEntry = key.into();
    let idle = (now.as_nanos() as u64).saturating_sub(flow.last_seen);
    entry.state = state::name(flow.state);
    entry.idle_s = idle as f64 / 1e9;
    entry.expires_in_s = timeout_ns(entry.proto, flow.state).saturating_sub(idle) as f64 / 1e9;
    if matches!(entry.zone, "dnat" | "dnat-reply") {
        let ip = match entry.src {
            IpAddr::V4(_) => {
                IpAddr::from([flow.nat.addr[0], flow.nat.addr[1], flow.nat.addr[2], flow.nat.addr[3]])
            }
            IpAddr::V6(_) => IpAddr::from(flow.nat.addr),
        };
        entry.nat = Some(std::net::SocketAddr::new(ip, flow.nat.port));
    }
    entry
}

/// What a key says, whatever its family; the flow's part is filled in by `table_entries`.
macro_rules! entry_of_key {
    ($key:ty) => {
        impl From<$key> for FlowEntry {
            fn from(k: $key) -> Self {
                FlowEntry {
                    zone: zone::name(k.zone),
                    ifindex: k.ifindex,
                    proto: k.proto,
                    src: IpAddr::from(k.src),
                    sport: k.sport,
                    dst: IpAddr::from(k.dst),
                    dport: k.dport,
                    state: "",
                    idle_s: 0.0,
                    expires_in_s: 0.0,
                    nat: None,
                }
            }
        }
    };
}

entry_of_key!(FlowKey4);
entry_of_key!(FlowKey6);

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
