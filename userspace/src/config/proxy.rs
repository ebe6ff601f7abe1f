//! `[proxy]`: the container proxies of the reference's Kubernetes operator.
//!
//! ```toml
//! [proxy]
//! ingress_to = "192.0.2.10"      # traffic for the gateway's own tailnet address -> here
//! egress_to = "100.80.0.5"       # traffic arriving elsewhere for the gateway -> this tailnet
//!                                #   target, from the gateway's tailnet address
//! tailnet_ipv4 = "100.101.0.1"   # optional: the gateway's tailnet addresses (default: the
//! tailnet_ipv6 = "fd7a:115c:a1e0::1"  #   tunnel device's, followed when they change)
//! ```
//! Environment: `TAILGATE_PROXY_INGRESS_TO` (or the reference's `TS_DEST_IP`),
//! `TAILGATE_PROXY_EGRESS_TO` (or `TS_TAILNET_TARGET_IP`), `TAILGATE_PROXY_TAILNET_IPV4`,
//! `TAILGATE_PROXY_TAILNET_IPV6`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Where tailnet traffic for the gateway's own tailnet address goes (ports kept).
    pub ingress_to: Option<IpAddr>,
    /// Where traffic arriving by any other device for the gateway goes (a tailnet target,
    /// ports kept), with the gateway's tailnet address of its family as source.
    pub egress_to: Option<IpAddr>,
    /// The gateway's tailnet addresses, when not the tunnel device's.
    pub tailnet_ipv4: Option<Ipv4Addr>,
    pub tailnet_ipv6: Option<Ipv6Addr>,
    /// Where `ingress_to` and `egress_to` were given (for errors).
    pub ingress_source: &'static str,
    pub egress_source: &'static str,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub ingress_to: Option<String>,
    pub egress_to: Option<String>,
    pub tailnet_ipv4: Option<String>,
    pub tailnet_ipv6: Option<String>,
    #[serde(skip)]
    pub ingress_source: Option<&'static str>,
    #[serde(skip)]
    pub egress_source: Option<&'static str>,
    #[serde(skip)]
    pub ipv4_source: Option<&'static str>,
    #[serde(skip)]
    pub ipv6_source: Option<&'static str>,
}

impl RawProxy {
    /// The environment's values over the file's (a blank variable counts as unset).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        // The reference's container variable, then ours (which wins).
        for var in ["TS_DEST_IP", "TAILGATE_PROXY_INGRESS_TO"] {
            if let Some(v) = get(var) {
                self.ingress_to = Some(v);
                self.ingress_source = Some(var);
            }
        }
        for var in ["TS_TAILNET_TARGET_IP", "TAILGATE_PROXY_EGRESS_TO"] {
            if let Some(v) = get(var) {
                self.egress_to = Some(v);
                self.egress_source = Some(var);
            }
        }
        if let Some(v) = get("TAILGATE_PROXY_TAILNET_IPV4") {
            self.tailnet_ipv4 = Some(v);
            self.ipv4_source = Some("TAILGATE_PROXY_TAILNET_IPV4");
        }
        if let Some(v) = get("TAILGATE_PROXY_TAILNET_IPV6") {
            self.tailnet_ipv6 = Some(v);
            self.ipv6_source = Some("TAILGATE_PROXY_TAILNET_IPV6");
        }
    }

    pub fn validate(self) -> Result<ProxyConfig, ConfigError> {
        let ingress_source = self.ingress_source.unwrap_or("proxy.ingress_to");
        let egress_source = self.egress_source.unwrap_or("proxy.egress_to");
        let ingress_to = destination(self.ingress_to, ingress_source)?;
        let egress_to = destination(self.egress_to, egress_source)?;
        let tailnet_ipv4 =
            address::<Ipv4Addr>(self.tailnet_ipv4, self.ipv4_source.unwrap_or("proxy.tailnet_ipv4"), "IPv4")?;
        let tailnet_ipv6 =
            address::<Ipv6Addr>(self.tailnet_ipv6, self.ipv6_source.unwrap_or("proxy.tailnet_ipv6"), "IPv6")?;
        let proxy =
            ProxyConfig { ingress_to, egress_to, tailnet_ipv4, tailnet_ipv6, ingress_source, egress_source };
        for (to, source) in [(ingress_to, ingress_source), (egress_to, egress_source)] {
            if let Some(to) = to.filter(|to| proxy.tailnet_address_like(*to) == Some(*to)) {
                return Err(ConfigError::new(
                    source,
                    format!(
                        "{to} is the gateway's own tailnet address: the proxy would send traffic to itself"
                    ),
                ));
            }
        }
        if let (Some(ingress), Some(egress)) = (ingress_to, egress_to) {
            if ingress == egress {
                return Err(ConfigError::new(
                    egress_source,
                    format!(
                        "{egress} is also {ingress_source}: traffic would go back and forth between the \
                         tunnel and the LAN"
                    ),
                ));
            }
        }
        Ok(proxy)
    }
}

/// A proxy's destination, parsed; errors name `field`.
fn destination(text: Option<String>, field: &str) -> Result<Option<IpAddr>, ConfigError> {
    let Some(text) = text else { return Ok(None) };
    let ip: IpAddr = text
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(field, format!("{text:?} is not an IP address (ports are kept)")))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(ConfigError::new(
            field,
            format!("{ip} cannot be a destination (unspecified, multicast or loopback)"),
        ));
    }
    Ok(Some(ip))
}

/// An optional address of one family, parsed; errors name `field`.
fn address<T: std::str::FromStr>(
    text: Option<String>,
    field: &str,
    family: &str,
) -> Result<Option<T>, ConfigError> {
    text.map(|text| {
        text.trim()
            .parse::<T>()
            .map_err(|_| ConfigError::new(field, format!("{text:?} is not an {family} address")))
    })
    .transpose()
}

