//! Network interfaces of the current network namespace (netlink-backed libc calls, so the
//! answers are right inside a namespace entered with setns, whatever /sys shows).

use std::collections::BTreeSet;

use nix::{ifaddrs::getifaddrs, net::if_::InterfaceFlags};

use crate::config::{Config, ConfigError};

/// The interface index of `name`, if it exists.
pub fn index(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// Names of interfaces that are up, except loopback.
pub fn up_interfaces() -> std::io::Result<BTreeSet<String>> {
    let addrs = getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter(|a| a.flags.contains(InterfaceFlags::IFF_UP))
        .filter(|a| !a.flags.contains(InterfaceFlags::IFF_LOOPBACK))
        .map(|a| a.interface_name)
        .collect())
}

/// The uplinks the config means on this host: the listed ones, which must exist, or every
/// up interface but the tunnel and loopback. The tunnel must exist too.
pub fn resolve_uplinks(config: &Config) -> Result<Vec<String>, ConfigError> {
    if index(&config.tunnel).is_none() {
        return Err(missing("tunnel", &config.tunnel));
    }
    match &config.interfaces {
        Some(list) => {
            for (i, name) in list.iter().enumerate() {
                if index(name).is_none() {
                    return Err(missing(&format!("interfaces[{i}]"), name));
                }
            }
            Ok(list.clone())
        }
        None => {
            let up = up_interfaces().map_err(|e| ConfigError {
                field: "interfaces".into(),
                message: format!("cannot list interfaces: {e}"),
            })?;
            Ok(up.into_iter().filter(|n| *n != config.tunnel).collect())
        }
    }
}

fn missing(field: &str, name: &str) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: format!("no interface named {name:?} in this network namespace"),
    }
}
