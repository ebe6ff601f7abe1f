//! A paced UDP flood between namespaces, counted per source on both ends: what was sent,
//! and what arrived. Bounded in rate, count and time.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;
use nix::sys::socket::{setsockopt, sockopt::RcvBufForce};

use crate::{netns::Netns, wait};

/// Packets per source per tick of 1 ms.
const TICK: Duration = Duration::from_millis(1);

type Counts = Arc<Mutex<HashMap<IpAddr, u64>>>;

/// Counts UDP datagrams arriving on a port, per source.
pub struct Receiver {
    counts: Counts,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on `port` (all addresses) inside `ns`.
    pub fn listen(ns: &Netns, port: u16) -> Result<Self> {
        let sock = ns.enter(move || Ok(UdpSocket::bind(("0.0.0.0", port))?))?;
        // A large buffer: the reader must not lose what the datapath let through while the
        // daemon keeps both cores busy.
        setsockopt(&sock, RcvBufForce, &(32 << 20))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let counts = Counts::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (counts, stop) = (counts.clone(), stop.clone());
            move || {
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = sock.recv_from(&mut buf) {
                        *counts.lock().unwrap().entry(from.ip()).or_default() += 1;
                    }
                }
            }
        });
        Ok(Self { counts, stop, thread: Some(thread) })
    }

    pub fn counts(&self) -> HashMap<IpAddr, u64> {
        self.counts.lock().unwrap().clone()
    }

    /// Waits (up to 5 s) until at least `want` datagrams from `src` arrived; returns the count.
    pub fn wait_for(&self, src: IpAddr, want: u64) -> u64 {
        wait::until(Duration::from_secs(5), || self.counts().get(&src).copied().unwrap_or(0) >= want);
        self.counts().get(&src).copied().unwrap_or(0)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends from every source in turn, `per_tick` datagrams each per millisecond, until stopped
/// or `limit` (a total count or a duration) is reached.
pub struct Flood {
    sent: Counts,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Flood {
    /// Starts sending from `sources` (addresses of `ns`) to `dst:port`.
    pub fn start(
        ns: &Netns,
        sources: &[&str],
        dst: &str,
        port: u16,
        per_tick: u32,
        limit: Duration,
    ) -> Result<Self> {
        let dst: SocketAddr = format!("{dst}:{port}").parse()?;
        let socks: Vec<(IpAddr, UdpSocket)> = sources
            .iter()
            .map(|src| {
                let addr: IpAddr = src.parse()?;
                Ok((addr, ns.enter(move || Ok(UdpSocket::bind((addr, 0))?))?))
            })
            .collect::<Result<_>>()?;
        let sent = Counts::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (sent, stop) = (sent.clone(), stop.clone());
            move || {
                let end = Instant::now() + limit;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    for (src, sock) in &socks {
                        let mut n = 0;
                        for _ in 0..per_tick {
                            if sock.send_to(b"tailgate flood", dst).is_ok() {
                                n += 1;
                            }
                        }
                        *sent.lock().unwrap().entry(*src).or_default() += n;
                    }
                    std::thread::sleep(TICK);
                }
            }
        });
        Ok(Self { sent, stop, thread: Some(thread) })
    }

    /// Stops and returns what was sent, per source.
    pub fn stop(mut self) -> HashMap<IpAddr, u64> {
        self.halt();
        self.sent.lock().unwrap().clone()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}
