//! BPF_PROG_TEST_RUN on the real object with maps filled by the real map sync.

use std::collections::HashMap;

use anyhow::Result;
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use tailgate::{
    backend::bpf::{links, testrun, Datapath, Hook, KernelLog, Params},
    config::Config,
    policy,
};
use tailgate_abi::{
    conntrack::{Flow, FlowKey4, FlowKey6, MAP_V4, MAP_V6},
    counters::Counter,
    MAP_COUNTERS, MAP_RULE_HITS,
};

/// The tunnel MTU the packet tests assume (the reference's default).
pub const TUNNEL_MTU: u32 = 1280;

/// The datapath loaded (unpinned, unattached) with the policy of `config_toml`, for a
/// tunnel with MTU `TUNNEL_MTU`.
pub fn datapath(config_toml: &str) -> Result<Datapath> {
    let config = Config::parse(config_toml, &HashMap::new())?;
    let system = system();
    let state = policy::compile(&config, system);
    let mut dp = Datapath::load_with(None, KernelLog::Off, params(&config))?;
    dp.sync(&state)?;
    Ok(dp)
}

/// Makes `dp` hold the policy of `config_toml` (a reload).
pub fn sync(dp: &mut Datapath, config_toml: &str) -> Result<()> {
    let config = Config::parse(config_toml, &HashMap::new())?;
    let system = system();
    dp.sync(&policy::compile(&config, system))?;
    Ok(())
}

/// What the packet tests' policies see of the host: no uplinks, a tunnel of `TUNNEL_MTU`
/// whose tailnet addresses are 100.101.0.1 and fd7a:115c:a1e0::1.
pub fn system() -> policy::System {
    policy::System {
        uplinks: Vec::new(),
        tunnel_mtu: Some(TUNNEL_MTU),
        tunnel_addresses: vec!["100.101.0.1".parse().unwrap(), "fd7a:115c:a1e0::1".parse().unwrap()],
        // The gateway's LAN addresses (the egress proxy takes what arrives for them).
        addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
    }
}

