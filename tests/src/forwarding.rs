//! Forwarding through a gateway under real traffic: a TUN device (the tunnel) and a veth to
//! a LAN host, in a namespace of their own; tailnet clients' TCP segments written into the
//! tunnel are forwarded to the LAN host (marked, MSS-checked, masqueraded by tailgate), and
//! the LAN host's answers are forwarded back into the tunnel.
//!
//! The CPU a direction costs the gateway is the runtime of the NAPI kthread that receives
//! it, with everything that follows in the same context (this kernel does not account
//! softirq time apart): tunnel → LAN, the TUN device's NAPI (`IFF_NAPI`: a write queues the
//! packet and schedules the poll, which runs GRO, tailgate's tunnel ingress program,
//! routing, netfilter, the uplink's egress programs and the veth transmit); LAN → tunnel,
//! the uplink veth's NAPI (present while XDP is attached: tailgate's program, or the
//! trivial passing one for the other ways), then the reverse translation, routing, the
//! tunnel's egress program and the TUN device's queue (nobody reads it: what it cannot hold
//! is dropped and counted, as a slow reader would). Both kthreads are pinned to `NAPI_CPU`,
//! and so is the LAN host's own receive (an XDP_DROP program with its own threaded NAPI,
//! whose CPU time is not the gateway's); the writers run on `SENDER_CPU`. The TUN device's
//! poll cannot be paced (every write schedules it): its wake-ups are in its figures, and
//! `Sample::sleeps` tells how many.
//!
//! Every measurement is checked: tunnel → LAN, the uplink sent (or, its peer's ring full,
//! dropped) exactly what was written, and the BPF backend marked and masqueraded each; LAN → tunnel, the tunnel device sent or dropped exactly what the uplink took
//! off its ring, which it only does when the masquerade translated the answer back (an
//! answer to the gateway's address that is not translated is delivered to the gateway).

use std::{
    fs::{File, OpenOptions},
    io::Error as IoError,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    os::unix::fs::OpenOptionsExt,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use etherparse::PacketBuilder;
use netlink_sys::Socket;
use nix::{
    sched::{sched_setaffinity, CpuSet},
    unistd::Pid,
};

use crate::{
    daemon::{Daemon, PinDir},
    netns::{self, Netns},
    traffic::{
        self, cpu_busy_ns, ifindex, link_state, netlink_socket, schedstat_runtime, settle, threaded_napi,
        unique_ifname, voluntary_switches, xdp_link_create, FloorProgram, Generator, Verdict, NAPI_CPU,
        SENDER_CPU,
    },
    wait,
};

/// Tailnet clients: one flow each, from 100.64.16.0 up, source ports from 61,000 up (inside
/// the masquerade's port range and distinct: both NATs keep them, so answers are built
/// without asking the NAT).
pub const FLOWS: usize = 4_096;
const CLIENT_PORT: u16 = 61_000;
const CLIENTS: Ipv4Addr = Ipv4Addr::new(100, 64, 16, 0);
const GATEWAY_LAN: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const SERVER_PORT: u16 = 80;
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x77, 0x02];
/// Segment payload: a 40 + 24 = 64-byte IP packet.
const PAYLOAD: &[u8] = b"tailgate forwarding test";
/// What the TUN device may hold of written packets not yet taken by its poll: the writer
/// is refused beyond (`TUNSETSNDBUF`), as veth's full ring refuses a sender.
const TUN_SNDBUF: libc::c_int = 512 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NAPI: libc::c_short = 0x0010;
const IFF_NO_PI: libc::c_short = 0x1000;
nix::ioctl_write_int!(tunsetiff, b'T', 202);
nix::ioctl_write_ptr!(tunsetsndbuf, b'T', 212, libc::c_int);

/// How the gateway forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Way {
    /// The kernel alone: no tailgate, no mark, no clamp, no masquerade (answers go to the
    /// clients' addresses).
    Plain,
    Bpf,
    Iptables,
}

impl Way {
    pub const ALL: [Way; 3] = [Way::Plain, Way::Bpf, Way::Iptables];

    pub fn name(self) -> &'static str {
        match self {
            Way::Plain => "kernel forwarding, no tailgate",
            Way::Bpf => "tailgate BPF",
            Way::Iptables => "tailgate iptables",
        }
    }
}

/// The direction of a flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    TunnelToLan,
    LanToTunnel,
}

