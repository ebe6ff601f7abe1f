//! BPF_PROG_TEST_RUN of the datapath's programs on one frame: what `explain` runs, and the
//! packet tests with it. The skb / xdp_md fields a test run takes are set here only.

use anyhow::{Context, Result};
use aya::{programs::TestRunOptions, Ebpf, TestRun};

use super::links::{self, Hook};

/// `struct __sk_buff`: its size and the offsets of the fields a test run takes.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK: usize = 8;
const SKB_INGRESS_IFINDEX: usize = 36;
const SKB_IFINDEX: usize = 40;
/// `struct xdp_md`: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
/// egress_ifindex.
const XDP_CTX_LEN: usize = 24;
/// Room for the programs to grow a packet.
const HEADROOM: usize = 256;

/// What a TC test run's skb says besides the packet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Skb {
    pub mark: u32,
    /// The device it came in on (0: generated locally).
    pub ingress_ifindex: u32,
    /// The device it is on (0: `lo`); must exist in the calling thread's namespace.
    pub ifindex: u32,
}

impl Skb {
    /// The `__sk_buff` a test run takes with these fields.
    pub fn context(&self) -> [u8; SKB_CTX_LEN] {
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_MARK..SKB_MARK + 4].copy_from_slice(&self.mark.to_ne_bytes());
        ctx[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4]
            .copy_from_slice(&self.ingress_ifindex.to_ne_bytes());
        ctx[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&self.ifindex.to_ne_bytes());
        ctx
    }
}

/// What a program did with a packet.
#[derive(Debug, Clone)]
pub struct Run {
    /// The program's return code.
    pub verdict: u32,
    /// The packet as it left the program.
    pub frame: Vec<u8>,
    /// The skb mark as it left the program (XDP: as it came).
    pub mark: u32,
}

/// Runs `hook`'s TC program on an Ethernet frame with the given skb fields.
pub fn tc(ebpf: &mut Ebpf, hook: Hook, frame: &[u8], skb: Skb) -> Result<Run> {
    let prog = links::tc(ebpf, hook)?;
    let ctx = skb.context();
    let mut out = vec![0u8; frame.len() + HEADROOM];
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    opts.ctx_out = Some(&mut ctx_out);
    let r = prog.test_run(opts).with_context(|| format!("BPF_PROG_TEST_RUN of {}", hook.program()))?;
    out.truncate(r.data_size_out as usize);
    let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().expect("4 bytes"));
    Ok(Run { verdict: r.return_value, frame: out, mark })
}

/// Runs the XDP program on an Ethernet frame as received on `ingress_ifindex` (0: none; a
/// device must exist in the calling thread's namespace).
pub fn xdp(ebpf: &mut Ebpf, frame: &[u8], ingress_ifindex: u32) -> Result<Run> {
    let prog = links::xdp(ebpf)?;
    let mut ctx = [0u8; XDP_CTX_LEN];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut out = vec![0u8; frame.len() + HEADROOM];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    if ingress_ifindex != 0 {
        opts.ctx_in = Some(&ctx);
    }
    let r = prog.test_run(opts).context("BPF_PROG_TEST_RUN of the XDP program")?;
    out.truncate(r.data_size_out as usize);
    Ok(Run { verdict: r.return_value, frame: out, mark: 0 })
}
