//! Prometheus metrics and `/healthz` (`metrics_listen`, off by default: no listening socket
//! without it). A scrape reads the state in force as `tailgate status` does (pinned maps,
//! or iptables' counters; not the locks, which the daemon holds) plus what only the daemon
//! knows (reloads, repairs), and
//! encodes it with `prometheus-client`. Label values are bounded: verdict reasons, rule
//! directions/verdicts/origins (never prefixes), service and backend addresses of the config.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::{
    backend::bpf::{conntrack, Pins},
    policy::{CGNAT_V4, TAILNET_ULA_V6},
    status::{self, Status},
};

/// What the daemon counts for the metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub reloads: AtomicU64,
    pub reloads_refused: AtomicU64,
    /// Repair runs that rewrote something (iptables).
    pub repairs: AtomicU64,
}

impl Stats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

type Labels = Vec<(String, String)>;

/// The listening socket, bound before the start so that an unusable address refuses it.
pub struct Listener(TcpListener);

impl Listener {
    pub async fn bind(addr: SocketAddr) -> Result<Self> {
        let listener =
            TcpListener::bind(addr).await.with_context(|| format!("metrics_listen: binding {addr}"))?;
        Ok(Self(listener))
    }

    /// Serves scrapes until the process ends; called once the start stands (until then a
    /// connection waits in the listen queue).
    pub fn serve(self, served: Served) {
        let served = Arc::new(served);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = self.0.accept().await else { continue };
                let served = served.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let served = served.clone();
                        async move { Ok::<_, Infallible>(answer(request, served).await) }
                    });
                    if let Err(e) =
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                    {
                        tracing::debug!("metrics connection: {e}");
                    }
                });
            }
        });
    }
}

/// What the listener serves: the instance, the daemon's counts, the backend the start chose
/// and why.
pub struct Served {
    pub pins: Pins,
    pub stats: Arc<Stats>,
    pub backend: String,
    pub reason: String,
}

async fn answer(request: Request<hyper::body::Incoming>, served: Arc<Served>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(code)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    match request.uri().path() {
        // Off the event loop: reading the maps walks the flow tables (a syscall or two per
        // entry), which would hold up signals, reloads and watchdog pings meanwhile.
        "/metrics" => match tokio::task::spawn_blocking(move || render(&served)).await {
            Ok(Ok(text)) => {
                reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text)
            }
            Ok(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e:#}\n")),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
        },
        // Answered by the daemon's own event loop (a loop that hangs answers nothing), from
        // what it knows: the start stood (or nothing would be served), and the pinned
        // datapath is still there.
        "/healthz" if served.backend == "bpf" && !served.pins.root().exists() => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "the pinned datapath is gone\n".into())
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", format!("ok: {} enforcing\n", served.backend)),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "/metrics or /healthz\n".into()),
    }
}

