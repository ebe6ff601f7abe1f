//! BPF_PROG_TEST_RUN on the real object with maps filled by the real map sync.

use std::collections::HashMap;

use anyhow::Result;
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use tailgate::{
    backend::bpf::{links, Datapath, Hook, KernelLog, Params},
    config::Config,
    policy,
};
use tailgate_abi::{counters::Counter, MAP_COUNTERS, MAP_RULE_HITS};

/// `struct __sk_buff` size and the offsets BPF_PROG_TEST_RUN lets a test set.
const SKB_CTX_LEN: usize = 192;
const SKB_INGRESS_IFINDEX: usize = 36;

/// The tunnel MTU the packet tests assume (the reference's default).
pub const TUNNEL_MTU: u32 = 1280;

/// The datapath loaded (unpinned, unattached) with the policy of `config_toml`, for a
/// tunnel with MTU `TUNNEL_MTU`.
pub fn datapath(config_toml: &str) -> Result<Datapath> {
    let config = Config::parse(config_toml, &HashMap::new())?;
    let system = policy::System { uplinks: Vec::new(), tunnel_mtu: Some(TUNNEL_MTU) };
    let state = policy::compile(&config, system);
    // BPF_PROG_TEST_RUN hands the tunnel programs Ethernet frames.
    let mut dp = Datapath::load_with(None, KernelLog::Off, Params { tunnel_l3_offset: 14 })?;
    dp.sync(&state)?;
    Ok(dp)
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
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
    let prog = links::tc(&mut dp.ebpf, Hook::TcEgress)?;
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.ctx_in = Some(&ctx);
    Ok(prog.test_run(opts)?.return_value)
}

/// What a tunnel TC program did with a packet.
pub struct TcRun {
    pub verdict: u32,
    /// The packet as it left the program.
    pub frame: Vec<u8>,
    /// The skb mark as it left the program.
    pub mark: u32,
}

const SKB_MARK: usize = 8;

/// Runs a tunnel TC program (`Hook::TcIngress` or `Hook::TcEgress`) on an Ethernet frame
/// with skb mark `mark`, as if it had come in on `ingress_ifindex` (0: generated locally).
pub fn run_tunnel(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
    mark: u32,
    ingress_ifindex: u32,
) -> Result<TcRun> {
    let prog = links::tc(&mut dp.ebpf, hook)?;
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
    ctx[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + 256];
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    opts.ctx_out = Some(&mut ctx_out);
    let r = prog.test_run(opts)?;
    out.truncate(r.data_size_out as usize);
    let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().unwrap());
    Ok(TcRun { verdict: r.return_value, frame: out, mark })
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

/// Hits of rule `id`, summed over CPUs.
pub fn rule_hits(dp: &Datapath, id: u32) -> Result<u64> {
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(dp.ebpf.map(MAP_RULE_HITS).unwrap())?;
    Ok(map.get(&id, 0)?.iter().sum())
}
