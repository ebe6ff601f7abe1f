//! Prometheus metrics (`metrics_listen`): scraped over HTTP from inside the gateway's
//! namespace and read with a Prometheus text parser; the values follow what the datapath
//! did (drops, reloads, a refused reload, the backend); `/healthz`; no socket without the
//! setting; an unusable address refuses the start naming the field.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use prometheus_parse::{Scrape, Value};
use tailgate_tests::{
    daemon::Daemon,
    netns::Netns,
    on_both_backends,
    topology::{config, Topology},
};

const LISTEN: &str = "127.0.0.1:9469";

fn with_metrics(backend: &str, cgnat: &str) -> String {
    format!("metrics_listen = \"{LISTEN}\"\n{}", config(backend, cgnat))
}

/// `GET path` on the listener in `ns`: status code and body.
fn get(ns: &Netns, path: &str) -> std::io::Result<(u16, String)> {
    let path = path.to_string();
    ns.enter(move || {
        let mut stream = TcpStream::connect_timeout(&LISTEN.parse().unwrap(), Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: tailgate\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })
    .map_err(|e| std::io::Error::other(format!("{e:#}")))
    .map(|response: String| {
        let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
        (code, body)
    })
}

/// The value of `name` with `labels` (all given ones must match).
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn scrape(ns: &Netns) -> Scrape {
    let (code, body) = get(ns, "/metrics").unwrap();
    assert_eq!(code, 200, "{body}");
    // Chunked bodies carry their sizes between the chunks: the listener sends one.
    let lines: Vec<std::io::Result<String>> = body.lines().map(|l| Ok(l.to_string())).collect();
    Scrape::parse(lines.into_iter()).unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{body}"))
}

on_both_backends!(the_metrics_follow_the_datapath);

fn the_metrics_follow_the_datapath(backend: &str) {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &with_metrics(backend, "")).unwrap();
    daemon.write_config(&with_metrics(backend, "allow = [\"100.64.0.0/24\"]")).unwrap();
    daemon.reload().unwrap();
    // A refused reload: the state in force stays, and it is counted.
    daemon.write_config(&with_metrics(backend, "allow = [\"not a prefix\"]")).unwrap();
    daemon.reload().unwrap();
    daemon.write_config(&with_metrics(backend, "")).unwrap();
    daemon.reload().unwrap();
    assert!(!t.cgnat_neighbours_ping(), "dropped");
    let s = scrape(&t.gw);
    assert_eq!(value(&s, "tailgate_backend", &[("backend", backend)]), Some(1.0), "{:?}", s.samples);
    assert_eq!(value(&s, "tailgate_reloads_total", &[]), Some(2.0));
    assert_eq!(value(&s, "tailgate_reloads_refused_total", &[]), Some(1.0));
    let rules = |verdict| {
        value(
            &s,
            "tailgate_rule_packets_total",
            &[("direction", "inbound"), ("verdict", verdict), ("origin", "default")],
        )
    };
    assert!(rules("drop").is_some_and(|v| v >= 1.0), "the default CGNAT rule's drops: {:?}", s.samples);
    if backend == "bpf" {
        assert!(value(&s, "tailgate_packets_total", &[("reason", "uplink_drop")]).is_some_and(|v| v >= 1.0));
        assert!(value(&s, "tailgate_attachments", &[]).is_some_and(|v| v >= 2.0));
        assert!(value(&s, "tailgate_flow_capacity", &[("family", "ipv4")]).is_some_and(|v| v > 0.0));
    }
    let (code, body) = get(&t.gw, "/healthz").unwrap();
    assert_eq!((code, body.starts_with("ok")), (200, true), "{body}");
    assert_eq!(get(&t.gw, "/other").unwrap().0, 404);
    if backend == "bpf" {
        // The datapath removed under the daemon (`cleanup --force`): unhealthy.
        let out = tailgate_tests::daemon::tailgate(&t.gw, &t.pins, &["cleanup", "--force"]).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let (code, body) = get(&t.gw, "/healthz").unwrap();
        assert_eq!(code, 503, "{body}");
    }
    drop(daemon);
    // No daemon, no socket.
    assert!(get(&t.gw, "/healthz").is_err());
}

/// Services: each backend's share of the table, and its live flows from a walk of the
/// flow table (BPF).
#[test]
fn service_backends_and_their_flows() {
    use tailgate_tests::tailnet::{self, tcp_via, Tailnet};
    let t = Tailnet::new().unwrap();
    let vip = "100.101.102.103:80";
    let extra = format!("[[service]]\nlisten = \"{vip}\"\nbackends = [\"{}:8080\"]\n", tailnet::LAN);
    let config = format!("metrics_listen = \"{LISTEN}\"\n{}", tailnet::config("bpf", &extra));
    let daemon = Daemon::start(&t.gw, &t.pins, &config).unwrap();
    let backend = format!("{}:8080", tailnet::LAN);
    for _ in 0..3 {
        tcp_via(&t.peer, vip.parse().unwrap(), &t.lan, backend.parse().unwrap())
            .unwrap_or_else(|e| panic!("{e:#}\n{}", daemon.log()));
    }
    let s = scrape(&t.gw);
    let labels = [("service", vip), ("backend", backend.as_str())];
    assert_eq!(value(&s, "tailgate_service_backend_slots", &labels), Some(16_381.0), "{:?}", s.samples);
    assert_eq!(value(&s, "tailgate_service_backend_flows", &labels), Some(3.0), "{:?}", s.samples);
}

#[test]
fn no_socket_without_the_setting_and_a_bad_address_is_refused() {
    let t = Topology::new().unwrap();
    let daemon = Daemon::start(&t.gw, &t.pins, &config("bpf", "")).unwrap();
    assert!(get(&t.gw, "/metrics").is_err(), "nothing listens");
    drop(daemon);
    for (listen, says) in
        [("localhost:9469", "metrics_listen"), ("192.0.2.77:9469", "metrics_listen: binding")]
    {
        let toml = format!("metrics_listen = \"{listen}\"\n{}", config("bpf", ""));
        let (code, log) = Daemon::run_to_exit(&t.gw, &t.pins, &toml).unwrap();
        assert_ne!(code, 0);
        assert!(log.contains(says), "{listen}: {log}");
    }
}
