//! Receive-side CPU cost of filtering under real traffic: no filtering, a trivial XDP
//! program (the floor), tailgate's XDP program, tailgate's iptables rules, measured the same
//! way.
//!
//! BPF_PROG_TEST_RUN repeats one cache-hot packet; here a flood from thousands of source
//! addresses crosses a veth pair between two namespaces, addressed to the receiver (its MAC,
//! its address, a UDP port nobody listens on). The receiving veth always has an XDP program
//! in native (driver) mode: tailgate's, or a trivial one that passes or drops everything.
//! veth polls its ring with NAPI while XDP is attached (or GRO requested, not done here);
//! with threaded NAPI that poll runs in a kthread of its own, in task context with bottom
//! halves off, and so does everything the stack does with a passed frame (GRO, IP,
//! netfilter, UDP), so the CPU time the receive path costs is that kthread's runtime
//! (`/proc/<pid>/task/<pid>/schedstat`), pinned to one CPU while the sender runs on the
//! other. (This kernel has no `IRQ_TIME_ACCOUNTING`: interrupts that land on that CPU while
//! the kthread runs — the tick, the pacing timer — are charged to it too, alike for all.)
//!
//! What one packet costs on the receiving side, whatever filters it: the NAPI poll, the
//! copy veth makes of every skb it hands to XDP (an AF_PACKET skb has far less than the
//! 256 bytes of headroom XDP wants, so `veth_convert_skb_to_xdp_buff` copies it into a
//! page-pool page), the XDP program, and then either the free (XDP_DROP) or the IP layer:
//! routing, netfilter's hooks (tailgate's iptables rules when they are installed, conntrack
//! when they need it), and UDP's discard of a datagram for a closed port. "No filtering"
//! is the trivial passing program with no rules: the same copy, the whole stack.
//!
//! Everything is owned by guards: the namespaces (and with them the veth pair), the pin
//! directory under /sys/fs/bpf, the XDP attachments and the iptables rules are removed on
//! drop, also when a measurement fails. Sending is bounded by a duration and a packet cap.

