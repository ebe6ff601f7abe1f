//! Restarts and upgrades without losing packets (`keep_datapath = true`): a paced flood
//! from a source the policy drops and one it passes runs across stops and starts, a
//! `kill -9` and a start, and (BPF) a start over pins of another layout; every packet of the
//! passed source arrives, none of the dropped one. A masqueraded flow keeps its translation
//! across a restart (its flow-table entries are pinned; iptables: conntrack), and the
//! layout change's cost to flows is measured: they are forgotten and open anew.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use aya::maps::{Array, MapData};
use nix::sys::signal::Signal;
use tailgate_abi::layout;
use tailgate_tests::{
    daemon::{attachments, status, Daemon, PinDir},
    flood::{Flood, Receiver},
    netns::Netns,
    on_both_backends, tailnet,
    topology::{config, Topology, GW_LAN},
    wait,
};

on_both_backends!(a_restart_and_a_kill_9_lose_nothing, a_masqueraded_flow_keeps_its_port_across_a_restart);

/// Dropped (a CGNAT source) and passed (exempted) at the uplink.
const DROPPED: &str = "100.100.1.1";
const PASSED: &str = "100.101.1.1";
const PORT: u16 = 7071;

fn kept(backend: &str) -> String {
    format!("keep_datapath = true\n{}", config(backend, &format!("allow = [\"{PASSED}/32\"]")))
}

/// How each restart goes.
#[derive(Debug, Clone, Copy)]
enum Restart {
    /// SIGTERM (the datapath stays), then a new start that takes it over.
    Stop,
    /// SIGKILL, then a new start.
    Kill,
    /// SIGTERM, the pins made to look like another layout's, then a new start (BPF: every
    /// map rebuilt from the config, the links switched to the new programs).
    OtherLayout,
}

fn restart(t: &Topology, daemon: &mut Daemon, backend: &str, how: Restart) -> Daemon {
    match how {
        Restart::Stop | Restart::OtherLayout => assert_eq!(daemon.stop(), Some(0), "{}", daemon.log()),
        Restart::Kill => {
            daemon.signal(Signal::SIGKILL).unwrap();
            assert!(wait::until(Duration::from_secs(5), || !daemon.alive()));
        }
    }
    if let Restart::OtherLayout = how {
        other_layout(&t.pins);
    }
    Daemon::start(&t.gw, &t.pins, &kept(backend)).unwrap()
}

/// Marks the pins as a layout this version does not know (a downgrade's view of an upgrade):
/// the next start rebuilds every map.
fn other_layout(pins: &PinDir) {
    let path = pins.path().join("maps").join(layout::MAP);
    let mut meta: Array<MapData, u32> =
        Array::try_from(aya::maps::Map::Array(MapData::from_pin(&path).unwrap())).unwrap();
    meta.set(0, layout::VERSION + 1000, 0).unwrap();
}

fn a_restart_and_a_kill_9_lose_nothing(backend: &str) {
    let t = Topology::new().unwrap();
    for src in [DROPPED, PASSED] {
        t.lan.ip(&["addr", "add", &format!("{src}/32"), "dev", "eth0"]).unwrap();
    }
    let receiver = Receiver::listen(&t.gw, PORT).unwrap();
    let mut daemon = Daemon::start(&t.gw, &t.pins, &kept(backend)).unwrap();
    let before = status(&t.gw, &t.pins);
    let flood = Flood::start(&t.lan, &[DROPPED, PASSED], GW_LAN, PORT, 2, Duration::from_secs(60)).unwrap();
    let mut plan = vec![Restart::Stop, Restart::Kill, Restart::Stop];
    if backend == "bpf" {
        plan.push(Restart::OtherLayout);
    }
    for how in plan {
        // Some traffic between restarts.
        let (passed, so_far) = (PASSED.parse().unwrap(), receiver.counts());
        let base = so_far.get(&passed).copied().unwrap_or(0);
        assert!(wait::until(Duration::from_secs(5), || receiver.counts().get(&passed).copied().unwrap_or(0)
            > base + 200));
        daemon = restart(&t, &mut daemon, backend, how);
        if backend == "bpf" {
            assert_eq!(
                attachments(&status(&t.gw, &t.pins)),
                attachments(&before),
                "after {how:?}: the same links, once each"
            );
        }
    }
    let sent = flood.stop();
    let (pass, drop): (IpAddr, IpAddr) = (PASSED.parse().unwrap(), DROPPED.parse().unwrap());
    let arrived = receiver.wait_for(pass, sent[&pass]);
    let counts = receiver.counts();
    println!("{backend}: sent {sent:?}, received {counts:?}");
    assert!(sent[&pass] > 1_000 && sent[&drop] > 1_000, "the flood ran: {sent:?}");
    assert_eq!(counts.get(&drop).copied().unwrap_or(0), 0, "leaked: the policy was not in force throughout");
    assert_eq!(arrived, sent[&pass], "lost packets of the passed source\n{}", daemon.log());
    if backend == "bpf" {
        // Counters outlive restarts and kill -9 (the layout change rebuilt them last, so
        // they count from there on).
        let after = status(&t.gw, &t.pins);
        let drops = after["counters"]["uplink_drop"].as_u64().unwrap();
        assert!(drops > 0, "{after}");
    }
    let _ = daemon.stop();
}

