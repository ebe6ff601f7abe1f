//! Network interfaces of the current network namespace, over rtnetlink: a dump for the
//! current list (and their addresses), and a subscription to link and address events so
//! the daemon follows devices that are created, deleted, renamed or brought up while it
//! runs, and the tunnel's addresses.

use std::{collections::BTreeMap, io};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::{
    link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage},
    RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, Socket, SocketAddr, TokioSocket};

use crate::config::{Config, ConfigError};

/// `RTMGRP_LINK`, `RTMGRP_IPV4_IFADDR`, `RTMGRP_IPV6_IFADDR`: the multicast groups of link
/// and address events.
const RTMGRP_LINK: u32 = 1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub up: bool,
    pub loopback: bool,
    /// Link type (`ARPHRD_*`); TUN and WireGuard devices are `ARPHRD_NONE`.
    pub link_type: u16,
    /// `None` when the kernel did not say.
    pub mtu: Option<u32>,
}

impl Interface {
    /// The XDP program parses Ethernet frames.
    pub fn ethernet(&self) -> bool {
        self.link_type == u16::from(LinkLayerType::Ether)
    }
}

/// The interfaces of this network namespace, by name.
pub fn interfaces() -> io::Result<BTreeMap<String, Interface>> {
    let mut found = BTreeMap::new();
    dump(RouteNetlinkMessage::GetLink(LinkMessage::default()), |message| {
        if let RouteNetlinkMessage::NewLink(link) = message {
            if let Some((name, iface)) = describe(&link) {
                found.insert(name, iface);
            }
        }
    })?;
    Ok(found)
}

/// The addresses of every interface of this network namespace, by ifindex.
pub fn addresses() -> io::Result<BTreeMap<u32, Vec<std::net::IpAddr>>> {
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    let mut found: BTreeMap<u32, Vec<std::net::IpAddr>> = BTreeMap::new();
    dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()), |message| {
        if let RouteNetlinkMessage::NewAddress(address) = message {
            // IFA_LOCAL is the interface's own address on point-to-point devices (a TUN with
            // a peer); IFA_ADDRESS otherwise.
            let local = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let any = address.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(any) {
                found.entry(address.header.index).or_default().push(ip);
            }
        }
    })?;
    Ok(found)
}

/// What the kernel's routing decides for a packet (`ip route get DST from SRC iif DEV mark M`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Delivered to this host.
    Local,
    /// Sent out of the device with this ifindex, from this source address when the host
    /// sends it (the kernel's choice: what MASQUERADE takes too).
    Out(u32, Option<std::net::IpAddr>),
    /// Not routable: the kernel's answer (unreachable, prohibited, blackhole, an error).
    Refused(String),
}

/// The kernel's route for a packet from `src` to `dst` with fwmark `mark`, arriving on
/// `iif` (an input route: forwarding, reverse-path checks and policy rules apply), or
/// sent by this host (`iif` 0).
pub fn route(src: std::net::IpAddr, dst: std::net::IpAddr, iif: u32, mark: u32) -> io::Result<Route> {
    use netlink_packet_route::{
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
        AddressFamily,
    };
    let mut message = RouteMessage::default();
    message.header.address_family = if dst.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    message.header.destination_prefix_length = if dst.is_ipv4() { 32 } else { 128 };
    message.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst)));
    if iif != 0 {
        message.header.source_prefix_length = if src.is_ipv4() { 32 } else { 128 };
        message.attributes.push(RouteAttribute::Source(RouteAddress::from(src)));
        message.attributes.push(RouteAttribute::Iif(iif));
    }
    if mark != 0 {
        message.attributes.push(RouteAttribute::Mark(mark));
    }
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetRoute(message)),
    );
    request.header.flags = NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let (data, _) = socket.recv_from_full()?;
    let answer: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(&data)
        .map_err(|e| io::Error::other(format!("bad rtnetlink message: {e}")))?;
    match answer.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => Ok(match route.header.kind {
            RouteType::Local | RouteType::Broadcast => Route::Local,
            RouteType::Unicast => match route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(oif) => Some(*oif),
                _ => None,
            }) {
                Some(oif) => Route::Out(
                    oif,
                    route.attributes.iter().find_map(|a| match a {
                        RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(std::net::IpAddr::V4(*ip)),
                        RouteAttribute::PrefSource(RouteAddress::Inet6(ip)) => {
                            Some(std::net::IpAddr::V6(*ip))
                        }
                        _ => None,
                    }),
                ),
                None => Route::Refused("a route without a device".into()),
            },
            other => Route::Refused(format!("{other:?}").to_lowercase()),
        }),
        NetlinkPayload::Error(e) => Ok(Route::Refused(match e.code {
            Some(code) => io::Error::from_raw_os_error(-code.get()).to_string(),
            None => "refused".into(),
        })),
        other => Err(io::Error::other(format!("unexpected rtnetlink answer {other:?}"))),
    }
}

/// Sends a dump request and hands every message of the answer to `each`.
fn dump(request: RouteNetlinkMessage, mut each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut request = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(request));
    request.header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut offset = 0;
        while offset < data.len() {
            let message: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&data[offset..])
                    .map_err(|e| io::Error::other(format!("bad rtnetlink message: {e}")))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => return Err(io::Error::other(format!("rtnetlink: {e:?}"))),
                NetlinkPayload::InnerMessage(inner) => each(inner),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

fn describe(link: &LinkMessage) -> Option<(String, Interface)> {
    let name = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })?;
    let flags = link.header.flags;
    let iface = Interface {
        index: link.header.index,
        up: flags.contains(LinkFlags::Up),
        loopback: flags.contains(LinkFlags::Loopback),
        link_type: u16::from(link.header.link_layer_type),
        mtu: link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
            .filter(|mtu| *mtu > 0),
    };
    Some((name, iface))
}

