//! The container proxies: the ingress proxy sends tailnet traffic for the gateway's own
//! tailnet address to one destination, ports kept (the reference's `TS_DEST_IP`).

use std::net::IpAddr;

use super::{CGNAT_V4, TAILNET_ULA_V6};
use crate::config::Config;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proxy {
    /// `None` without `ingress_to`, or while the gateway has no tailnet address of its
    /// family (the tunnel is absent or not addressed yet).
    pub ingress: Option<Ingress>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ingress {
    /// The gateway's tailnet address the traffic is for.
    pub from: IpAddr,
    /// Where it goes, ports kept.
    pub to: IpAddr,
}

pub fn compile(config: &Config, tunnel_addresses: &[IpAddr]) -> Proxy {
    let ingress = config.proxy.ingress_to.and_then(|to| {
        let from = config.proxy.tailnet_address_like(to).or_else(|| tailnet_address(tunnel_addresses, to))?;
        // The destination is the gateway's own tailnet address: a loop, not a proxy.
        (from != to).then_some(Ingress { from, to })
    });
    Proxy { ingress }
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

    fn ingress(toml: &str, tunnel: &[&str]) -> Option<Ingress> {
        let config = Config::parse(toml, &HashMap::new()).unwrap();
        let addresses: Vec<IpAddr> = tunnel.iter().map(|a| a.parse().unwrap()).collect();
        compile(&config, &addresses).ingress
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