/// A UDP stream from a tailnet peer to a LAN host through the masquerade, across a
/// restart (and with BPF a start over another layout): every datagram arrives, all from
/// one translated source (the flow's entries were kept).
fn a_masqueraded_flow_keeps_its_port_across_a_restart(backend: &str) {
    let t = tailnet::Tailnet::new().unwrap();
    let config = format!("keep_datapath = true\n{}", tailnet::config(backend, ""));
    let mut daemon = Daemon::start(&t.gw, &t.pins, &config).unwrap();
    let stream =
        Stream::start(&t.peer, tailnet::PEER, &t.lan, SocketAddr::new(tailnet::LAN.parse().unwrap(), 9700));
    stream.wait_for(100);
    assert_eq!(daemon.stop(), Some(0));
    let mut daemon2 = Daemon::start(&t.gw, &t.pins, &config).unwrap();
    let seen = stream.received();
    stream.wait_for(seen + 100);
    if backend == "bpf" {
        // A start over another layout rebuilds the flow tables: the flow is forgotten and
        // opens anew — under the same port, which the fixed hash of its tuple picks again
        // (the client's port is outside the range, and nothing else took it).
        assert_eq!(daemon2.stop(), Some(0));
        other_layout(&t.pins);
        daemon2 = Daemon::start(&t.gw, &t.pins, &config).unwrap();
        daemon2.wait_for_log("rebuilt from the configuration");
        let seen = stream.received();
        stream.wait_for(seen + 100);
    }
    let (sent, sources) = stream.stop();
    let received: u64 = sources.values().sum();
    println!("{backend}: sent {sent}, received {sources:?}");
    assert_eq!(received, sent, "lost across the restart\n{}", daemon2.log());
    assert_eq!(sources.len(), 1, "one translated source throughout: {sources:?}");
    let source = sources.keys().next().unwrap();
    assert_eq!(source.ip(), tailnet::GW_LAN.parse::<IpAddr>().unwrap());
    drop(daemon);
}

/// A paced UDP stream from one socket, counted per source address and port at the receiver.
struct Stream {
    sending: Arc<AtomicBool>,
    receiving: Arc<AtomicBool>,
    sent: Arc<Mutex<u64>>,
    sources: Arc<Mutex<HashMap<SocketAddr, u64>>>,
    sender: Option<std::thread::JoinHandle<()>>,
    receiver: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(from_ns: &Netns, from: &str, to_ns: &Netns, to: SocketAddr) -> Self {
        let from: IpAddr = from.parse().unwrap();
        let server = to_ns.bind_udp(to).unwrap();
        server.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let client = from_ns.bind_udp(SocketAddr::new(from, 40_700)).unwrap();
        let (sending, receiving) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(true)));
        let (sent, sources) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(HashMap::new())));
        let sender = std::thread::spawn({
            let (sending, sent) = (sending.clone(), sent.clone());
            move || {
                // At most 60 s, one datagram a millisecond.
                for _ in 0..60_000 {
                    if !sending.load(Ordering::Relaxed) {
                        break;
                    }
                    if client.send_to(b"stream", to).is_ok() {
                        *sent.lock().unwrap() += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        let receiver = std::thread::spawn({
            let (receiving, sources) = (receiving.clone(), sources.clone());
            move || {
                let mut buf = [0u8; 64];
                while receiving.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = server.recv_from(&mut buf) {
                        *sources.lock().unwrap().entry(from).or_default() += 1;
                    }
                }
            }
        });
        Self { sending, receiving, sent, sources, sender: Some(sender), receiver: Some(receiver) }
    }

    fn received(&self) -> u64 {
        self.sources.lock().unwrap().values().sum()
    }

    fn wait_for(&self, count: u64) {
        assert!(wait::until(Duration::from_secs(10), || self.received() >= count), "the stream stalled");
    }

    /// Stops sending, waits for what is on its way, stops receiving.
    fn stop(mut self) -> (u64, HashMap<SocketAddr, u64>) {
        self.sending.store(false, Ordering::Relaxed);
        if let Some(sender) = self.sender.take() {
            let _ = sender.join();
        }
        let sent = *self.sent.lock().unwrap();
        wait::until(Duration::from_secs(3), || self.received() >= sent);
        self.halt();
        (sent, self.sources.lock().unwrap().clone())
    }

    fn halt(&mut self) {
        self.sending.store(false, Ordering::Relaxed);
        self.receiving.store(false, Ordering::Relaxed);
        for thread in [self.sender.take(), self.receiver.take()].into_iter().flatten() {
            let _ = thread.join();
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.halt();
    }
}