/// One flood through the gateway.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Packets the gateway forwarded (all that entered: checked).
    pub packets: u64,
    /// CPU time of the receiving NAPI kthread, ns.
    pub napi_ns: u64,
    pub ns_per_packet: f64,
    /// Packets per second of the window (the sender's pace when the gateway keeps up).
    pub pps: f64,
    /// Share of the window the kthread was on the CPU (near 1: the gateway was the limit).
    pub busy: f64,
    /// Times the kthread slept with nothing to do.
    pub sleeps: u64,
    /// Share of the window `NAPI_CPU` spent on other tasks.
    pub other_load: f64,
}

/// The gateway namespace (TUN device, uplink veth) and the LAN host's namespace. Dropping it
/// stops what runs there and removes both namespaces.
pub struct Gateway {
    // Drop order: the LAN host's XDP link and the TUN device, then the pin dir (its drop
    // runs `tailgate cleanup` in the gateway namespace), then the namespaces.
    /// Held: closing it detaches the LAN host's program.
    _host_xdp: OwnedFd,
    tun: File,
    pins: PinDir,
    gw: Netns,
    lan: Netns,
    tun_dev: String,
    uplink: String,
    uplink_ifindex: u32,
    tun_ifindex: u32,
    gw_nl: Socket,
    tun_napi: Vec<i32>,
    host_napi: Vec<i32>,
    host: String,
    /// One packet per flow, as the tunnel delivers them (raw IP).
    segments: Vec<Vec<u8>>,
}

