//! `[[service]]`: load-balanced virtual addresses (see `policy::services`).
//!
//! ```toml
//! [[service]]
//! name = "web"                       # optional; in logs, errors and iptables comments
//! listen = "100.101.102.103:80"      # address:port, [v6]:port
//! protocol = "tcp"                   # tcp (default) | udp
//! backends = ["192.0.2.11:8080", { address = "192.0.2.12:8080", weight = 3 }]
//! table_size = 16381                 # optional: the Maglev table's size, a prime
//! ```

use std::{collections::HashMap, net::SocketAddr};

use serde::Deserialize;
use tailgate_abi::services::{
    DEFAULT_TABLE_SIZE, MAX_BACKENDS, MAX_SERVICES, MAX_TABLE_SIZE, MIN_TABLE_SIZE,
};

use super::ConfigError;

/// Largest weight: the table gives each backend slots in proportion to its weight, so a
/// ratio beyond this is better written as fewer backends.
pub const MAX_WEIGHT: u32 = 1_000;
/// Slots per backend a table must offer at least (Maglev keeps shares even and disruption
/// low only with many slots per backend).
pub const MIN_SLOTS_PER_BACKEND: u32 = 10;
/// Longest service name.
const NAME_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP echo of the address's family: only the ingress proxy's entries (not a service
    /// protocol a user can give).
    #[serde(skip)]
    IcmpEcho,
}

impl Protocol {
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::IcmpEcho => "icmp",
        }
    }

    /// The IP protocol number, for an address of the family `ipv4` says.
    pub const fn number(self, ipv4: bool) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::IcmpEcho if ipv4 => 1,
            Protocol::IcmpEcho => 58,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// `name`, or `<listen>/<protocol>` when not given.
    pub name: String,
    pub listen: SocketAddr,
    pub protocol: Protocol,
    pub backends: Vec<BackendConfig>,
    pub table_size: u32,
    /// Only for traffic arriving on an uplink (the egress proxy's entries); a configured
    /// service is reached from the tunnel and the uplinks.
    pub uplinks_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    name: Option<String>,
    listen: Option<String>,
    // Read as plain values and checked here, so errors name the entry and field.
    protocol: Option<toml::Value>,
    backends: Option<Vec<toml::Value>>,
    table_size: Option<i64>,
}

/// Most backends in one service: the table is built in time proportional to its slots times
/// its backends (1,000 backends and 10,007 slots: ~10 million steps, milliseconds).
pub const MAX_BACKENDS_PER_SERVICE: usize = 1_000;

/// Validates the `[[service]]` entries; errors name the entry and field
/// (`service[1].backends[0]`).
pub(super) fn validate(raw: Vec<RawService>) -> Result<Vec<ServiceConfig>, ConfigError> {
    if raw.len() > MAX_SERVICES as usize {
        return Err(ConfigError::new("service", format!("{} services; at most {MAX_SERVICES}", raw.len())));
    }
    let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw.len());
    let mut seen: HashMap<(SocketAddr, Protocol), usize> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut backends_total = 0usize;
    for (i, raw) in raw.into_iter().enumerate() {
        let service = validate_one(i, raw)?;
        if let Some(first) = seen.insert((service.listen, service.protocol), i) {
            return Err(ConfigError::new(
                format!("service[{i}].listen"),
                format!(
                    "{}/{} is also the address of service[{first}]",
                    service.listen,
                    service.protocol.name()
                ),
            ));
        }
        if let Some(first) = names.insert(service.name.clone(), i) {
            return Err(ConfigError::new(
                format!("service[{i}].name"),
                format!("{:?} is also the name of service[{first}]", service.name),
            ));
        }
        backends_total += service.backends.len();
        services.push(service);
    }
    // Id 0 is never used.
    if backends_total >= MAX_BACKENDS as usize {
        return Err(ConfigError::new(
            "service",
            format!("{backends_total} backends in all; at most {}", MAX_BACKENDS - 1),
        ));
    }
    Ok(services)
}