use std::{
    cell::Cell,
    fs,
    io::Error as IoError,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use etherparse::PacketBuilder;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::{
    sched::{sched_getaffinity, sched_setaffinity, CpuSet},
    unistd::Pid,
};
use tailgate::{
    backend::{
        bpf::{links, Datapath, Hook},
        iptables::{IptablesBackend, Options as IptablesOptions},
        Backend,
    },
    policy::DesiredState,
};
use tailgate_abi::counters::Counter;

use crate::{
    netns::{self, Netns},
    testrun, wait,
};

/// The CPU the sender thread runs on.
pub const SENDER_CPU: usize = 0;
/// The CPU the receiving veth's NAPI kthread runs on.
pub const NAPI_CPU: usize = 1;

/// The receiving veth's NAPI poll is paced by a timer of this period instead of being woken
/// by the sender for every few frames (`gro_flush_timeout` with `napi_defer_hard_irqs`:
/// after a poll that found work, the sender's wake-ups stay masked and an hrtimer on the
/// NAPI CPU schedules the next poll). One sender core (~0.7 Mpps here) cannot keep up with
/// the receiver, so without pacing the kthread empties the ring and sleeps every 10–40
/// frames, and each wake-up (a cross-CPU IPI, costly in a VM) adds ~25 % to ns/packet —
/// unevenly: a slower program finds more frames per wake-up, which hides part of its cost.
/// Paced, every poll finds the 256-frame ring full (the sender waits on veth's
/// backpressure meanwhile), as a loaded NIC's poll finds a full budget, and the wake-up
/// cost spread over the frames is small and the same for both programs.
pub const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Empty polls before the sender's wake-ups are unmasked again (they never happen while
/// the flood lasts; afterwards the kthread goes back to sleep within this many intervals).
const NAPI_DEFER_POLLS: u32 = 20;

/// MAC and address of the receiving veth: every frame is for the receiver, so a passed
/// frame goes the whole way up (routing, netfilter's INPUT, UDP).
const RX_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const TX_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const RX_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A port nobody listens on: UDP discards the datagram (its ICMP error is rate-limited and
/// has no route back anyway), the cheapest end of a delivered packet.
const RX_PORT: u16 = 9;
/// UDP payload: 14 + 20 + 8 + 18 = a 60-byte frame, the Ethernet minimum without FCS.
const PAYLOAD: &[u8] = b"tailgate traffic!!";
/// How long a measurement waits for the receiver to empty its ring.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer than one NAPI poll of 64 frames at the slowest rate measured (~7 ms a frame
/// behind 100,000 iptables rules: 0.45 s).
const DRAIN_STILL: Duration = Duration::from_secs(1);
/// Messages per `sendmmsg` call: one syscall entry for many frames, so the sender keeps
/// ahead of the receiver.
const SEND_BATCH: usize = 64;

/// What an XDP program is expected to do with every packet of a flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

impl Verdict {
    /// The XDP action (`enum xdp_action`).
    pub const fn action(self) -> u32 {
        match self {
            Verdict::Pass => testrun::XDP_PASS,
            Verdict::Drop => testrun::XDP_DROP,
        }
    }
}

/// One measurement: a flood of a fixed duration and what the receiving side spent on it.
#[derive(Clone, Copy, Debug)]
pub struct Measurement {
    /// Frames the sender handed to its veth.
    pub sent: u64,
    /// Send calls refused because the veth's ring was full (the sender retries them).
    pub refused: u64,
    /// Frames the receiving veth took off its ring and ran through XDP (`rx_packets`):
    /// ring drops never reach the receiver and are not counted.
    pub processed: u64,
    /// Of those, frames that reached the IP layer (XDP_PASS): `Ip: InReceives`.
    pub reached_ip: u64,
    /// Of those, frames delivered to UDP (not dropped by netfilter): `Ip: InDelivers`.
    pub delivered: u64,
    /// CPU time of the NAPI kthread(s), in ns.
    pub napi_ns: u64,
    /// `napi_ns / processed`.
    pub ns_per_packet: f64,
    /// Share of the measurement (flood and drain) the NAPI kthread was on the CPU.
    pub busy: f64,
    /// Times the NAPI kthread went to sleep with its ring empty (voluntary context
    /// switches): each costs a wake-up, spread over the packets of the next poll. Few
    /// sleeps per packet means the receiver was kept saturated.
    pub sleeps: u64,
    /// Share of the measurement (flood and drain) `NAPI_CPU` spent on other tasks or stolen by the hypervisor
    /// (another workload competes for the receiver's CPU and its caches; the kthread's own
    /// runtime stays exact — steal time is not charged to it — its cache warmth does not).
    pub other_load: f64,
}

/// Two namespaces joined by a veth pair: frames sent from `tx` arrive on `rx`'s veth, which
/// gets the XDP program under test. Dropping the rig removes both namespaces (and the veth
/// pair with them) and the pin directory.
pub struct Rig {
    // Field order is drop order: pins first (a pinned link holds the device), then the
    // namespaces.
    pins: PinDir,
    tx: Netns,
    rx: Netns,
    tx_dev: String,
    rx_dev: String,
    rx_ifindex: u32,
    /// An rtnetlink socket inside `rx`, for the receiving veth's counters and XDP mode.
    rx_nl: Socket,
    /// What is left of the time the bench may spend waiting for other load to go away.
    quiet_budget: Cell<Duration>,
}

impl Rig {
    /// Creates the namespaces and the veth pair (no IPv6, no addresses: nothing but the
    /// flood crosses it) and the pin directory. Needs CPUs `SENDER_CPU` and `NAPI_CPU`.
    pub fn new() -> Result<Self> {
        let allowed = sched_getaffinity(Pid::from_raw(0))?;
        for cpu in [SENDER_CPU, NAPI_CPU] {
            ensure!(allowed.is_set(cpu)?, "the traffic rig needs CPU {cpu}, which this process may not use");
        }
        let pins = PinDir::new()?;
        let tx = Netns::new("tgtx")?;
        let rx = Netns::new("tgrx")?;
        for ns in [&tx, &rx] {
            // No router solicitations, DAD or MLD reports crossing the pair while measuring.
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        // The NAPI kthread is named after the device (`napi/<dev>-<napi id>`) and found by
        // that name among all the host's threads: the name must be unique on the host, not
        // only in the namespace.
        let rx_dev = unique_ifname("tgr");
        let tx_dev = unique_ifname("tgs");
        netns::veth(&tx, &tx_dev, &rx, &rx_dev)?;
        let mac = RX_MAC.map(|b| format!("{b:02x}")).join(":");
        rx.ip(&["link", "set", "dev", &rx_dev, "address", &mac])?;
        rx.ip(&["addr", "add", &format!("{RX_IP}/24"), "dev", &rx_dev])?;
        // The sources have no route back: strict reverse-path filtering (a host default
        // a new namespace may inherit) would drop every frame as a martian.
        for conf in ["all", "default", rx_dev.as_str()] {
            rx.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }
        let name = rx_dev.clone();
        let (rx_ifindex, rx_nl) = rx.enter(move || Ok((ifindex(&name)?, netlink_socket()?)))?;
        Ok(Self { pins, tx, rx, tx_dev, rx_dev, rx_ifindex, rx_nl, quiet_budget: Cell::new(QUIET_BUDGET) })
    }

    /// Attaches a floor program to the receiving veth (native mode, a BPF link this process
    /// holds: it goes when the attachment is dropped).
    pub fn attach_floor(&self, floor: &FloorProgram) -> Result<Attached<'_>> {
        let (prog, ifindex) = (floor.fd.as_raw_fd(), self.rx_ifindex);
        // The ifindex is resolved in the calling thread's network namespace.
        let link = self.rx.enter(move || xdp_link_create(prog, ifindex))?;
        self.attached(Hold::Link(link))
    }

    /// Attaches tailgate's uplink XDP program the way the daemon does (a pinned link), from
    /// a thread inside the receiver's namespace.
    pub fn attach_subject(&self, dp: &mut Datapath) -> Result<Attached<'_>> {
        let pin = self.pins.path.join(format!("xdp@{}:{}", self.rx_dev, self.rx_ifindex));
        let (dev, ifindex, ebpf) = (self.rx_dev.as_str(), self.rx_ifindex, &mut dp.ebpf);
        let at = pin.clone();
        self.rx.enter(move || links::attach(ebpf, Hook::Xdp, dev, ifindex, &at))?;
        self.attached(Hold::Pin(pin))
    }

    /// Checks native mode, switches the veth's NAPI to threaded and pins its kthread(s).
    fn attached(&self, hold: Hold) -> Result<Attached<'_>> {
        let mut att = Attached { rig: self, hold: Some(hold), napi: Vec::new() };
        let mode = self.rx_state()?.xdp_attached;
        ensure!(
            mode == XdpAttached::Driver,
            "XDP on {} is not in native mode (IFLA_XDP_ATTACHED = {mode:?})",
            self.rx_dev
        );
        // veth creates its NAPI instances when XDP is attached (and deletes them when it
        // is detached): threaded mode can only be set now, and the kthreads are new ones
        // after every attach.
        att.napi = threaded_napi(&self.rx, &self.rx_dev, NAPI_CPU, true)?;
        Ok(att)
    }

    /// Floods the receiving veth from `generator` for `window` (at most `cap` frames) while
    /// `attached` is in place; waits until the veth's ring is drained before reading the
    /// counters.
    pub fn measure(
        &self,
        attached: &Attached,
        generator: &Generator,
        window: Duration,
        cap: u64,
    ) -> Result<Measurement> {
        let (state0, ns0, sleeps0) = (self.rx_state()?, attached.napi_runtime()?, attached.napi_sleeps()?);
        let ip0 = self.ip_stats()?;
        let cpu0 = cpu_busy_ns(NAPI_CPU)?;
        let start = Instant::now();
        let (sent, refused) = generator.send(window, cap)?;
        // Every frame the sender got into the ring is taken off it (a full ring refuses the
        // sender instead, see `LinkState::rx_packets`). veth adds a poll's frames to its
        // counter when the poll ends, so a slow receiver (a frame per ms behind 100,000 rules)
        // shows a counter that stands still for a while: the fallback, for frames lost
        // anyway, waits for it to stand still longer than any poll lasts.
        let rx0 = state0.rx_packets;
        let all = wait::until(DRAIN_TIMEOUT, || {
            self.rx_state().map(|s| s.rx_packets - rx0 >= sent).unwrap_or(false)
        });
        if !all {
            let mut last = u64::MAX;
            let still = wait::until(DRAIN_TIMEOUT, || {
                let now = self.rx_state().map(|s| s.rx_packets).unwrap_or(u64::MAX - 1);
                let same = std::mem::replace(&mut last, now) == now;
                same && {
                    std::thread::sleep(DRAIN_STILL);
                    self.rx_state().map(|s| s.rx_packets == now).unwrap_or(false)
                }
            });
            ensure!(still, "{} kept receiving after the sender stopped", self.rx_dev);
        }
        // The ring's counter moves when a poll ends, before the stack has the poll's last
        // frames (GRO hands them over after): done once the kthread stopped running.
        ensure!(settle(&attached.napi)?, "the NAPI thread of {} kept running after the flood", self.rx_dev);
        // The CPU's load over the whole measurement (flood and drain): what the kthread's
        // time covers.
        let (elapsed, cpu1) = (start.elapsed(), cpu_busy_ns(NAPI_CPU)?);
        let (state1, ns1, sleeps1) = (self.rx_state()?, attached.napi_runtime()?, attached.napi_sleeps()?);
        let ip1 = self.ip_stats()?;
        let processed = state1.rx_packets - state0.rx_packets;
        ensure!(processed > 0, "nothing arrived on {} ({sent} sent)", self.rx_dev);
        let napi_ns = ns1 - ns0;
        let window_ns = elapsed.as_nanos() as f64;
        Ok(Measurement {
            sent,
            refused,
            processed,
            reached_ip: ip1.in_receives - ip0.in_receives,
            delivered: ip1.in_delivers - ip0.in_delivers,
            napi_ns,
            ns_per_packet: napi_ns as f64 / processed as f64,
            busy: napi_ns as f64 / window_ns,
            sleeps: sleeps1 - sleeps0,
            // The CPU counters tick at 100 Hz: a coarse estimate, clamped at 0.
            other_load: ((cpu1.saturating_sub(cpu0)) as f64 - napi_ns as f64).max(0.0) / window_ns,
        })
    }

    /// How long, in all, the bench may wait for other tasks to leave `NAPI_CPU` before it
    /// measures regardless and keeps disturbed rounds (default `QUIET_BUDGET`).
    pub fn set_quiet_budget(&self, budget: Duration) {
        self.quiet_budget.set(budget);
    }

    /// Waits until other tasks use less than `MAX_OTHER_LOAD` of `NAPI_CPU` (sampled over
    /// `QUIET_SAMPLE`); returns false once the budget is spent. The first sample is free.
    pub fn wait_quiet(&self) -> Result<bool> {
        let mut first = true;
        loop {
            let before = cpu_busy_ns(NAPI_CPU)?;
            std::thread::sleep(QUIET_SAMPLE);
            let busy = cpu_busy_ns(NAPI_CPU)?.saturating_sub(before);
            if (busy as f64) < MAX_OTHER_LOAD * QUIET_SAMPLE.as_nanos() as f64 {
                return Ok(true);
            }
            let left = self.quiet_budget.get();
            if left.is_zero() {
                return Ok(false);
            }
            if first {
                eprintln!(
                    "  other tasks load CPU {NAPI_CPU}: waiting for quiet (up to {} s)",
                    left.as_secs()
                );
                first = false;
            } else {
                self.quiet_budget.set(left.saturating_sub(QUIET_SAMPLE));
            }
        }
    }

    fn rx_state(&self) -> Result<LinkState> {
        link_state(&self.rx_nl, self.rx_ifindex)
    }

    /// The receiver namespace's IP counters (nothing but the flood reaches it).
    fn ip_stats(&self) -> Result<IpStats> {
        self.rx.enter(|| ip_stats(&fs::read_to_string("/proc/thread-self/net/snmp")?))
    }

    /// Whether any XDP program is attached to the receiving veth.
    fn rx_has_xdp(&self) -> bool {
        self.rx_state().map(|s| s.xdp_attached != XdpAttached::None).unwrap_or(true)
    }
}