impl Gateway {
    pub fn new(host_floor: &FloorProgram) -> Result<Self> {
        ensure!(host_floor.verdict == Verdict::Drop, "the LAN host drops what it receives");
        let gw = Netns::new("tgfgw")?;
        let lan = Netns::new("tgflan")?;
        for ns in [&gw, &lan] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        }
        gw.sysctl("net.ipv4.ip_forward", "1")?;
        // Kthreads are found by name among the host's: the names must be unique there.
        let (uplink, host, tun_dev) = (unique_ifname("tgfu"), unique_ifname("tgfh"), unique_ifname("tgft"));
        netns::veth(&gw, &uplink, &lan, &host)?;
        let mac = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        gw.ip(&["link", "set", "dev", &uplink, "address", &mac(GATEWAY_MAC)])?;
        lan.ip(&["link", "set", "dev", &host, "address", &mac(HOST_MAC)])?;
        gw.ip(&["addr", "add", &format!("{GATEWAY_LAN}/24"), "dev", &uplink])?;
        lan.ip(&["addr", "add", &format!("{HOST}/24"), "dev", &host])?;
        // No ARP on the way: the neighbours are known.
        gw.ip(&[
            "neigh",
            "replace",
            &HOST.to_string(),
            "lladdr",
            &mac(HOST_MAC),
            "dev",
            &uplink,
            "nud",
            "permanent",
        ])?;
        let tun_name = tun_dev.clone();
        let tun = gw.enter(move || open_tun(&tun_name))?;
        gw.ip(&["link", "set", &tun_dev, "up"])?;
        gw.ip(&["addr", "add", "100.100.100.1/32", "dev", &tun_dev])?;
        gw.ip(&["route", "add", "100.64.0.0/10", "dev", &tun_dev])?;
        let names = (uplink.clone(), tun_dev.clone());
        let (uplink_ifindex, tun_ifindex, gw_nl) =
            gw.enter(move || Ok((ifindex(&names.0)?, ifindex(&names.1)?, netlink_socket()?)))?;
        let (name, prog) = (host.clone(), host_floor.fd());
        let host_xdp = lan.enter(move || xdp_link_create(prog, ifindex(&name)?))?;
        // The LAN host's receive runs on the gateway's CPU, in a kthread of its own (not
        // counted for the gateway): the writer keeps CPU 0 to itself, and waking the host's
        // poll is a wake-up on the same CPU.
        let host_napi = threaded_napi(&lan, &host, NAPI_CPU, false)?;
        let tun_napi = threaded_napi(&gw, &tun_dev, NAPI_CPU, false)?;
        let pins = PinDir::new(&gw);
        let segments = (0..FLOWS).map(|i| segment(client(i), HOST, client_port(i), SERVER_PORT)).collect();
        Ok(Self {
            _host_xdp: host_xdp,
            tun,
            pins,
            gw,
            lan,
            tun_dev,
            uplink,
            uplink_ifindex,
            tun_ifindex,
            gw_nl,
            tun_napi,
            host_napi,
            host,
            segments,
        })
    }

    /// Starts forwarding `way`: the daemon with the BPF or iptables backend (default config:
    /// mark, MSS clamp to the tunnel's MTU, masquerade), or nothing; then sends every flow's
    /// first segment through, so the floods measure established flows.
    pub fn run(&self, way: Way, passing: &FloorProgram) -> Result<Running<'_>> {
        let config = |backend: &str| {
            format!(
                "tunnel = \"{}\"\ninterfaces = [\"{}\"]\nbackend = \"{backend}\"\n",
                self.tun_dev, self.uplink
            )
        };
        let (daemon, floor) = match way {
            Way::Plain => (None, Some(self.attach_floor(passing)?)),
            Way::Iptables => (
                Some(Daemon::start(&self.gw, &self.pins, &config("iptables"))?),
                Some(self.attach_floor(passing)?),
            ),
            Way::Bpf => (Some(Daemon::start(&self.gw, &self.pins, &config("bpf"))?), None),
        };
        // The uplink's NAPI exists while XDP is attached (a new kthread each time).
        let uplink_napi = threaded_napi(&self.gw, &self.uplink, NAPI_CPU, true)?;
        let running = Running { gw: self, way, daemon, floor, uplink_napi };
        running.warm_up()?;
        Ok(running)
    }

    fn attach_floor(&self, floor: &FloorProgram) -> Result<OwnedFd> {
        let (prog, index) = (floor.fd(), self.uplink_ifindex);
        self.gw.enter(move || xdp_link_create(prog, index))
    }

    /// The LAN host's answers to every flow, as Ethernet frames to the gateway: to the
    /// masqueraded address, or (`Way::Plain`) to the clients themselves.
    pub fn answers(&self, way: Way) -> Result<Generator> {
        let frames = (0..FLOWS)
            .map(|i| {
                let dst = if way == Way::Plain { client(i) } else { GATEWAY_LAN };
                let mut frame = Vec::with_capacity(14 + 64);
                frame.extend_from_slice(&GATEWAY_MAC);
                frame.extend_from_slice(&HOST_MAC);
                frame.extend_from_slice(&[0x08, 0x00]);
                frame.extend_from_slice(&segment(HOST, dst, SERVER_PORT, client_port(i)));
                frame
            })
            .collect();
        Generator::with_frames(&self.lan, &self.host, frames)
    }

    /// What the uplink sent or dropped on the way out: the gateway's part ends there (the
    /// LAN host's ring overflows when its CPU, shared with the writer, falls behind; the
    /// frame was forwarded all the same).
    fn uplink_out(&self) -> Result<u64> {
        let s = link_state(&self.gw_nl, self.uplink_ifindex)?;
        Ok(s.tx_packets + s.tx_dropped)
    }

    fn uplink_rx(&self) -> Result<u64> {
        Ok(link_state(&self.gw_nl, self.uplink_ifindex)?.rx_packets)
    }

    /// What the tunnel device sent (its reader took) or dropped (its queue full) on the way
    /// out.
    fn tunnel_out(&self) -> Result<u64> {
        let s = link_state(&self.gw_nl, self.tun_ifindex)?;
        Ok(s.tx_packets + s.tx_dropped)
    }
}

/// A way of forwarding in force; stopped on drop.
pub struct Running<'a> {
    gw: &'a Gateway,
    way: Way,
    daemon: Option<Daemon>,
    floor: Option<OwnedFd>,
    uplink_napi: Vec<i32>,
}