fn validate_one(i: usize, raw: RawService) -> Result<ServiceConfig, ConfigError> {
    let field = |name: &str| format!("service[{i}].{name}");
    let listen_text = raw.listen.ok_or_else(|| ConfigError::new(field("listen"), "missing"))?;
    let listen = socket_addr(&field("listen"), &listen_text)?;
    if !usable(listen.ip()) || listen.ip().is_loopback() {
        return Err(ConfigError::new(
            field("listen"),
            format!(
                "{} cannot be a service address (unspecified, multicast, broadcast, loopback or IPv4-mapped)",
                listen.ip()
            ),
        ));
    }
    let protocol = match raw.protocol {
        None => Protocol::Tcp,
        Some(toml::Value::String(p)) if p == "tcp" => Protocol::Tcp,
        Some(toml::Value::String(p)) if p == "udp" => Protocol::Udp,
        Some(other) => {
            return Err(ConfigError::new(
                field("protocol"),
                format!("{other} is not one of: \"tcp\", \"udp\""),
            ))
        }
    };
    let name = match raw.name {
        Some(name) => {
            let ok = !name.is_empty()
                && name.len() <= NAME_MAX
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !ok {
                return Err(ConfigError::new(
                    field("name"),
                    format!("{name:?}: 1 to {NAME_MAX} of letters, digits, '.', '_', '-'"),
                ));
            }
            name
        }
        None => format!("{listen}/{}", protocol.name()),
    };
    let raw_backends = raw.backends.unwrap_or_default();
    if raw_backends.is_empty() {
        return Err(ConfigError::new(field("backends"), "a service needs at least one backend"));
    }
    if raw_backends.len() > MAX_BACKENDS_PER_SERVICE {
        return Err(ConfigError::new(
            field("backends"),
            format!("{} backends; at most {MAX_BACKENDS_PER_SERVICE} per service", raw_backends.len()),
        ));
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw_backends.len());
    for (j, backend) in raw_backends.into_iter().enumerate() {
        let at = format!("service[{i}].backends[{j}]");
        let (text, weight) = backend_fields(&at, backend)?;
        let address = socket_addr(&at, &text)?;
        if address.is_ipv4() != listen.is_ipv4() {
            return Err(ConfigError::new(
                at,
                format!(
                    "{address} is not of the family of listen = {listen} (no translation between families)"
                ),
            ));
        }
        if !usable(address.ip()) || address.ip().is_loopback() || address == listen {
            return Err(ConfigError::new(
                at,
                format!(
                    "{address} cannot be a backend (unspecified, multicast, broadcast, loopback, IPv4-mapped, \
                     or the service itself)"
                ),
            ));
        }
        let weight = match weight {
            None => 1,
            Some(w) if (1..=i64::from(MAX_WEIGHT)).contains(&w) => w as u32,
            Some(w) => {
                return Err(ConfigError::new(
                    format!("{at}.weight"),
                    format!("{w} is out of range 1..={MAX_WEIGHT} (to take a backend out, remove it)"),
                ))
            }
        };
        if let Some(k) = backends.iter().position(|b| b.address == address) {
            return Err(ConfigError::new(at, format!("{address} is also service[{i}].backends[{k}]")));
        }
        backends.push(BackendConfig { address, weight });
    }
    let table_size = match raw.table_size {
        None => DEFAULT_TABLE_SIZE,
        Some(n) => match u32::try_from(n) {
            Ok(n) if (MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&n) && crate::policy::maglev::is_prime(n) => n,
            _ => {
                return Err(ConfigError::new(
                    field("table_size"),
                    format!("{n} is not a prime in {MIN_TABLE_SIZE}..={MAX_TABLE_SIZE} (e.g. 251, 4093, 16381, 65521)"),
                ))
            }
        },
    };
    if (table_size as usize) < backends.len() * MIN_SLOTS_PER_BACKEND as usize {
        return Err(ConfigError::new(
            field("table_size"),
            format!(
                "{table_size} slots for {} backends; give at least {MIN_SLOTS_PER_BACKEND} slots per backend",
                backends.len()
            ),
        ));
    }
    Ok(ServiceConfig { name, listen, protocol, backends, table_size, uplinks_only: false })
}