/// Waits until the kthreads `pids` stop accumulating CPU time (their runtime advances at
/// every tick while they run: unchanged over a 50 ms poll means asleep, or only woken for
/// empty paced polls, which take microseconds); false after `DRAIN_TIMEOUT`.
pub(crate) fn settle(pids: &[i32]) -> Result<bool> {
    let runtime = || pids.iter().map(|pid| schedstat_runtime(*pid)).sum::<Result<u64>>();
    // `until` asks at once, then every 50 ms: the first answer has nothing to compare with.
    let mut last = None;
    Ok(wait::until(DRAIN_TIMEOUT, || {
        let now = runtime().unwrap_or(u64::MAX);
        // Paced empty polls after the flood cost a few µs each: not work.
        last.replace(now).is_some_and(|before| now.saturating_sub(before) < 200_000)
    }))
}

/// Switches the NAPI of `dev` (in `ns`) to threaded mode, paced (see `POLL_INTERVAL`; only
/// drivers that keep their wake-ups masked while a poll finds work, as veth, honour it),
/// and pins its kthread(s) to `cpu`; returns their PIDs.
pub(crate) fn threaded_napi(ns: &Netns, dev: &str, cpu: usize, paced: bool) -> Result<Vec<i32>> {
    let sys = format!("/sys/class/net/{dev}");
    let pacing = if paced {
        format!(
            "echo {NAPI_DEFER_POLLS} > {sys}/napi_defer_hard_irqs && echo {} > {sys}/gro_flush_timeout && ",
            POLL_INTERVAL.as_nanos()
        )
    } else {
        String::new()
    };
    let cmd = format!("{pacing}echo 1 > {sys}/threaded && cat {sys}/threaded");
    let out = ns.exec("sh", &["-c", &cmd])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "1",
        "enabling threaded NAPI on {dev}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let prefix = format!("napi/{dev}-");
    let mut napi = Vec::new();
    wait::until(Duration::from_secs(5), || {
        napi = napi_threads(&prefix).unwrap_or_default();
        !napi.is_empty()
    });
    ensure!(!napi.is_empty(), "no NAPI kthread {prefix}* appeared");
    let mut cpus = CpuSet::new();
    cpus.set(cpu)?;
    for pid in &napi {
        sched_setaffinity(Pid::from_raw(*pid), &cpus)
            .with_context(|| format!("pinning NAPI thread {pid}"))?;
    }
    Ok(napi)
}

