//! `[nat]`: the BPF NAT engine's source ports (the masquerade's).
//!
//! ```toml
//! [nat]
//! ports = "61000-65535"   # outside the host's net.ipv4.ip_local_port_range
//! ```
//! Environment: `TAILGATE_NAT_PORTS`.

use serde::Deserialize;

use super::ConfigError;

/// The default range: above Linux's default `ip_local_port_range` (32768-60999).
pub const DEFAULT_PORTS: [u16; 2] = [61_000, 65_535];
/// Fewer ports than this per destination would refuse flows long before the table fills.
pub const MIN_PORTS: u32 = 1_024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatConfig {
    /// First and last source port (inclusive) given to translated flows.
    pub ports: [u16; 2],
}

impl Default for NatConfig {
    fn default() -> Self {
        Self { ports: DEFAULT_PORTS }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNat {
    pub ports: Option<String>,
    #[serde(skip)]
    pub ports_source: Option<&'static str>,
}

impl RawNat {
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("TAILGATE_NAT_PORTS") {
            self.ports = Some(v);
            self.ports_source = Some("TAILGATE_NAT_PORTS");
        }
    }

    pub fn validate(self) -> Result<NatConfig, ConfigError> {
        let field = self.ports_source.unwrap_or("nat.ports");
        let Some(text) = self.ports else { return Ok(NatConfig::default()) };
        let bad = || ConfigError::new(field, format!("{text:?} is not a port range like \"61000-65535\""));
        let (first, last) = text.trim().split_once('-').ok_or_else(bad)?;
        let first: u16 = first.trim().parse().map_err(|_| bad())?;
        let last: u16 = last.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(ConfigError::new(field, format!("{first}-{last}: the first port must be 1..=last")));
        }
        let count = u32::from(last - first) + 1;
        if count < MIN_PORTS {
            return Err(ConfigError::new(
                field,
                format!("{first}-{last} holds {count} ports; at least {MIN_PORTS} are needed"),
            ));
        }
        Ok(NatConfig { ports: [first, last] })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::config::Config;

    fn parse(toml: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::parse(toml, &env).map_err(|e| e.to_string())
    }

    #[test]
    fn default_and_overrides() {
        assert_eq!(parse("", &[]).unwrap().nat.ports, [61_000, 65_535]);
        assert_eq!(parse("[nat]\nports = \"40000-49999\"", &[]).unwrap().nat.ports, [40_000, 49_999]);
        let env = [("TAILGATE_NAT_PORTS", "50000-60000")];
        assert_eq!(parse("[nat]\nports = \"40000-49999\"", &env).unwrap().nat.ports, [50_000, 60_000]);
    }

    #[test]
    fn bad_ranges_name_the_field() {
        for (value, says) in [
            ("61000", "not a port range"),
            ("a-b", "not a port range"),
            ("0-2000", "first port"),
            ("65000-64000", "first port"),
            ("61000-70000", "not a port range"),
            ("61000-61100", "at least 1024"),
        ] {
            let e = parse(&format!("[nat]\nports = \"{value}\""), &[]).unwrap_err();
            assert!(e.contains("nat.ports") && e.contains(says), "{value}: {e}");
        }
        let e = parse("", &[("TAILGATE_NAT_PORTS", "1-2")]).unwrap_err();
        assert!(e.contains("TAILGATE_NAT_PORTS"), "{e}");
    }
}