/// A backend entry: `"address:port"` or `{ address = "...", weight = n }`, nothing else.
fn backend_fields(at: &str, value: toml::Value) -> Result<(String, Option<i64>), ConfigError> {
    match value {
        toml::Value::String(text) => Ok((text, None)),
        toml::Value::Table(table) => {
            if let Some(key) = table.keys().find(|k| *k != "address" && *k != "weight") {
                return Err(ConfigError::new(at, format!("unknown key {key:?} (expected address, weight)")));
            }
            let address = match table.get("address") {
                Some(toml::Value::String(text)) => text.clone(),
                Some(other) => {
                    return Err(ConfigError::new(format!("{at}.address"), format!("{other} is not a string")))
                }
                None => return Err(ConfigError::new(format!("{at}.address"), "missing")),
            };
            let weight = match table.get("weight") {
                None => None,
                Some(toml::Value::Integer(w)) => Some(*w),
                Some(other) => {
                    return Err(ConfigError::new(format!("{at}.weight"), format!("{other} is not a number")))
                }
            };
            Ok((address, weight))
        }
        other => Err(ConfigError::new(
            at,
            format!("{other} is neither \"address:port\" nor {{ address, weight }}"),
        )),
    }
}

/// An address packets can be addressed to and forwarded to: not unspecified, multicast,
/// the IPv4 broadcast, an IPv4-mapped IPv6 address (no packet carries one).
fn usable(ip: std::net::IpAddr) -> bool {
    let special = match ip {
        std::net::IpAddr::V4(v4) => v4.is_broadcast(),
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    };
    !(ip.is_unspecified() || ip.is_multicast() || special)
}