/// An XDP program attached to the rig's receiving veth, with its NAPI kthread(s). Dropping
/// it detaches the program; [`Attached::detach`] also waits until the kernel is done.
pub struct Attached<'a> {
    rig: &'a Rig,
    hold: Option<Hold>,
    napi: Vec<i32>,
}

enum Hold {
    /// A BPF link this process holds: closing the fd detaches.
    Link(OwnedFd),
    /// A pinned BPF link (tailgate's way): removing the pin detaches.
    Pin(PathBuf),
}

impl Attached<'_> {
    /// Summed CPU time of the NAPI kthreads, ns (first field of schedstat: time on the CPU).
    fn napi_runtime(&self) -> Result<u64> {
        self.napi.iter().map(|pid| schedstat_runtime(*pid)).sum()
    }

    /// Summed voluntary context switches of the NAPI kthreads.
    fn napi_sleeps(&self) -> Result<u64> {
        self.napi.iter().map(|pid| voluntary_switches(*pid)).sum()
    }

    /// Detaches and waits until the device has no XDP program (removing a pinned link
    /// releases it from a workqueue, so the next attach could otherwise find it busy).
    pub fn detach(mut self) -> Result<()> {
        self.release()?;
        ensure!(
            wait::until(Duration::from_secs(5), || !self.rig.rx_has_xdp()),
            "XDP still attached to {} after detaching",
            self.rig.rx_dev
        );
        Ok(())
    }

    fn release(&mut self) -> Result<()> {
        match self.hold.take() {
            Some(Hold::Pin(pin)) => links::detach(&pin),
            Some(Hold::Link(fd)) => {
                drop(fd);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// A trivial XDP program, `r0 = <action>; exit`: the floor the subject is compared with.
/// Loaded with the raw syscall so that nothing is added to the production object.
pub struct FloorProgram {
    fd: OwnedFd,
    pub verdict: Verdict,
}

impl FloorProgram {
    pub(crate) fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    pub fn load(verdict: Verdict) -> Result<Self> {
        let mov_r0 = insn(0xb7, verdict.action() as i32); // BPF_ALU64 | BPF_MOV | BPF_K, dst r0
        let exit = insn(0x95, 0); // BPF_JMP | BPF_EXIT
        let insns = [mov_r0, exit];
        let license = c"GPL";
        let mut name = [0u8; 16];
        let tag = match verdict {
            Verdict::Pass => "tg_floor_pass",
            Verdict::Drop => "tg_floor_drop",
        };
        name[..tag.len()].copy_from_slice(tag.as_bytes());
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_XDP,
            ..Default::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &attr).context("BPF_PROG_LOAD of the floor program")?;
        Ok(Self { fd, verdict })
    }
}

/// The flood: pre-built Ethernet/IPv4/UDP frames, one per source address, sent round-robin
/// from an AF_PACKET socket in the sender namespace.
pub struct Generator {
    sock: OwnedFd,
    frames: Vec<Vec<u8>>,
    /// Where the next send starts: a slow receiver takes a few hundred frames a flood,
    /// and every source gets its turn over the floods.
    next: std::sync::atomic::AtomicUsize,
}

impl Generator {
    /// One UDP frame per address of `sources`, to the receiver.
    pub fn new(rig: &Rig, sources: &[Ipv4Addr]) -> Result<Self> {
        ensure!(!sources.is_empty(), "no source addresses");
        let frames = sources
            .iter()
            .map(|src| {
                let mut frame = Vec::with_capacity(60);
                PacketBuilder::ethernet2(TX_MAC, RX_MAC)
                    .ipv4(src.octets(), RX_IP.octets(), 64)
                    .udp(4000, RX_PORT)
                    .write(&mut frame, PAYLOAD)
                    .expect("writing to a Vec");
                frame
            })
            .collect();
        Self::with_frames(&rig.tx, &rig.tx_dev, frames)
    }

    /// Sends `frames` (whole Ethernet frames) out of `dev` of `ns`.
    pub fn with_frames(ns: &Netns, dev: &str, frames: Vec<Vec<u8>>) -> Result<Self> {
        ensure!(!frames.is_empty(), "no frames");
        let dev = dev.to_string();
        let sock = ns.enter(move || packet_socket(&dev))?;
        Ok(Self { sock, frames, next: Default::default() })
    }

    /// Sends round-robin for `window` or until `cap` frames went out, from a thread pinned
    /// to `SENDER_CPU`; returns (frames sent, calls refused because the ring was full).
    pub fn send(&self, window: Duration, cap: u64) -> Result<(u64, u64)> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut cpus = CpuSet::new();
                cpus.set(SENDER_CPU)?;
                sched_setaffinity(Pid::from_raw(0), &cpus).context("pinning the sender")?;
                self.send_loop(window, cap)
            })
            .join()
            .expect("sender thread panicked")
        })
    }

    fn send_loop(&self, window: Duration, cap: u64) -> Result<(u64, u64)> {
        let n = self.frames.len();
        let mut iov: Vec<libc::iovec> = self
            .frames
            .iter()
            .map(|f| libc::iovec { iov_base: f.as_ptr() as *mut _, iov_len: f.len() })
            .collect();
        // The iovecs once more, so that a batch starting anywhere is contiguous.
        iov.extend_from_within(..);
        // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
        let mut msgs: Vec<libc::mmsghdr> = (0..2 * n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        let (mut sent, mut refused, mut next) = (0u64, 0u64, self.next.load(Ordering::Relaxed));
        let end = Instant::now() + window;
        while sent < cap && Instant::now() < end {
            let batch = SEND_BATCH.min(n).min((cap - sent) as usize);
            // SAFETY: `msgs[next..next + batch]` is in bounds (next < n, batch <= n) and its
            // iovecs point into `self.frames`, alive for the call.
            let r = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    msgs.as_mut_ptr().add(next),
                    batch as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let err = IoError::last_os_error();
                match err.raw_os_error() {
                    // Ring full (veth stops its queue, or the socket's send buffer is
                    // full): the receiver is behind, which is what we want. Try again.
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::ENETDOWN) => refused += 1,
                    _ => return Err(anyhow!(err).context("sendmmsg on the AF_PACKET socket")),
                }
                continue;
            }
            sent += r as u64;
            next = (next + r as usize) % n;
        }
        self.next.store(next, Ordering::Relaxed);
        Ok((sent, refused))
    }
}