impl Running<'_> {
    /// Every flow's first segment, until all left by the uplink.
    fn warm_up(&self) -> Result<()> {
        let before = self.gw.uplink_out()?;
        for segment in &self.gw.segments {
            write_all(&self.gw.tun, segment)?;
        }
        let arrived = wait::until(Duration::from_secs(10), || {
            self.gw.uplink_out().map(|n| n - before >= FLOWS as u64).unwrap_or(false)
        });
        if !arrived {
            let show = |ns: &Netns| {
                ns.exec("ip", &["-s", "link"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            bail!(
                "{}: the flows' first segments did not all leave by the uplink ({} of {FLOWS})\ngateway:\n{}\nLAN:\n{}",
                self.way.name(),
                self.gw.uplink_out()? - before,
                show(&self.gw.gw),
                show(&self.gw.lan)
            );
        }
        Ok(())
    }

    /// Tunnel → LAN: writes the flows' segments round-robin into the tunnel for `window`.
    pub fn tunnel_to_lan(&self, window: Duration) -> Result<Sample> {
        let counted = |name: &str| self.counter(name);
        let (marked0, masqueraded0) = (counted("tunnel_in_marked")?, counted("masqueraded")?);
        let out0 = self.gw.uplink_out()?;
        let (written, sample) = self.measured(
            &self.gw.tun_napi,
            || pinned(|| write_loop(&self.gw.tun, &self.gw.segments, window)),
            |written| self.gw.uplink_out().map(|n| n - out0 >= written).unwrap_or(false),
        )?;
        let out = self.gw.uplink_out()? - out0;
        ensure!(
            out == written,
            "{}: {written} segments written into the tunnel, {out} left by the uplink",
            self.way.name()
        );
        // The BPF backend counts what it did to each segment (the iptables backend's part
        // is proven by the way back: answers reach the tunnel only when un-NATed).
        let (marked, masqueraded) =
            (counted("tunnel_in_marked")? - marked0, counted("masqueraded")? - masqueraded0);
        ensure!(
            self.way != Way::Bpf || (marked == written && masqueraded == written),
            "tailgate marked {marked} and masqueraded {masqueraded} of {written} segments"
        );
        Ok(sample)
    }

    /// LAN → tunnel: the LAN host's answers from `answers` for `window`.
    pub fn lan_to_tunnel(&self, answers: &Generator, window: Duration) -> Result<Sample> {
        drain(&self.gw.tun);
        let (rx0, out0) = (self.gw.uplink_rx()?, self.gw.tunnel_out()?);
        // The answers queued for the tunnel's reader count as sent once read: read them.
        let (sent, sample) = self.measured(
            &self.uplink_napi,
            || Ok(answers.send(window, u64::MAX)?.0),
            |sent| {
                self.gw.uplink_rx().map(|n| n - rx0 >= sent).unwrap_or(false) && {
                    drain(&self.gw.tun);
                    self.gw.tunnel_out().map(|n| n - out0 >= sent).unwrap_or(false)
                }
            },
        )?;
        let (taken, out) = (self.gw.uplink_rx()? - rx0, self.gw.tunnel_out()? - out0);
        ensure!(
            taken == sent && out == sent,
            "{}: the LAN host sent {sent} answers, the gateway took {taken} and passed {out} to the tunnel",
            self.way.name()
        );
        Ok(sample)
    }

    /// Runs `flood` (it returns how many packets it sent), waits until `through` says they
    /// all went through and the kthreads `napi` are idle again; their CPU time per packet,
    /// over the whole measurement (flood and drain).
    fn measured(
        &self,
        napi: &[i32],
        flood: impl FnOnce() -> Result<u64>,
        mut through: impl FnMut(u64) -> bool,
    ) -> Result<(u64, Sample)> {
        ensure!(settle(napi)?, "{}: the NAPI thread was busy before the flood", self.way.name());
        let (napi0, sleeps0, host0, cpu0) =
            (runtime(napi)?, sleeps(napi)?, runtime(&self.gw.host_napi)?, cpu_busy_ns(NAPI_CPU)?);
        let start = Instant::now();
        let packets = flood()?;
        let all = wait::until(DRAIN_TIMEOUT, || through(packets));
        ensure!(all, "{}: not all of {packets} packets went through", self.way.name());
        ensure!(settle(napi)?, "{}: the NAPI thread kept running", self.way.name());
        let (elapsed, cpu1) = (start.elapsed(), cpu_busy_ns(NAPI_CPU)?);
        let napi_ns = runtime(napi)? - napi0;
        // The LAN host's receive shares the CPU (see `Gateway::new`): not another load.
        let host_ns = runtime(&self.gw.host_napi)? - host0;
        let window = elapsed.as_nanos() as f64;
        Ok((
            packets,
            Sample {
                packets,
                napi_ns,
                ns_per_packet: napi_ns as f64 / packets.max(1) as f64,
                pps: packets as f64 / elapsed.as_secs_f64(),
                busy: napi_ns as f64 / window,
                sleeps: sleeps(napi)? - sleeps0,
                other_load: (cpu1.saturating_sub(cpu0) as f64 - napi_ns as f64 - host_ns as f64).max(0.0)
                    / window,
            },
        ))
    }

    /// A counter of the BPF backend (`tailgate status`); 0 for the other ways.
    fn counter(&self, name: &str) -> Result<u64> {
        if self.way != Way::Bpf {
            return Ok(0);
        }
        let status = crate::daemon::status(&self.gw.gw, &self.gw.pins);
        status["counters"][name].as_u64().with_context(|| format!("no counter {name} in status: {status}"))
    }

    /// Stops the daemon (or detaches the passing program) and waits until the uplink has no
    /// XDP program left.
    pub fn stop(mut self) -> Result<()> {
        self.release()?;
        let gw = self.gw;
        ensure!(
            wait::until(Duration::from_secs(10), || {
                link_state(&gw.gw_nl, gw.uplink_ifindex)
                    .map(|s| s.xdp_attached == netlink_packet_route::link::XdpAttached::None)
                    .unwrap_or(false)
            }),
            "XDP still attached to {} after stopping {}",
            gw.uplink,
            self.way.name()
        );
        Ok(())
    }

    fn release(&mut self) -> Result<()> {
        self.floor = None;
        if let Some(mut daemon) = self.daemon.take() {
            let code = daemon.stop();
            if code != Some(0) {
                bail!("the daemon ({}) exited with {code:?}; its log:\n{}", self.way.name(), daemon.log());
            }
        }
        Ok(())
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

fn client(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(CLIENTS) + i as u32)
}

fn client_port(i: usize) -> u16 {
    CLIENT_PORT + i as u16
}

/// A TCP segment of an established connection (ACK, PSH, 24 bytes of data), raw IP.
fn segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut packet = Vec::with_capacity(64);
    PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1_000, 64_000)
        .ack(1_000)
        .psh()
        .write(&mut packet, PAYLOAD)
        .expect("writing to a Vec");
    packet
}

fn runtime(pids: &[i32]) -> Result<u64> {
    pids.iter().map(|pid| schedstat_runtime(*pid)).sum()
}

fn sleeps(pids: &[i32]) -> Result<u64> {
    pids.iter().map(|pid| voluntary_switches(*pid)).sum()
}

/// Runs `f` on a thread pinned to `SENDER_CPU`.
fn pinned<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut cpus = CpuSet::new();
            cpus.set(SENDER_CPU)?;
            sched_setaffinity(Pid::from_raw(0), &cpus).context("pinning the writer")?;
            f()
        })
        .join()
        .expect("writer thread panicked")
    })
}