/// `192.0.2.1:80` or `[2001:db8::1]:80`, with a port in 1..=65535 (no IPv6 scope).
fn socket_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        ConfigError::new(field, format!("{text:?} is not address:port (IPv6: [address]:port)"))
    })?;
    if addr.port() == 0 {
        return Err(ConfigError::new(field, format!("{text:?}: port 0 is not a port")));
    }
    if let SocketAddr::V6(v6) = addr {
        if v6.scope_id() != 0 {
            return Err(ConfigError::new(
                field,
                format!("{text:?}: a scoped (link-local) address is not routable"),
            ));
        }
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    fn parse(toml: &str) -> Result<Vec<ServiceConfig>, ConfigError> {
        Config::parse(toml, &HashMap::new()).map(|c| c.services)
    }

    fn field(toml: &str) -> String {
        parse(toml).unwrap_err().field
    }

    #[test]
    fn a_full_service() {
        let s = parse(
            r#"
            [[service]]
            name = "web"
            listen = "100.101.102.103:80"
            backends = ["192.0.2.11:8080", { address = "192.0.2.12:8080", weight = 3 }]
            [[service]]
            listen = "[fd7a:115c:a1e0::99]:53"
            protocol = "udp"
            table_size = 251
            backends = [{ address = "[2001:db8::11]:53" }]
            "#,
        )
        .unwrap();
        assert_eq!(s[0].name, "web");
        assert_eq!(s[0].protocol, Protocol::Tcp);
        assert_eq!(s[0].table_size, DEFAULT_TABLE_SIZE);
        assert_eq!(
            s[0].backends,
            [
                BackendConfig { address: "192.0.2.11:8080".parse().unwrap(), weight: 1 },
                BackendConfig { address: "192.0.2.12:8080".parse().unwrap(), weight: 3 },
            ]
        );
        assert_eq!(s[1].name, "[fd7a:115c:a1e0::99]:53/udp");
        assert_eq!((s[1].protocol, s[1].table_size), (Protocol::Udp, 251));
    }

    #[test]
    fn errors_name_the_entry_and_field() {
        let svc = |body: &str| format!("[[service]]\n{body}");
        assert_eq!(field(&svc("backends = [\"192.0.2.1:80\"]")), "service[0].listen");
        assert_eq!(
            field(&svc("listen = \"100.101.1.1\"\nbackends = [\"192.0.2.1:80\"]")),
            "service[0].listen"
        );
        assert_eq!(
            field(&svc("listen = \"100.101.1.1:0\"\nbackends = [\"192.0.2.1:80\"]")),
            "service[0].listen"
        );
        assert_eq!(
            field(&svc("listen = \"0.0.0.0:80\"\nbackends = [\"192.0.2.1:80\"]")),
            "service[0].listen"
        );
        assert_eq!(field(&svc("listen = \"100.101.1.1:80\"")), "service[0].backends");
        assert_eq!(field(&svc("listen = \"100.101.1.1:80\"\nbackends = []")), "service[0].backends");
        assert_eq!(
            field(&svc("listen = \"100.101.1.1:80\"\nbackends = [\"192.0.2.1:80\", \"[2001:db8::1]:80\"]")),
            "service[0].backends[1]"
        );
        assert_eq!(
            field(&svc("listen = \"100.101.1.1:80\"\nbackends = [\"192.0.2.1:80\", \"192.0.2.1:80\"]")),
            "service[0].backends[1]"
        );
        assert_eq!(
            field(&svc("listen = \"100.101.1.1:80\"\nbackends = [\"192.0.2.1:70000\"]")),
            "service[0].backends[0]"
        );
        for weight in ["0", "-1", "1001"] {
            let body = format!("listen = \"100.101.1.1:80\"\nbackends = [{{ address = \"192.0.2.1:80\", weight = {weight} }}]");
            assert_eq!(field(&svc(&body)), "service[0].backends[0].weight", "{weight}");
        }
        for size in ["16380", "7", "2000003"] {
            let body =
                format!("listen = \"100.101.1.1:80\"\nbackends = [\"192.0.2.1:80\"]\ntable_size = {size}");
            assert_eq!(field(&svc(&body)), "service[0].table_size", "{size}");
        }
        let many: Vec<String> = (0..30).map(|i| format!("\"192.0.2.{i}:80\"")).collect();
        let body = format!("listen = \"100.101.1.1:80\"\nbackends = [{}]\ntable_size = 251", many.join(","));
        assert_eq!(field(&svc(&body)), "service[0].table_size");
        assert_eq!(
            field(&svc("listen = \"100.101.1.1:80\"\nname = \"a b\"\nbackends = [\"192.0.2.1:80\"]")),
            "service[0].name"
        );
        assert_eq!(
            field(&svc("listen = \"100.101.1.1:80\"\nprotocol = \"sctp\"\nbackends = [\"192.0.2.1:80\"]")),
            "service[0].protocol"
        );
        let listen = "listen = \"100.101.1.1:80\"\n";
        for (backends, want) in [
            ("[{ address = \"192.0.2.1:80\", wieght = 3 }]", "service[0].backends[0]"),
            ("[5]", "service[0].backends[0]"),
            ("[{ address = \"192.0.2.1:80\", weight = \"3\" }]", "service[0].backends[0].weight"),
            ("[{ weight = 3 }]", "service[0].backends[0].address"),
            ("[\"127.0.0.1:80\"]", "service[0].backends[0]"),
            ("[\"255.255.255.255:80\"]", "service[0].backends[0]"),
            ("[\"100.101.1.1:80\"]", "service[0].backends[0]"),
        ] {
            assert_eq!(field(&svc(&format!("{listen}backends = {backends}"))), want, "{backends}");
        }
        for listen in ["255.255.255.255:80", "[::ffff:100.101.1.1]:80", "[fe80::1%2]:80"] {
            let body = format!("listen = \"{listen}\"\nbackends = [\"192.0.2.1:80\"]");
            assert_eq!(field(&svc(&body)), "service[0].listen", "{listen}");
        }
        let many: Vec<String> =
            (0..1001).map(|i| format!("\"10.0.{}.{}:80\"", i / 250, i % 250 + 1)).collect();
        let body = format!("{listen}backends = [{}]", many.join(","));
        assert_eq!(field(&svc(&body)), "service[0].backends");
        let two = format!(
            "{}[[service]]\nname = \"a\"\nlisten = \"100.101.1.2:80\"\nbackends = [\"192.0.2.1:80\"]\n",
            svc(&format!("name = \"a\"\n{listen}backends = [\"192.0.2.1:80\"]\n"))
        );
        assert_eq!(field(&two), "service[1].name");
    }

    #[test]
    fn duplicate_addresses_are_refused_per_protocol() {
        let two = |p1: &str, p2: &str| {
            format!(
                "[[service]]\nlisten = \"100.101.1.1:53\"\nprotocol = \"{p1}\"\nbackends = [\"192.0.2.1:53\"]\n\
                 [[service]]\nlisten = \"100.101.1.1:53\"\nprotocol = \"{p2}\"\nbackends = [\"192.0.2.2:53\"]\n"
            )
        };
        assert_eq!(field(&two("udp", "udp")), "service[1].listen");
        assert_eq!(parse(&two("udp", "tcp")).unwrap().len(), 2);
    }
}