/// A round in which other tasks took more than this share of `NAPI_CPU` is flagged (its
/// `other_load` tells by how much).
pub const MAX_OTHER_LOAD: f64 = 0.10;
/// Default for how long a rig waits, in all, for other load to go away (see
/// [`Rig::set_quiet_budget`]).
pub const QUIET_BUDGET: Duration = Duration::from_secs(120);
/// The period over which the load of `NAPI_CPU` is sampled before a round (/proc/stat ticks
/// at 100 Hz: 25 ticks, enough to tell 10 % apart).
const QUIET_SAMPLE: Duration = Duration::from_millis(250);

/// What must become of every frame of a flood, checked after each measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Dropped by the XDP program: never reaches the IP layer.
    XdpDrop,
    /// Passed by XDP, dropped by netfilter before delivery.
    NetfilterDrop,
    /// Delivered to UDP.
    Delivered,
}

/// Checks a measurement against the fate its frames must have met: exact, since nothing but
/// the flood crosses the pair (no IPv6, no other addresses) and every frame veth took off
/// its ring went through XDP.
pub fn check(who: &str, fate: Fate, m: &Measurement) -> Result<()> {
    let (reached, delivered) = match fate {
        Fate::XdpDrop => (0, 0),
        Fate::NetfilterDrop => (m.processed, 0),
        Fate::Delivered => (m.processed, m.processed),
    };
    ensure!(
        m.reached_ip == reached && m.delivered == delivered,
        "{who}: of {} processed frames {} reached the IP layer and {} were delivered, expected \
         {reached} and {delivered} ({fate:?})",
        m.processed,
        m.reached_ip,
        m.delivered,
    );
    Ok(())
}