/// The metrics text of one scrape.
fn render(served: &Served) -> Result<String> {
    let (pins, stats) = (&served.pins, &served.stats);
    let status = status::read_by_daemon(pins)?;
    let mut registry = Registry::default();

    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&labels(&[("backend", &served.backend), ("reason", &served.reason)])).set(1);
    registry.register("tailgate_backend", "The backend in use (1) and why it was chosen", info);
    for (name, help, value) in [
        ("tailgate_reloads", "Reloads applied (SIGHUP or a changed config file)", &stats.reloads),
        (
            "tailgate_reloads_refused",
            "Reloads refused (invalid config, failed apply): the state in force stayed",
            &stats.reloads_refused,
        ),
        ("tailgate_repairs", "iptables tables restored after another program changed them", &stats.repairs),
    ] {
        let counter = Counter::<u64>::default();
        counter.inc_by(value.load(Ordering::Relaxed));
        registry.register(name, help, counter);
    }

    if let Some(status) = status {
        add_status(&mut registry, &status, pins);
    }
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn add_status(registry: &mut Registry, status: &Status, pins: &Pins) {
    let packets = Family::<Labels, Counter>::default();
    for (reason, value) in &status.counters {
        packets.get_or_create(&labels(&[("reason", reason)])).inc_by(*value);
    }
    registry.register(
        "tailgate_packets",
        "Packets per verdict reason, hook included in the name (BPF; iptables: per counted rule)",
        packets,
    );

    // Rule hits by where the rule comes from, not by prefix: bounded whatever the config.
    let rules = Family::<Labels, Counter>::default();
    for rule in &status.rules {
        let origin = match rule.prefix.parse::<ipnet::IpNet>() {
            Ok(ipnet::IpNet::V4(net)) if net == CGNAT_V4 => "default",
            Ok(ipnet::IpNet::V6(net)) if net == TAILNET_ULA_V6 => "default",
            _ => "config",
        };
        let family = labels(&[("direction", rule.direction), ("verdict", rule.verdict), ("origin", origin)]);
        rules.get_or_create(&family).inc_by(rule.packets.unwrap_or(0));
    }
    registry.register(
        "tailgate_rule_packets",
        "Packets matched by the prefix rules, by direction, verdict and origin",
        rules,
    );

    let attachments = Gauge::<i64>::default();
    attachments.set(status.attachments.len() as i64);
    registry.register("tailgate_attachments", "Hooks the datapath is attached to", attachments);
    let pending = Gauge::<i64>::default();
    pending.set(status.pending.len() as i64);
    registry.register("tailgate_pending_attachments", "Hooks waiting for their device", pending);

    if let Some(flows) = &status.flows {
        let entries = Family::<Labels, Gauge>::default();
        let capacity = Family::<Labels, Gauge>::default();
        let o = &flows.occupancy;
        for (family, live, size) in
            [("ipv4", o.entries_v4, o.capacity_v4), ("ipv6", o.entries_v6, o.capacity_v6)]
        {
            entries.get_or_create(&labels(&[("family", family)])).set(live as i64);
            capacity.get_or_create(&labels(&[("family", family)])).set(i64::from(size));
        }
        registry.register("tailgate_flow_entries", "Live entries of the flow tables", entries);
        registry.register("tailgate_flow_capacity", "Size of the flow tables", capacity);
        let evicted = Counter::<u64>::default();
        evicted.inc_by(flows.evicted);
        registry.register("tailgate_flow_evictions", "Flows the full table evicted to make room", evicted);
    }

    if !status.services.is_empty() {
        let slots = Family::<Labels, Gauge>::default();
        for service in &status.services {
            for backend in &service.backends {
                let family = labels(&[
                    ("service", &service.listen),
                    ("protocol", service.protocol),
                    ("backend", &backend.address),
                ]);
                slots.get_or_create(&family).set(i64::from(backend.slots));
            }
        }
        registry.register(
            "tailgate_service_backend_slots",
            "Slots of a service's Maglev table that name the backend (its share of new flows)",
            slots,
        );
        if let Some(flows) = backend_flows(pins, status) {
            registry.register(
                "tailgate_service_backend_flows",
                "Live flows of a service on each backend",
                flows,
            );
        }
    }
}

/// Live flows per service and backend, from a walk of the flow tables (BPF): the `dnat`
/// entries to a configured service's address and port. (The proxies' port-less entries
/// are left out: their flows are per destination port, not a bounded label set.)
fn backend_flows(pins: &Pins, status: &Status) -> Option<Family<Labels, Gauge>> {
    let entries = status::flows(pins).ok()?;
    let family = Family::<Labels, Gauge>::default();
    // By address, port and protocol: one lookup per flow entry, whatever the number of
    // services.
    let mut services = std::collections::HashMap::new();
    for service in status.services.iter().filter(|s| !s.listen.ends_with(":0")) {
        services.insert((service.listen.as_str(), service.protocol), service);
        for backend in &service.backends {
            let _ = family.get_or_create(&labels(&[
                ("service", &service.listen),
                ("protocol", service.protocol),
                ("backend", &backend.address),
            ]));
        }
    }
    for entry in entries.iter().filter(|e| e.zone == "dnat" && e.expires_in_s > 0.0) {
        let listen = SocketAddr::new(entry.dst, entry.dport).to_string();
        let protocol = conntrack::proto_name(entry.proto);
        let (Some(service), Some(nat)) = (services.get(&(listen.as_str(), protocol.as_str())), entry.nat)
        else {
            continue;
        };
        let key = labels(&[
            ("service", &service.listen),
            ("protocol", service.protocol),
            ("backend", &nat.to_string()),
        ]);
        family.get_or_create(&key).inc();
    }
    Some(family)
}
