//! The container proxies: the ingress proxy sends tailnet traffic for the gateway's own
//! tailnet address to one destination, ports kept (the reference's `TS_DEST_IP`); the
//! egress proxy sends what arrives by any other device for the gateway to one tailnet
//! target, ports kept, from the gateway's tailnet address (`TS_TAILNET_TARGET_IP`).

use std::net::IpAddr;

use super::{CGNAT_V4, TAILNET_ULA_V6};
use crate::config::Config;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proxy {
    /// `None` without `ingress_to`, or while the gateway has no tailnet address of its
    /// family (the tunnel is absent or not addressed yet).
    pub ingress: Option<Ingress>,
    /// `None` without `egress_to`, or while the gateway has no tailnet address of its
    /// family.
    pub egress: Option<Egress>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Egress {
    /// The gateway's addresses of the target's family (every device's, loopback excepted):
    /// what arrives for them goes to the target.
    pub on: Vec<IpAddr>,
    /// The tailnet target, ports kept.
    pub to: IpAddr,
    /// The gateway's tailnet address the target sees.
    pub source: IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingress {
    /// The gateway's tailnet address the traffic is for.
    pub from: IpAddr,
    /// Where it goes, ports kept.
    pub to: IpAddr,
}

/// `tunnel_addresses`: the tunnel device's; `addresses`: every device's.
pub fn compile(config: &Config, tunnel_addresses: &[IpAddr], addresses: &[IpAddr]) -> Proxy {
    let own =
        |to: IpAddr| config.proxy.tailnet_address_like(to).or_else(|| tailnet_address(tunnel_addresses, to));
    let ingress = config.proxy.ingress_to.and_then(|to| {
        let from = own(to)?;
        // The destination is the gateway's own tailnet address: a loop, not a proxy.
        (from != to).then_some(Ingress { from, to })
    });
    let egress = config.proxy.egress_to.and_then(|to| {
        let source = own(to)?;
        let mut on: Vec<IpAddr> =
            addresses.iter().copied().filter(|a| a.is_ipv4() == to.is_ipv4() && !a.is_loopback()).collect();
        on.sort();
        on.dedup();
        // One of the gateway's addresses (refused in a config; come since): no target.
        (source != to && !on.contains(&to)).then_some(Egress { on, to, source })
    });
    Proxy { ingress, egress }
}

/// The tunnel's address of `like`'s family: one in the tailnet's range first (CGNAT,
/// tailnet ULA), else the first of the family that is not link-local (every TUN device has
/// an fe80:: address; it is no tailnet address).
fn tailnet_address(addresses: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    let link_local = |a: &IpAddr| match a {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    };
    let same: Vec<IpAddr> =
        addresses.iter().copied().filter(|a| a.is_ipv4() == like.is_ipv4() && !link_local(a)).collect();
    let in_range = |a: &IpAddr| match a {
        IpAddr::V4(v4) => CGNAT_V4.contains(v4),
        IpAddr::V6(v6) => TAILNET_ULA_V6.contains(v6),
    };
    same.iter().copied().find(in_range).or_else(|| same.first().copied())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn ingress(toml: &str, tunnel: &[&str]) -> Option<Ingress> {
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        compile(&config, &ips(tunnel), &[]).ingress
    }

    #[test]
    fn the_egress_proxy_takes_the_gateways_addresses_of_the_targets_family() {
        let config = Config::parse("[proxy]\negress_to = \"100.80.0.5\"", &HashMap::new()).unwrap();
        let tunnel = ips(&["100.101.0.1", "fd7a:115c:a1e0::1"]);
        let all =
            ips(&["127.0.0.1", "192.0.2.1", "::1", "2001:db8::1", "100.101.0.1", "10.7.0.1", "192.0.2.1"]);
        let egress = compile(&config, &tunnel, &all).egress.unwrap();
        assert_eq!(egress.on, ips(&["10.7.0.1", "100.101.0.1", "192.0.2.1"]));
        assert_eq!(
            (egress.to, egress.source),
            ("100.80.0.5".parse().unwrap(), "100.101.0.1".parse().unwrap())
        );
        // No tailnet address of the family yet: waits.
        assert_eq!(compile(&config, &ips(&["fd7a:115c:a1e0::1"]), &all).egress, None);
        // IPv6 target: IPv6 addresses.
        let config = Config::parse("[proxy]\negress_to = \"fd7a:115c:a1e0::5\"", &HashMap::new()).unwrap();
        let egress = compile(&config, &tunnel, &all).egress.unwrap();
        assert_eq!(egress.on, ips(&["2001:db8::1"]));
        assert_eq!(egress.source, "fd7a:115c:a1e0::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_tunnels_tailnet_address_of_the_destinations_family() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let v4 = "[proxy]\ningress_to = \"192.0.2.10\"";
        assert_eq!(
            ingress(v4, &["fe80::1", "fd7a:115c:a1e0::1", "10.9.9.9", "100.101.0.1"]),
            Some(Ingress { from: ip("100.101.0.1"), to: ip("192.0.2.10") })
        );
        // No tailnet-range address: the first of the family.
        assert_eq!(ingress(v4, &["10.9.9.9"]).unwrap().from, ip("10.9.9.9"));
        let v6 = "[proxy]\ningress_to = \"2001:db8::10\"";
        assert_eq!(ingress(v6, &["100.101.0.1", "fd7a:115c:a1e0::1"]).unwrap().from, ip("fd7a:115c:a1e0::1"));
        // Not addressed yet (link-local addresses do not count): waits.
        assert_eq!(ingress(v4, &["fd7a:115c:a1e0::1", "169.254.1.1"]), None);
        assert_eq!(ingress(v6, &["fe80::3f8a:1", "100.101.0.1"]), None);
        // The override wins.
        let fixed = "[proxy]\ningress_to = \"192.0.2.10\"\ntailnet_ipv4 = \"100.99.0.1\"";
        assert_eq!(ingress(fixed, &["100.101.0.1"]).unwrap().from, ip("100.99.0.1"));
        assert_eq!(ingress("", &["100.101.0.1"]), None);
        // The destination is the tunnel's own address: no proxy (it would loop).
        assert_eq!(ingress("[proxy]\ningress_to = \"100.101.0.1\"", &["100.101.0.1"]), None);
    }
}
