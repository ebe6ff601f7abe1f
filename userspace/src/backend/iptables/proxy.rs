//! The ingress proxy as iptables rules, as the reference's container boot writes it: every
//! packet (any protocol, any port) for the gateway's tailnet address goes to the
//! destination, after the services' rules (a service on that address would be more
//! specific; validation refuses one where it can).
//!
//! ```text
//! nat/tg-prerouting: -d OWN/32 -j DNAT --to-destination D
//! ```

use std::net::IpAddr;

use tailgate_abi::counters::Counter;

use super::{
    render::Builder,
    services::PREROUTING,
    table::{Family, Rule, Table},
};
use crate::policy::DesiredState;

pub fn render(b: &mut Builder, state: &DesiredState) {
    let Some(ingress) = state.proxy.ingress else { return };
    let (family, from) = match ingress.from {
        IpAddr::V4(ip) => (Family::V4, format!("{ip}/32")),
        IpAddr::V6(ip) => (Family::V6, format!("{ip}/128")),
    };
    let rule = Rule::new(
        format!("-d {from} -j DNAT --to-destination {}", ingress.to),
        Counter::ServiceBalanced.name(),
        format!("ingress proxy: to {}", ingress.to),
    );
    b.add(family, Table::Nat, PREROUTING, "PREROUTING", vec![rule]);
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
        let wiring = render::Wiring { divert: true, first: false };
        let tables = render::render(&state, wiring, &Available::all());
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
}
