//! Services as iptables rules: DNAT in nat PREROUTING for connections arriving on any
//! device (tailnet and LAN clients), one rule per backend, chosen at random with the
//! backend's share of what is left (as kube-proxy does), the last one unconditional.
//! Replies are translated back by conntrack.
//!
//! ```text
//! nat/tg-prerouting: -d VIP -p tcp -m tcp --dport P -m statistic --mode random --probability 0.25000000000 -j DNAT --to-destination B1
//!                    -d VIP -p tcp -m tcp --dport P -j DNAT --to-destination B2
//! ```
//! Unlike the Maglev table of the BPF backend, a random choice is not consistent: a
//! connection keeps its backend (conntrack), but which backend a new connection of the
//! same client gets does not depend on the client, and two gateways choose differently.

use std::net::SocketAddr;

use tailgate_abi::counters::Counter;

use super::{
    render::Builder,
    table::{Family, Rule, Table},
};
use crate::{
    config::{BackendConfig, ServiceConfig},
    policy::{services::identity, DesiredState},
};

pub const PREROUTING: &str = "tg-prerouting";

pub fn render(b: &mut Builder, state: &DesiredState) {
    for service in state.services.iter() {
        let family = if service.listen.is_ipv4() { Family::V4 } else { Family::V6 };
        b.add(family, Table::Nat, PREROUTING, "PREROUTING", rules(service));
    }
}

/// The rules of one service, backends in identity order (the order does not change when
/// the config lists them differently).
pub fn rules(service: &ServiceConfig) -> Vec<Rule> {
    let mut backends: Vec<&BackendConfig> = service.backends.iter().collect();
    backends.sort_by_key(|b| identity(&b.address));
    let proto = service.protocol.name();
    let vip = service.listen;
    let matches = format!("-d {} -p {proto} -m {proto} --dport {}", host(vip), vip.port());
    let mut left: u32 = backends.iter().map(|b| b.weight).sum();
    let last = backends.len() - 1;
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let chance = if i == last {
                String::new()
            } else {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    f64::from(b.weight) / f64::from(left)
                )
            };
            left -= b.weight;
            Rule::new(
                format!("{matches}{chance} -j DNAT --to-destination {}", b.address),
                Counter::ServiceBalanced.name(),
                format!("service {}: {}", service.name, b.address),
            )
        })
        .collect()
}

/// The address alone, with the prefix length iptables-save prints.
fn host(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}/32", a.ip()),
        SocketAddr::V6(a) => format!("{}/128", a.ip()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    #[test]
    fn weighted_random_choice_per_backend() {
        let toml = r#"
            [[service]]
            name = "web"
            listen = "100.101.102.103:80"
            backends = [{ address = "192.0.2.13:8080", weight = 2 }, "192.0.2.11:8080", "192.0.2.12:8080"]
            [[service]]
            listen = "[fd7a:115c:a1e0::99]:53"
            protocol = "udp"
            backends = ["[2001:db8::11]:53"]
        "#;
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let specs = |s: &ServiceConfig| -> Vec<String> { rules(s).into_iter().map(|r| r.spec).collect() };
        let m = "-d 100.101.102.103/32 -p tcp -m tcp --dport 80";
        assert_eq!(
            specs(&config.services[0]),
            [
                format!("{m} -m statistic --mode random --probability 0.25000000000 -j DNAT --to-destination 192.0.2.11:8080"),
                format!("{m} -m statistic --mode random --probability 0.33333333333 -j DNAT --to-destination 192.0.2.12:8080"),
                format!("{m} -j DNAT --to-destination 192.0.2.13:8080"),
            ]
        );
        assert_eq!(
            specs(&config.services[1]),
            ["-d fd7a:115c:a1e0::99/128 -p udp -m udp --dport 53 -j DNAT --to-destination [2001:db8::11]:53"]
        );
    }
}
