//! The proxies in the BPF backend: their stage switches and the egress proxy's target and
//! source in `SETTINGS` (their DNAT entries are services, `services.rs`; the egress proxy's
//! ports are `[nat] ports`, checked by `masquerade::check_ports`).

use tailgate_abi::settings::{stage, Settings};

use super::services::addr_bytes;
use crate::policy::{proxy::Proxy, DesiredState};

pub fn fill(state: &DesiredState, settings: &mut Settings) {
    let proxy: &Proxy = &state.proxy;
    if proxy.ingress.is_some() {
        settings.stages |= stage::INGRESS_PROXY;
    }
    if let Some(egress) = &proxy.egress {
        settings.stages |= stage::EGRESS_PROXY;
        settings.nat_ports = state.nat.ports;
        let (target, family) = addr_bytes(egress.to);
        settings.proxy_family = family;
        settings.proxy_target = target;
        settings.proxy_source = addr_bytes(egress.source).0;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tailgate_abi::services::family;

    use super::*;
    use crate::{config::Config, policy};

    #[test]
    fn target_source_and_ports_of_the_egress_proxy() {
        let config = Config::parse("[proxy]\negress_to = \"100.80.0.5\"", &HashMap::new()).unwrap();
        let system = policy::System {
            tunnel_addresses: vec!["100.101.0.1".parse().unwrap()],
            addresses: vec!["192.0.2.1".parse().unwrap()],
            ..Default::default()
        };
        let mut settings = Settings::default();
        fill(&policy::compile(&config, system), &mut settings);
        assert_eq!(settings.stages, stage::EGRESS_PROXY);
        assert_eq!(settings.proxy_family, family::V4);
        assert_eq!(settings.proxy_target[..4], [100, 80, 0, 5]);
        assert_eq!(settings.proxy_source[..4], [100, 101, 0, 1]);
        assert_eq!(settings.nat_ports, [61000, 65535]);
        // Waiting for a tailnet address: off.
        let mut settings = Settings::default();
        fill(&policy::compile(&config, policy::System::default()), &mut settings);
        assert_eq!(settings, Settings::default());
    }
}