/// Link and address events of this network namespace (new, changed, deleted devices; their
/// addresses: the proxies follow them).
pub struct LinkEvents {
    socket: TokioSocket,
}

impl LinkEvents {
    /// Subscribes. Call from within the tokio runtime.
    pub fn subscribe() -> io::Result<Self> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        socket.socket_mut().bind(&SocketAddr::new(0, groups))?;
        Ok(Self { socket })
    }

    /// Waits for the next batch of link events and consumes every event already queued.
    /// An overflowing socket (`ENOBUFS`: events were lost) counts as a change too: the
    /// caller re-reads the whole list anyway.
    pub async fn changed(&mut self) -> io::Result<()> {
        match self.socket.recv_from_full().await {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => return Err(e),
        }
        let mut buf = Vec::with_capacity(16 << 10);
        loop {
            buf.clear();
            match self.socket.socket_ref().recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// How strictly to treat listed uplinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// At start and `check`: a listed uplink that does not exist or is not Ethernet is a
    /// configuration error (a typo must not go unnoticed).
    Config,
    /// At a reload: one that is not Ethernet is an error; one that is absent is waited for
    /// (it may be going through a restart of its own).
    Reload,
    /// On device events: the config was accepted already, so nothing is an error; an absent
    /// listed uplink stays wanted, one re-created as non-Ethernet is skipped with a warning.
    Running,
}

/// The uplinks the config means on this host right now: the listed ones (which, with
/// `Check::Config`, must exist and be Ethernet), or every up Ethernet interface but the
/// tunnel and `lo` (others are skipped with a log line). The tunnel need not exist.
pub fn resolve_uplinks(
    config: &Config,
    all: &BTreeMap<String, Interface>,
    check: Check,
) -> Result<Vec<String>, ConfigError> {
    match &config.interfaces {
        Some(list) => {
            let mut uplinks = Vec::new();
            for (i, name) in list.iter().enumerate() {
                let field = format!("{}[{i}]", config.sources.interfaces);
                match (all.get(name), check) {
                    (Some(iface), _) if iface.ethernet() => uplinks.push(name.clone()),
                    (Some(iface), Check::Config | Check::Reload) => {
                        let why = format!(
                            "{name:?} is not an Ethernet device (link type {}); uplinks must be Ethernet",
                            iface.link_type
                        );
                        return Err(error(&field, why));
                    }
                    (None, Check::Config) => {
                        return Err(error(
                            &field,
                            format!("no interface named {name:?} in this network namespace"),
                        ))
                    }
                    (Some(_), Check::Running) => {
                        tracing::warn!("{field}: {name:?} is no longer an Ethernet device; not attached")
                    }
                    (None, Check::Reload | Check::Running) => uplinks.push(name.clone()),
                }
            }
            Ok(uplinks)
        }
        None => {
            let candidates = all.iter().filter(|(name, i)| i.up && !i.loopback && **name != config.tunnel);
            let (uplinks, skipped): (Vec<_>, Vec<_>) = candidates.partition(|(_, i)| i.ethernet());
            if !skipped.is_empty() && check == Check::Config {
                let names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
                tracing::info!("not Ethernet, not used as uplinks: {}", names.join(", "));
            }
            Ok(uplinks.into_iter().map(|(name, _)| name.clone()).collect())
        }
    }
}

/// `interfaces()` as a configuration error naming what failed.
pub fn list_for_config() -> Result<BTreeMap<String, Interface>, ConfigError> {
    interfaces().map_err(|e| error("interfaces", format!("cannot list interfaces: {e}")))
}

fn error(field: &str, message: String) -> ConfigError {
    ConfigError { field: field.into(), message }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn iface(index: u32, up: bool, link_type: u16) -> Interface {
        Interface { index, up, loopback: index == 1, link_type, mtu: Some(1500) }
    }

    fn host() -> BTreeMap<String, Interface> {
        [
            ("lo", iface(1, true, 772)),
            ("eth0", iface(2, true, 1)),
            ("eth1", iface(3, false, 1)),
            ("tun0", iface(4, true, 65534)),
            ("wg0", iface(5, true, 65534)),
        ]
        .into_iter()
        .map(|(n, i)| (n.to_string(), i))
        .collect()
    }

    fn config(toml: &str) -> Config {
        Config::parse(toml, &HashMap::new()).unwrap()
    }

    #[test]
    fn auto_uplinks_are_the_up_ethernet_interfaces_and_the_tunnel_may_be_absent() {
        let c = config("tunnel = \"tun9\"");
        assert_eq!(resolve_uplinks(&c, &host(), Check::Config).unwrap(), ["eth0"]);
    }

    #[test]
    fn listed_uplinks_must_exist_at_start_and_may_come_and_go_while_running() {
        let c = config("tunnel = \"tun0\"\ninterfaces = [\"eth0\", \"eth7\"]");
        let e = resolve_uplinks(&c, &host(), Check::Config).unwrap_err();
        assert_eq!(e.field, "interfaces[1]");
        assert_eq!(resolve_uplinks(&c, &host(), Check::Running).unwrap(), ["eth0", "eth7"]);
        let c = config("tunnel = \"tun0\"\ninterfaces = [\"wg0\"]");
        assert!(resolve_uplinks(&c, &host(), Check::Config).unwrap_err().message.contains("not an Ethernet"));
        assert!(resolve_uplinks(&c, &host(), Check::Reload).is_err(), "wrong type at reload");
        assert!(resolve_uplinks(&c, &host(), Check::Running).unwrap().is_empty());
    }
}