/// Writes `packets` round-robin into the TUN device for `window`; returns how many went in
/// (a write the device refuses, its queue full, is retried).
fn write_loop(tun: &File, packets: &[Vec<u8>], window: Duration) -> Result<u64> {
    let (mut written, mut next) = (0u64, 0usize);
    let end = Instant::now() + window;
    while Instant::now() < end {
        if try_write(tun, &packets[next])? {
            written += 1;
            next = (next + 1) % packets.len();
        }
    }
    Ok(written)
}

/// One packet into the TUN device, waiting while its queue is full.
fn write_all(tun: &File, packet: &[u8]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !try_write(tun, packet)? {
        ensure!(Instant::now() < deadline, "the TUN device refused writes for 5 s");
        std::thread::yield_now();
    }
    Ok(())
}

/// false: refused for now (queue full).
fn try_write(tun: &File, packet: &[u8]) -> Result<bool> {
    // SAFETY: a write of a buffer of the length given to an open fd.
    let r = unsafe { libc::write(tun.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    if r < 0 {
        let err = IoError::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOBUFS) => Ok(false),
            _ => Err(anyhow!(err).context("writing to the TUN device")),
        };
    }
    ensure!(r as usize == packet.len(), "short write to the TUN device");
    Ok(true)
}

/// Reads what the TUN device queued for its reader until nothing is left.
fn drain(tun: &File) {
    let mut buf = [0u8; 2048];
    // SAFETY: a read into a buffer of the length given from an open, non-blocking fd.
    while unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

/// Creates TUN device `name` (raw IP, NAPI mode, non-blocking) in the calling thread's
/// namespace, with a bounded send buffer.
fn open_tun(name: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI | IFF_NAPI;
    // SAFETY: TUNSETIFF with a valid ifreq; TUNSETSNDBUF with a valid int.
    unsafe { tunsetiff(file.as_raw_fd(), &req as *const _ as u64) }.context("TUNSETIFF (IFF_NAPI)")?;
    unsafe { tunsetsndbuf(file.as_raw_fd(), &TUN_SNDBUF) }.context("TUNSETSNDBUF")?;
    Ok(file)
}

/// Medians of samples.
pub fn median(samples: &[Sample], f: fn(&Sample) -> f64) -> f64 {
    traffic::median(samples.iter().map(f))
}