/// Checks that tailgate's XDP program counted every processed frame under `expected`
/// (`before`: the counter before the measurement); returns the counter after.
pub fn check_counted(dp: &Datapath, expected: Counter, before: u64, m: &Measurement) -> Result<u64> {
    let after = testrun::counters(dp)?[&expected];
    ensure!(
        after - before == m.processed,
        "tailgate counted {} packets as {} but {} were processed",
        after - before,
        expected.name(),
        m.processed,
    );
    Ok(after)
}

/// tailgate's iptables rules for a policy, installed in the receiver's namespace by the
/// backend itself (the daemon's writer: one `iptables-restore` per table); removed on drop.
pub struct IptablesRules<'a> {
    rig: &'a Rig,
    backend: Option<IptablesBackend>,
}

impl<'a> IptablesRules<'a> {
    pub fn install(rig: &'a Rig, opts: IptablesOptions, state: &DesiredState) -> Result<Self> {
        let backend = rig.rx.enter(|| {
            let mut backend = IptablesBackend::new(opts)?;
            backend.apply(state)?;
            backend.commit(state)?;
            Ok(backend)
        })?;
        Ok(Self { rig, backend: Some(backend) })
    }

    /// The iptables variant the backend writes (`nft` or `legacy`).
    pub fn variant(&self) -> &'static str {
        self.backend.as_ref().and_then(|b| b.variant()).map(|v| v.name()).unwrap_or("?")
    }

    /// Removes the rules (what dropping does, with the error reported).
    pub fn remove(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        match self.backend.take() {
            Some(backend) => self.rig.rx.enter(|| Box::new(backend).stop(false)),
            None => Ok(()),
        }
    }
}

