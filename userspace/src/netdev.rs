//! Network interfaces of the current network namespace (netlink-backed libc calls, so the
//! answers are right inside a namespace entered with setns, whatever /sys shows).

use std::{collections::BTreeMap, io, os::fd::AsRawFd};

use nix::{
    net::if_::{if_nameindex, InterfaceFlags},
    sys::socket::{socket, AddressFamily, SockFlag, SockType},
};

use crate::config::{Config, ConfigError};

/// `ARPHRD_ETHER`: the XDP program parses Ethernet frames.
const ARPHRD_ETHER: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    pub up: bool,
    pub loopback: bool,
    /// Link type (`ARPHRD_*`); TUN and WireGuard devices are `ARPHRD_NONE`.
    pub link_type: u16,
}

impl Interface {
    pub fn ethernet(&self) -> bool {
        self.link_type == ARPHRD_ETHER
    }
}

/// The interfaces of this network namespace, by name.
pub fn interfaces() -> io::Result<BTreeMap<String, Interface>> {
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    let mut found = BTreeMap::new();
    for iface in if_nameindex()?.iter() {
        let name = iface.name().to_string_lossy().into_owned();
        let mut req = ifreq(&name);
        // SAFETY: valid socket and ifreq; the kernel fills ifr_flags.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            continue; // gone meanwhile
        }
        let flags = InterfaceFlags::from_bits_truncate(unsafe { req.ifr_ifru.ifru_flags } as libc::c_int);
        let mut req = ifreq(&name);
        // SAFETY: as above; the kernel fills ifr_hwaddr, whose family is the link type.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
            continue;
        }
        let link_type = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
        let up = flags.contains(InterfaceFlags::IFF_UP);
        let loopback = flags.contains(InterfaceFlags::IFF_LOOPBACK);
        found.insert(name, Interface { up, loopback, link_type });
    }
    Ok(found)
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *dst = src as libc::c_char;
    }
    req
}

/// The uplinks the config means on this host: the listed ones, which must exist and be
/// Ethernet, or every up Ethernet interface but the tunnel (others are skipped with a log
/// line). The tunnel must exist.
pub fn resolve_uplinks(config: &Config) -> Result<Vec<String>, ConfigError> {
    let all = interfaces().map_err(|e| error("interfaces", format!("cannot list interfaces: {e}")))?;
    if !all.contains_key(&config.tunnel) {
        return Err(missing("tunnel", &config.tunnel));
    }
    match &config.interfaces {
        Some(list) => {
            for (i, name) in list.iter().enumerate() {
                let field = format!("interfaces[{i}]");
                let iface = all.get(name).ok_or_else(|| missing(&field, name))?;
                if !iface.ethernet() {
                    let why = format!(
                        "{name:?} is not an Ethernet device (link type {}); uplinks must be Ethernet",
                        iface.link_type
                    );
                    return Err(error(&field, why));
                }
            }
            Ok(list.clone())
        }
        None => {
            let candidates = all.iter().filter(|(name, i)| i.up && !i.loopback && **name != config.tunnel);
            let (uplinks, skipped): (Vec<_>, Vec<_>) = candidates.partition(|(_, i)| i.ethernet());
            if !skipped.is_empty() {
                let names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
                tracing::info!("not Ethernet, not used as uplinks: {}", names.join(", "));
            }
            Ok(uplinks.into_iter().map(|(name, _)| name.clone()).collect())
        }
    }
}

fn missing(field: &str, name: &str) -> ConfigError {
    error(field, format!("no interface named {name:?} in this network namespace"))
}

fn error(field: &str, message: String) -> ConfigError {
    ConfigError { field: field.into(), message }
}