impl ProxyConfig {
    /// The configured tailnet address of `ip`'s family, if any.
    pub fn tailnet_address_like(&self, ip: IpAddr) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(_) => self.tailnet_ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => self.tailnet_ipv6.map(IpAddr::V6),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    fn parse(toml: &str, env: &[(&str, &str)]) -> Result<ProxyConfig, ConfigError> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::parse(toml, &env).map(|c| c.proxy)
    }

    #[test]
    fn ingress_from_the_file_or_the_environment() {
        let p = parse("[proxy]\ningress_to = \"192.0.2.10\"\ntailnet_ipv4 = \"100.101.0.1\"", &[]).unwrap();
        assert_eq!(p.ingress_to, Some("192.0.2.10".parse().unwrap()));
        assert_eq!(p.tailnet_ipv4, Some("100.101.0.1".parse().unwrap()));
        // The reference's variable makes tailgate a drop-in; ours wins over it.
        let p = parse("", &[("TS_DEST_IP", "192.0.2.11")]).unwrap();
        assert_eq!((p.ingress_to, p.ingress_source), (Some("192.0.2.11".parse().unwrap()), "TS_DEST_IP"));
        let p =
            parse("", &[("TS_DEST_IP", "192.0.2.11"), ("TAILGATE_PROXY_INGRESS_TO", "2001:db8::5")]).unwrap();
        assert_eq!(p.ingress_to, Some("2001:db8::5".parse().unwrap()));
        // Blank counts as unset.
        assert_eq!(parse("", &[("TS_DEST_IP", " ")]).unwrap().ingress_to, None);
    }

    #[test]
    fn egress_from_the_file_or_the_environment() {
        let p = parse("[proxy]\negress_to = \"100.80.0.5\"", &[]).unwrap();
        assert_eq!((p.egress_to, p.egress_source), (Some("100.80.0.5".parse().unwrap()), "proxy.egress_to"));
        // The reference's variable, then ours.
        let p =
            parse("[proxy]\negress_to = \"100.80.0.5\"", &[("TS_TAILNET_TARGET_IP", "100.80.0.6")]).unwrap();
        assert_eq!(
            (p.egress_to, p.egress_source),
            (Some("100.80.0.6".parse().unwrap()), "TS_TAILNET_TARGET_IP")
        );
        let p = parse(
            "",
            &[("TS_TAILNET_TARGET_IP", "100.80.0.6"), ("TAILGATE_PROXY_EGRESS_TO", "fd7a:115c:a1e0::5")],
        )
        .unwrap();
        assert_eq!(p.egress_to, Some("fd7a:115c:a1e0::5".parse().unwrap()));
        assert_eq!(parse("", &[("TS_TAILNET_TARGET_IP", "")]).unwrap().egress_to, None);
    }

    #[test]
    fn errors_name_the_field_or_variable() {
        let field = |toml: &str, env: &[(&str, &str)]| parse(toml, env).unwrap_err().field;
        assert_eq!(field("[proxy]\ningress_to = \"192.0.2.10:80\"", &[]), "proxy.ingress_to");
        assert_eq!(field("", &[("TS_DEST_IP", "0.0.0.0")]), "TS_DEST_IP");
        assert_eq!(field("[proxy]\ntailnet_ipv4 = \"fd7a::1\"", &[]), "proxy.tailnet_ipv4");
        assert_eq!(field("[proxy]\ntailnet_ipv6 = \"100.101.0.1\"", &[]), "proxy.tailnet_ipv6");
        assert_eq!(field("", &[("TAILGATE_PROXY_TAILNET_IPV4", "x")]), "TAILGATE_PROXY_TAILNET_IPV4");
        assert_eq!(
            field("[proxy]\ningress_to = \"100.101.0.1\"\ntailnet_ipv4 = \"100.101.0.1\"", &[]),
            "proxy.ingress_to"
        );
        assert_eq!(field("[proxy]\negress = \"x\"", &[]), "config");
        assert_eq!(field("[proxy]\negress_to = \"100.80.0.5:80\"", &[]), "proxy.egress_to");
        assert_eq!(field("", &[("TS_TAILNET_TARGET_IP", "ff02::1")]), "TS_TAILNET_TARGET_IP");
        assert_eq!(
            field("[proxy]\negress_to = \"100.101.0.1\"\ntailnet_ipv4 = \"100.101.0.1\"", &[]),
            "proxy.egress_to"
        );
        assert_eq!(
            field("[proxy]\negress_to = \"192.0.2.10\"\ningress_to = \"192.0.2.10\"", &[]),
            "proxy.egress_to"
        );
        // A service on the address the ingress proxy takes.
        let toml = "[proxy]\ningress_to = \"192.0.2.10\"\ntailnet_ipv4 = \"100.101.0.1\"\n\
                    [[service]]\nlisten = \"100.101.0.1:80\"\nbackends = [\"192.0.2.1:80\"]";
        assert_eq!(field(toml, &[]), "service[0].listen");
        // A service on the egress proxy's target; the stateful filter, which would drop it.
        let toml = "[proxy]\negress_to = \"100.80.0.5\"\n\
                    [[service]]\nlisten = \"100.80.0.5:80\"\nbackends = [\"192.0.2.1:80\"]";
        assert_eq!(field(toml, &[]), "service[0].listen");
        let toml = "[proxy]\negress_to = \"100.80.0.5\"\n[subnet_routes]\nstateful = true";
        assert_eq!(field(toml, &[]), "proxy.egress_to");
        assert_eq!(
            field("[subnet_routes]\nstateful = true", &[("TS_TAILNET_TARGET_IP", "100.80.0.5")]),
            "TS_TAILNET_TARGET_IP"
        );
    }
}