impl Drop for IptablesRules<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    assert!(!v.is_empty(), "median of nothing");
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// A directory for pinned links, `/sys/fs/bpf/tailgate-traffic-<pid>-<n>`, removed with
/// what it holds on drop.
struct PinDir {
    path: PathBuf,
}

impl PinDir {
    fn new() -> Result<Self> {
        let path = Path::new("/sys/fs/bpf").join(crate::unique("tailgate-traffic"));
        fs::create_dir(&path).with_context(|| format!("creating {} (is bpffs mounted?)", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Only pins this rig made live here (bpffs has no nested content of ours).
        if let Ok(entries) = fs::read_dir(&self.path) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// `<tag>-<pid>-<n>`: a valid interface name (at most 15 bytes) for a short tag.
pub(crate) fn unique_ifname(tag: &str) -> String {
    let name = crate::unique(tag);
    assert!(name.len() <= 15, "interface name {name} too long");
    name
}

/// Threads whose name starts with `prefix`. Kernel thread names are shown in full in
/// /proc/<pid>/comm since 6.x; an older kernel cuts them at 15 bytes, then the cut prefix
/// is what can be compared.
fn napi_threads(prefix: &str) -> Result<Vec<i32>> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else { continue };
        let comm = comm.trim_end();
        let cut = &prefix[..prefix.len().min(15)];
        if comm.starts_with(prefix) || (comm.len() == 15 && comm.starts_with(cut)) {
            found.push(pid);
        }
    }
    Ok(found)
}

pub(crate) fn schedstat_runtime(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/task/{pid}/schedstat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path} (NAPI thread gone?)"))?;
    let first = text.split_whitespace().next().ok_or_else(|| anyhow!("empty {path}"))?;
    Ok(first.parse()?)
}

pub(crate) fn voluntary_switches(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/task/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path} (NAPI thread gone?)"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .ok_or_else(|| anyhow!("no voluntary_ctxt_switches in {path}"))?;
    Ok(line.trim().parse()?)
}

/// Time `cpu` was not idle since boot, ns (/proc/stat, in USER_HZ ticks).
pub(crate) fn cpu_busy_ns(cpu: usize) -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let tag = format!("cpu{cpu} ");
    let line = stat.lines().find(|l| l.starts_with(&tag)).ok_or_else(|| anyhow!("no {tag}in /proc/stat"))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse()).collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    // already in user. Steal counts as busy: the hypervisor ran something else there.
    let busy: u64 =
        ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(busy * 1_000_000_000 / hz)
}

pub(crate) fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name).with_context(|| format!("no device {name}"))
}

