//! Services: the `[[service]]` entries as the datapath enforces them, with what both backends
//! derive from them (the Maglev table, the identity a table is reused by).

use std::{net::SocketAddr, sync::Arc};

use super::maglev;
use crate::config::{Config, ServiceConfig};

/// The services, shared (10,000 of them with their backends are megabytes).
pub type Services = Arc<Vec<ServiceConfig>>;

pub fn compile(config: &Config) -> Services {
    Arc::new(config.services.clone())
}

/// A backend's identity: what its permutation in every table is hashed from, so every
/// gateway with the same backends builds the same table.
pub fn identity(address: &SocketAddr) -> String {
    address.to_string()
}

/// The service's Maglev table: slot → index into `service.backends`.
pub fn table(service: &ServiceConfig) -> Vec<u32> {
    let backends: Vec<maglev::Backend> = service
        .backends
        .iter()
        .map(|b| maglev::Backend { id: identity(&b.address), weight: b.weight })
        .collect();
    maglev::table(&backends, service.table_size)
}

/// A fixed hash of what the table is built from (size, backends, weights; not their order):
/// equal digests, equal tables. Lets a map sync keep a table that did not change.
pub fn digest(service: &ServiceConfig) -> u64 {
    let mut parts: Vec<String> =
        service.backends.iter().map(|b| format!("{}={}", identity(&b.address), b.weight)).collect();
    parts.sort();
    let text = format!("{}|{}", service.table_size, parts.join(","));
    maglev::hash(text.as_bytes(), DIGEST_SEED)
}

const DIGEST_SEED: u64 = 0x7365_7276_6963_6573; // "services"

/// Whether any service is of this family (IP forwarding is needed for it).
pub fn any_v4(services: &[ServiceConfig]) -> bool {
    services.iter().any(|s| s.listen.is_ipv4())
}

pub fn any_v6(services: &[ServiceConfig]) -> bool {
    services.iter().any(|s| s.listen.is_ipv6())
}

/// `name (listen/protocol)` for logs.
pub fn describe(service: &ServiceConfig) -> String {
    format!("{} ({}/{})", service.name, service.listen, service.protocol.name())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn services(toml: &str) -> Services {
        compile(&Config::parse(toml, &HashMap::new()).unwrap())
    }

    const TWO: &str = r#"
        [[service]]
        listen = "100.101.102.103:80"
        backends = ["192.0.2.11:8080", { address = "192.0.2.12:8080", weight = 3 }]
    "#;

    #[test]
    fn the_digest_follows_what_the_table_is_built_from() {
        let a = services(TWO);
        let reordered = services(
            r#"
            [[service]]
            listen = "100.101.102.103:80"
            name = "renamed"
            backends = [{ address = "192.0.2.12:8080", weight = 3 }, "192.0.2.11:8080"]
            "#,
        );
        assert_eq!(digest(&a[0]), digest(&reordered[0]));
        assert_eq!(table(&a[0]).len(), 16_381);
        let reweighted = services(&TWO.replace("weight = 3", "weight = 2"));
        assert_ne!(digest(&a[0]), digest(&reweighted[0]));
        let resized = services(&format!("{TWO}table_size = 4093"));
        assert_ne!(digest(&a[0]), digest(&resized[0]));
    }

    #[test]
    fn weights_shape_the_table() {
        let s = services(TWO);
        let t = table(&s[0]);
        let second = t.iter().filter(|&&i| i == 1).count();
        // 3 of 4 turns, within one slot.
        assert!((second as f64 - 16_381.0 * 0.75).abs() <= 1.0, "{second}");
    }
}