/// Load parameters for packet tests: BPF_PROG_TEST_RUN hands the tunnel programs Ethernet
/// frames; the flow tables as `config` sizes them.
pub fn params(config: &Config) -> Params {
    Params { tunnel_l3_offset: 14, flows: config.flows }
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
/// TCX's "on to the next program at this hook" (-1): how the tunnel egress program and the
/// services' programs pass a packet (the last program's `TCX_NEXT` passes it).
pub const TCX_NEXT: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;

/// Runs the uplink XDP program on an Ethernet frame; returns the XDP action.
pub fn run_xdp(dp: &mut Datapath, frame: &[u8]) -> Result<u32> {
    let prog = links::xdp(&mut dp.ebpf)?;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    Ok(prog.test_run(opts)?.return_value)
}

/// Runs the tunnel egress program on an Ethernet frame (the program reads relative to the
/// network header, so the link-layer header of the test harness does not matter), as if it
/// had come in on `ingress_ifindex` (0: generated locally). The device is `lo` (ifindex 1).
pub fn run_tunnel_egress(dp: &mut Datapath, frame: &[u8], ingress_ifindex: u32) -> Result<u32> {
    Ok(run_tc(dp, Hook::TcEgress, frame, Skb { ingress_ifindex, ..Skb::default() })?.verdict)
}

/// What a TC program did with a packet.
pub use tailgate::backend::bpf::testrun::{Run as TcRun, Skb};

/// Runs a tunnel TC program (`Hook::TcIngress` or `Hook::TcEgress`) on an Ethernet frame
/// with skb mark `mark`, as if it had come in on `ingress_ifindex` (0: generated locally).
pub fn run_tunnel(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
    mark: u32,
    ingress_ifindex: u32,
) -> Result<TcRun> {
    run_tc(dp, hook, frame, Skb { mark, ingress_ifindex, ifindex: 0 })
}

/// Runs a TC program on an Ethernet frame with the given skb fields.
pub fn run_tc(dp: &mut Datapath, hook: Hook, frame: &[u8], skb: Skb) -> Result<TcRun> {
    testrun::tc(&mut dp.ebpf, hook, frame, skb)
}

/// ns per run of a TC program over `repeat` runs with the given skb fields (the device must
/// exist in the calling thread's namespace), and the verdict.
pub fn time_tc(dp: &mut Datapath, hook: Hook, frame: &[u8], skb: Skb, repeat: u32) -> Result<(u32, f64)> {
    let prog = links::tc(&mut dp.ebpf, hook)?;
    let ctx = skb.context();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = repeat;
    let r = prog.test_run(opts)?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// ns per run of a tunnel TC program over `repeat` runs.
pub fn time_tunnel(dp: &mut Datapath, hook: Hook, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let prog = links::tc(&mut dp.ebpf, hook)?;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    let r = prog.test_run(opts)?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// ns per run of the XDP program over `repeat` runs.
pub fn time_xdp(dp: &mut Datapath, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let prog = links::xdp(&mut dp.ebpf)?;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    let r = prog.test_run(opts)?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

/// Verdict counters summed over CPUs.
pub fn counters(dp: &Datapath) -> Result<HashMap<Counter, u64>> {
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(dp.ebpf.map(MAP_COUNTERS).unwrap())?;
    Counter::ALL.iter().map(|c| Ok((*c, map.get(&(*c as u32), 0)?.iter().sum()))).collect()
}

/// The counters that moved between two readings, and by how much.
pub fn changes(before: &HashMap<Counter, u64>, after: &HashMap<Counter, u64>) -> Vec<(Counter, u64)> {
    Counter::ALL.into_iter().filter(|c| after[c] != before[c]).map(|c| (c, after[&c] - before[&c])).collect()
}

/// Hits of rule `id`, summed over CPUs.
pub fn rule_hits(dp: &Datapath, id: u32) -> Result<u64> {
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(dp.ebpf.map(MAP_RULE_HITS).unwrap())?;
    Ok(map.get(&id, 0)?.iter().sum())
}

/// Runs the uplink TC egress program on an Ethernet frame, as if it had come in on
/// `ingress_ifindex` (0: generated by this host). The device is `lo` (ifindex 1), as for the
/// XDP test runs.
pub fn run_uplink_egress(dp: &mut Datapath, frame: &[u8], ingress_ifindex: u32) -> Result<u32> {
    Ok(run_tunnel(dp, Hook::UplinkEgress, frame, 0, ingress_ifindex)?.verdict)
}

/// The entries of the IPv4 flow table.
pub fn flows4(dp: &Datapath) -> Result<Vec<(FlowKey4, Flow)>> {
    table(dp, MAP_V4)
}

/// The entries of the IPv6 flow table.
pub fn flows6(dp: &Datapath) -> Result<Vec<(FlowKey6, Flow)>> {
    table(dp, MAP_V6)
}

fn table<K: aya::Pod>(dp: &Datapath, name: &str) -> Result<Vec<(K, Flow)>> {
    let map: BpfHashMap<&MapData, K, Flow> = BpfHashMap::try_from(dp.ebpf.map(name).unwrap())?;
    Ok(map.iter().collect::<Result<_, _>>()?)
}

/// Moves every flow's last packet `by` into the past (drives the clock for expiry tests).
pub fn age_flows(dp: &mut Datapath, by: std::time::Duration) -> Result<()> {
    let by = by.as_nanos() as u64;
    age::<FlowKey4>(dp, MAP_V4, by)?;
    age::<FlowKey6>(dp, MAP_V6, by)
}

fn age<K: aya::Pod>(dp: &mut Datapath, name: &str, by: u64) -> Result<()> {
    let entries = table::<K>(dp, name)?;
    let mut map: BpfHashMap<&mut MapData, K, Flow> = BpfHashMap::try_from(dp.ebpf.map_mut(name).unwrap())?;
    for (key, mut flow) in entries {
        flow.last_seen = flow.last_seen.saturating_sub(by);
        map.insert(key, flow, 0)?;
    }
    Ok(())
}

/// How many service tables are installed (slots of `SERVICE_TABLES` holding a map).
pub fn service_tables(dp: &Datapath) -> Result<usize> {
    use aya::maps::ArrayOfMaps;
    use tailgate_abi::services::{MAP_TABLES, MAX_TABLES};
    let outer: ArrayOfMaps<&MapData, MapData> = ArrayOfMaps::try_from(dp.ebpf.map(MAP_TABLES).unwrap())?;
    Ok((0..MAX_TABLES).filter(|i| outer.get(i, 0).is_ok()).count())
}

/// Writes backend id `id` as `address` serving `service` (an id handed out again).
pub fn reuse_backend_id(
    dp: &mut Datapath,
    id: u32,
    address: std::net::SocketAddr,
    service: &str,
) -> Result<()> {
    use aya::maps::Array;
    use tailgate_abi::services::{family, Backend, ServiceKey, MAP_BACKENDS};
    let service: std::net::SocketAddr = service.parse()?;
    let octets = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            (a, family::V4)
        }
        std::net::IpAddr::V6(v6) => (v6.octets(), family::V6),
    };
    let (addr, fam) = octets(address.ip());
    let (service_addr, service_family) = octets(service.ip());
    let key = ServiceKey {
        addr: service_addr,
        port: service.port(),
        proto: 6,
        family: service_family,
        generation: 0,
        scope: 0,
        pad: [0; 2],
    };
    let backend = Backend { addr, port: address.port(), family: fam, pad: 0, service: key };
    let mut map: Array<&mut MapData, Backend> = Array::try_from(dp.ebpf.map_mut(MAP_BACKENDS).unwrap())?;
    map.set(id, backend, 0)?;
    Ok(())
}

/// How many backend ids are in use (`BACKENDS` entries with a family).
pub fn backend_ids(dp: &Datapath) -> Result<usize> {
    use aya::maps::Array;
    use tailgate_abi::services::{Backend, MAP_BACKENDS, MAX_BACKENDS};
    let map: Array<&MapData, Backend> = Array::try_from(dp.ebpf.map(MAP_BACKENDS).unwrap())?;
    Ok((1..MAX_BACKENDS).filter(|i| map.get(i, 0).is_ok_and(|b| b.family != 0)).count())
}