// --- bpf(2) -------------------------------------------------------------------------------

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`: BPF_XDP.
const BPF_XDP: u32 = 37;
/// XDP_FLAGS_DRV_MODE: native mode or failure, never a silent fallback to generic.
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The BPF_PROG_LOAD part of `union bpf_attr` (the kernel zero-fills the rest).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The BPF_LINK_CREATE part of `union bpf_attr`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// One eBPF instruction (opcode, registers 0, imm).
fn insn(code: u8, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[4..].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

fn bpf<T>(cmd: libc::c_long, attr: &T) -> Result<OwnedFd> {
    // SAFETY: `attr` is a repr(C) prefix of `union bpf_attr` of the given size; pointers in
    // it outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>() as u32) };
    if r < 0 {
        return Err(IoError::last_os_error().into());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Attaches `prog` to `ifindex` (of the calling thread's namespace) in native mode as a BPF
/// link.
pub(crate) fn xdp_link_create(prog: i32, ifindex: u32) -> Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    bpf(BPF_LINK_CREATE, &attr).context("BPF_LINK_CREATE (XDP, native mode)")
}

// --- AF_PACKET ----------------------------------------------------------------------------

const PACKET_QDISC_BYPASS: libc::c_int = 20;

/// A raw packet socket bound to `dev` for sending only (protocol 0: it receives nothing).
pub(crate) fn packet_socket(dev: &str) -> Result<OwnedFd> {
    let ifindex = ifindex(dev)?;
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(IoError::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // Straight to the driver: no qdisc layer (veth has none anyway, but the noqueue path
    // logs "Virtual device asks to queue packet" when the ring stops the queue).
    setsockopt_int(&sock, libc::SOL_PACKET, PACKET_QDISC_BYPASS, 1).context("PACKET_QDISC_BYPASS")?;
    // Frames sit in veth's ring charged to this socket until the receiver takes them.
    setsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 16 << 20).context("SO_SNDBUFFORCE")?;
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(IoError::last_os_error()).with_context(|| format!("binding to {dev}"));
    }
    Ok(sock)
}

fn setsockopt_int(sock: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> Result<()> {
    // SAFETY: an int option of the size given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        )
    };
    if r < 0 {
        return Err(IoError::last_os_error().into());
    }
    Ok(())
}

// --- rtnetlink ----------------------------------------------------------------------------

/// What the receiving veth reports over rtnetlink.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkState {
    /// veth with XDP attached (6.18): the frames its NAPI poll took off the ring, whatever
    /// the program returned. `veth_xdp_rcv` adds every consumed frame to the queue's
    /// `xdp_packets` (what `ethtool -S` shows as `rx_queue_<n>_xdp_packets`; ethtool is not
    /// needed here) and `veth_get_stats64` reports their sum as `rx_packets`, plus the
    /// peer's software tx counters, which only move while NAPI is off. So XDP_DROP frames
    /// are included (`xdp_drops` counts them again separately, only in ethtool), and frames
    /// the sender could not put into the full ring are not: veth stops the peer's queue
    /// (backpressure) and the sender is refused, or, without backpressure, counts them in
    /// the peer's `tx_dropped`. Checked by the bench: tailgate's counters grow by exactly
    /// this number, for drops and passes.
    pub rx_packets: u64,
    /// Frames the device sent, and those it dropped on the way out (a TUN device nobody
    /// reads drops what its queue cannot hold).
    pub tx_packets: u64,
    pub tx_dropped: u64,
    /// How XDP is attached (IFLA_XDP_ATTACHED).
    pub xdp_attached: XdpAttached,
}

/// The IP counters of /proc/net/snmp the checks need.
#[derive(Clone, Copy, Debug, Default)]
struct IpStats {
    in_receives: u64,
    in_delivers: u64,
}

/// Reads `Ip: InReceives` and `InDelivers` from the text of /proc/net/snmp (a header line of
/// names, then a line of values).
fn ip_stats(snmp: &str) -> Result<IpStats> {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip: "));
    let (names, values) = (lines.next(), lines.next());
    let (Some(names), Some(values)) = (names, values) else { bail!("no Ip: lines in /proc/net/snmp") };
    let field = |want: &str| -> Result<u64> {
        let at =
            names.split_whitespace().position(|n| n == want).with_context(|| format!("no Ip: {want}"))?;
        Ok(values.split_whitespace().nth(at).with_context(|| format!("no value for Ip: {want}"))?.parse()?)
    };
    Ok(IpStats { in_receives: field("InReceives")?, in_delivers: field("InDelivers")? })
}

/// An rtnetlink socket of the namespace it is created in (the same crates as the daemon's
/// `netdev`).
pub(crate) fn netlink_socket() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("rtnetlink socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// RTM_GETLINK for one device: its 64-bit counters and XDP attachment mode.
pub(crate) fn link_state(socket: &Socket, ifindex: u32) -> Result<LinkState> {
    let mut link = LinkMessage::default();
    link.header.index = ifindex;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(link)),
    );
    request.header.flags = NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).context("RTM_GETLINK")?;
    let (data, _) = socket.recv_from_full().context("RTM_GETLINK reply")?;
    let reply: NetlinkMessage<RouteNetlinkMessage> =
        NetlinkMessage::deserialize(&data).map_err(|e| anyhow!("bad rtnetlink reply: {e}"))?;
    let link = match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => link,
        NetlinkPayload::Error(e) => bail!("RTM_GETLINK: {e:?}"),
        other => bail!("unexpected rtnetlink reply {other:?}"),
    };
    let stats = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Stats64(stats) => Some(stats),
            _ => None,
        })
        .context("no IFLA_STATS64 in the reply")?;
    let xdp_attached = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                LinkXdp::Attached(mode) => Some(*mode),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or(XdpAttached::None);
    Ok(LinkState {
        rx_packets: stats.rx_packets,
        tx_packets: stats.tx_packets,
        tx_dropped: stats.tx_dropped,
        xdp_attached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode() {
        // r0 = 2; exit — as `llvm-objdump` shows them: b7 00 00 00 02 00 00 00, 95 00 ...
        assert_eq!(insn(0xb7, 2).to_le_bytes(), [0xb7, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(insn(0x95, 0).to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn snmp_ip_counters() {
        let text = "Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers\nIp: 2 64 1234 0 0 0 0 0 1200\nIcmp: InMsgs\nIcmp: 0\n";
        let s = ip_stats(text).unwrap();
        assert_eq!((s.in_receives, s.in_delivers), (1234, 1200));
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
    }
}
