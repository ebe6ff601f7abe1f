//! The proxies as iptables rules, as the reference's container boot writes them: every
//! packet (any protocol, any port) for the gateway's tailnet address goes to the ingress
//! proxy's destination, after the services' rules (a service on that address would be more
//! specific; validation refuses one where it can); every connection arriving by another
//! device than the tunnel for the gateway goes to the egress proxy's target, from the
//! gateway's tailnet address (one SNAT rule per target: the desired state holds one).
//!
//! ```text
//! nat/tg-prerouting:  -d OWN/32 -j DNAT --to-destination D
//!                     ! -i TUN -m addrtype --dst-type LOCAL -j DNAT --to-destination T
//! nat/tg-postrouting: -d T/32 -j SNAT --to-source OWN
//! ```
//! `--dst-type LOCAL` is ours: the reference's container has no other traffic, but a
//! gateway that also routes must not send what it forwards to the target.

use std::net::IpAddr;

use tailgate_abi::counters::Counter;

use super::{
    render::Builder,
    services::PREROUTING,
    subnet_routes::POSTROUTING,
    table::{Family, Rule, Table},
};
use crate::policy::DesiredState;

pub fn render(b: &mut Builder, state: &DesiredState) {
    if let Some(ingress) = state.proxy.ingress {
        let (family, from) = host(ingress.from);
        let rule = Rule::new(
            format!("-d {from} -j DNAT --to-destination {}", ingress.to),
            Counter::ServiceBalanced.name(),
            format!("ingress proxy: to {}", ingress.to),
        );
        b.add(family, Table::Nat, PREROUTING, "PREROUTING", vec![rule]);
    }
    if let Some(egress) = &state.proxy.egress {
        let (family, to) = host(egress.to);
        let dnat = Rule::new(
            format!(
                "! -i {} -m addrtype --dst-type LOCAL -j DNAT --to-destination {}",
                state.tunnel, egress.to
            ),
            Counter::ServiceBalanced.name(),
            format!("egress proxy: to {}", egress.to),
        );
        b.add(family, Table::Nat, PREROUTING, "PREROUTING", vec![dnat]);
        let snat = Rule::new(
            format!("-d {to} -j SNAT --to-source {}", egress.source),
            Counter::EgressProxyNew.name(),
            format!("egress proxy: from {}", egress.source),
        );
        b.add(family, Table::Nat, POSTROUTING, "POSTROUTING", vec![snat]);
    }
}

/// The family of `ip` and `ip` as a host prefix.
fn host(ip: IpAddr) -> (Family, String) {
    match ip {
        IpAddr::V4(ip) => (Family::V4, format!("{ip}/32")),
        IpAddr::V6(ip) => (Family::V6, format!("{ip}/128")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        backend::iptables::{exec::Available, render},
        config::Config,
        policy,
    };

    #[test]
    fn the_reference_rule_after_the_services() {
        let toml = "tunnel = \"tun0\"\n[proxy]\ningress_to = \"192.0.2.10\"\n\
                    [[service]]\nlisten = \"100.101.102.103:80\"\nbackends = [\"192.0.2.11:8080\"]";
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let system =
            policy::System { tunnel_addresses: vec!["100.101.0.1".parse().unwrap()], ..Default::default() };
        let state = policy::compile(&config, system);
        let tables = render::render(&state, render::Wiring::standard(), &Available::all()).tables;
        let nat = tables.iter().find(|t| t.family == Family::V4 && t.table == Table::Nat).unwrap();
        let chain = nat.chains.iter().find(|c| c.name == PREROUTING).unwrap();
        let specs: Vec<&str> = chain.rules.iter().map(|r| r.spec.as_str()).collect();
        assert_eq!(
            specs,
            [
                "-d 100.101.102.103/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 192.0.2.11:8080",
                "-d 100.101.0.1/32 -j DNAT --to-destination 192.0.2.10",
            ]
        );
        assert!(nat.hooks.iter().any(|h| h.builtin == "PREROUTING" && h.target == PREROUTING));
    }

    #[test]
    fn the_egress_proxy_as_the_reference_writes_it_for_local_traffic_only() {
        let toml = "tunnel = \"tun0\"\n[proxy]\negress_to = \"fd7a:115c:a1e0::5\"\n";
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let system = policy::System {
            tunnel_addresses: vec!["100.101.0.1".parse().unwrap(), "fd7a:115c:a1e0::1".parse().unwrap()],
            addresses: vec!["2001:db8::1".parse().unwrap()],
            ..Default::default()
        };
        let state = policy::compile(&config, system);
        let tables = render::render(&state, render::Wiring::standard(), &Available::all()).tables;
        let specs = |family: Family, chain: &str| -> Vec<String> {
            tables
                .iter()
                .filter(|t| t.family == family && t.table == Table::Nat)
                .flat_map(|t| t.chains.iter().filter(|c| c.name == chain))
                .flat_map(|c| c.rules.iter().map(|r| r.spec.clone()))
                .collect()
        };
        assert_eq!(
            specs(Family::V6, PREROUTING),
            ["! -i tun0 -m addrtype --dst-type LOCAL -j DNAT --to-destination fd7a:115c:a1e0::5"]
        );
        // After the masquerade (on by default), which leaves what goes out of the tunnel.
        assert_eq!(
            specs(Family::V6, POSTROUTING),
            [
                "-m mark --mark 0x40000/0xff0000 ! -o tun0 -j MASQUERADE",
                "-d fd7a:115c:a1e0::5/128 -j SNAT --to-source fd7a:115c:a1e0::1"
            ]
        );
        // No proxy rule in the other family.
        assert!(specs(Family::V4, PREROUTING).is_empty());
        assert!(!specs(Family::V4, POSTROUTING).iter().any(|r| r.contains("SNAT")));
    }
}
