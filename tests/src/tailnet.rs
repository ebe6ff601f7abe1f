//! A subnet router with a real tailnet peer behind it:
//!
//! ```text
//!  peer ns                         gw ns                                lan ns
//!  tun0 100.101.2.3/32  ~relay~  tun0 100.101.0.1/32 (MTU 1280)
//!       fd7a:115c:a1e0::3/128         fd7a:115c:a1e0::1/128
//!  (MTU 1500)                    eth0 192.0.2.1/24       ─veth─   eth0 192.0.2.2/24
//!  routes 192.0.2.0/24,               2001:db8::1/64                   2001:db8::2/64
//!  2001:db8::/64, tailnet → tun0 routes: tailnet → tun0              (no route back to
//!                                                                      the tailnet)
//! ```
//! The relay stands in for the overlay daemon. The peer's tunnel MTU is larger than the
//! gateway's, so only the gateway's clamp keeps either end's MSS within the gateway's
//! tunnel: without it both ends would settle on 1460.

use std::{os::fd::AsFd, time::Duration};

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{
    daemon::PinDir,
    netns::{veth, Netns},
    relay::Relay,
    tun::Tun,
};

pub const PEER: &str = "100.101.2.3";
pub const PEER6: &str = "fd7a:115c:a1e0::3";
pub const GW_LAN: &str = "192.0.2.1";
pub const GW_LAN6: &str = "2001:db8::1";
pub const LAN: &str = "192.0.2.2";
pub const LAN6: &str = "2001:db8::2";
pub const GW_TUNNEL_MTU: u32 = 1280;

pub struct Tailnet {
    // Field order is drop order: the relay, then the TUN devices, then the namespaces.
    _relay: Relay,
    _gw_tun: Tun,
    _peer_tun: Tun,
    pub pins: PinDir,
    pub gw: Netns,
    pub peer: Netns,
    pub lan: Netns,
}

impl Tailnet {
    pub fn new() -> Result<Self> {
        let gw = Netns::new("tg-gw")?;
        let peer = Netns::new("tg-peer")?;
        let lan = Netns::new("tg-lan")?;
        veth(&gw, "eth0", &lan, "eth0")?;
        for (ns, addr) in [(&gw, "192.0.2.1/24"), (&lan, "192.0.2.2/24")] {
            ns.ip(&["addr", "add", addr, "dev", "eth0"])?;
        }
        for (ns, addr) in [(&gw, "2001:db8::1/64"), (&lan, "2001:db8::2/64")] {
            ns.ip(&["addr", "add", addr, "dev", "eth0", "nodad"])?;
        }
        let gw_tun = Tun::open(&gw, "tun0")?;
        let peer_tun = Tun::open(&peer, "tun0")?;
        gw.ip(&["link", "set", "tun0", "mtu", &GW_TUNNEL_MTU.to_string()])?;
        peer.ip(&["link", "set", "tun0", "mtu", "1500"])?;
        for (ns, v4, v6) in [
            (&gw, "100.101.0.1/32", "fd7a:115c:a1e0::1/128"),
            (&peer, "100.101.2.3/32", "fd7a:115c:a1e0::3/128"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", "tun0"])?;
            ns.ip(&["addr", "add", v6, "dev", "tun0", "nodad"])?;
            ns.ip(&["route", "add", "100.101.0.0/16", "dev", "tun0"])?;
            ns.ip(&["-6", "route", "add", "fd7a:115c:a1e0::/48", "dev", "tun0"])?;
        }
        // The subnet routes the peer learned from the gateway.
        peer.ip(&["route", "add", "192.0.2.0/24", "dev", "tun0"])?;
        peer.ip(&["-6", "route", "add", "2001:db8::/64", "dev", "tun0"])?;
        gw.sysctl("net.ipv4.ip_forward", "1")?;
        gw.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let relay = Relay::start(&gw_tun, &peer_tun)?;
        Ok(Self {
            _relay: relay,
            _gw_tun: gw_tun,
            _peer_tun: peer_tun,
            pins: PinDir::new(&gw),
            gw,
            peer,
            lan,
        })
    }
}

/// Config for this topology: `backend`, plus extra TOML (tables).
pub fn config(backend: &str, extra: &str) -> String {
    format!("tunnel = \"tun0\"\ninterfaces = [\"eth0\"]\nbackend = \"{backend}\"\n{extra}\n")
}

/// What a TCP connection from the peer looked like at both ends.
#[derive(Debug)]
pub struct Connection {
    /// The source address the LAN host saw.
    pub seen_from: std::net::IpAddr,
    /// `TCP_MAXSEG` of the LAN host's socket and of the peer's.
    pub lan_mss: u32,
    pub peer_mss: u32,
}

impl Tailnet {
    /// Opens a TCP connection from the peer to `dst:port` (a LAN address) and reports it.
    pub fn connect(&self, dst: &str, port: u16) -> Result<Connection> {
        use std::net::{SocketAddr, TcpStream};
        let addr: SocketAddr = SocketAddr::new(dst.parse()?, port);
        let listener = self.lan.listen_tcp(addr)?;
        let client =
            self.peer.enter(move || Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?))?;
        // The handshake is complete on the peer's side: the LAN host's accept is ready.
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        anyhow::ensure!(poll(&mut fds, PollTimeout::from(5000u16))? > 0, "no connection reached {addr}");
        let (server, seen_from) = listener.accept()?;
        Ok(Connection { seen_from: seen_from.ip(), lan_mss: maxseg(&server)?, peer_mss: maxseg(&client)? })
    }

    /// Sends UDP datagrams from the peer (address `src`) to `dst:port` on the LAN; the
    /// source address the LAN host saw, if one arrived.
    pub fn udp_source(&self, src: &str, dst: &str, port: u16) -> Result<Option<std::net::IpAddr>> {
        use std::net::SocketAddr;
        let addr: SocketAddr = SocketAddr::new(dst.parse()?, port);
        let socket = self.lan.bind_udp(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        self.peer.send_udp(src, dst, port, 3)?;
        let mut buf = [0u8; 64];
        Ok(socket.recv_from(&mut buf).ok().map(|(_, from)| from.ip()))
    }

    /// Packets counted by a counter-only rule of the host's in mangle POSTROUTING that
    /// matches `mark` (added by `watch_mark`).
    pub fn marked_packets(&self, mark: &str) -> Result<u64> {
        let out = self.gw.exec("iptables-nft-save", &["-c", "-t", "mangle"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| {
                l.contains("-A POSTROUTING")
                    && l.contains(&format!("--mark {mark}"))
                    && !l.contains("tailgate")
            })
            .context("the counter rule is gone")?;
        let counts = line.trim_start_matches('[').split(':').next().unwrap_or("0");
        Ok(counts.parse()?)
    }

    /// Adds a counter-only rule (no target) for `mark` to mangle POSTROUTING, as a host's
    /// own policy routing or accounting would.
    pub fn watch_mark(&self, mark: &str) -> Result<()> {
        let out = self
            .gw
            .exec("iptables-nft", &["-t", "mangle", "-A", "POSTROUTING", "-m", "mark", "--mark", mark])?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }
}

fn maxseg(stream: &std::net::TcpStream) -> Result<u32> {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket and an out-parameter of the right size.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            &mut value as *mut _ as *mut _,
            &mut len,
        )
    };
    anyhow::ensure!(r == 0, "getsockopt(TCP_MAXSEG): {}", std::io::Error::last_os_error());
    Ok(value as u32)
}

/// A UDP request from `from` (bound in `from_ns`) to `to` (bound in `to_ns`, which answers
/// it): the source the receiver saw, and whether the answer came back to `from`.
pub fn udp_echo(
    from_ns: &Netns,
    from: std::net::SocketAddr,
    to_ns: &Netns,
    to: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, bool)> {
    udp_via(from_ns, from, to, to_ns, to)
}

/// [`udp_echo`] where the request goes to `via` (a proxy, which sends it on to `to`): the
/// answer must come back from `via`.
pub fn udp_via(
    from_ns: &Netns,
    from: std::net::SocketAddr,
    via: std::net::SocketAddr,
    to_ns: &Netns,
    to: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, bool)> {
    let server = to_ns.bind_udp(to)?;
    let client = from_ns.bind_udp(from)?;
    for s in [&server, &client] {
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
    }
    client.send_to(b"request", via)?;
    let mut buf = [0u8; 64];
    let (_, seen) = server.recv_from(&mut buf).context("the request did not arrive")?;
    server.send_to(b"answer", seen)?;
    let answered = matches!(client.recv_from(&mut buf), Ok((6, source)) if source == via);
    Ok((seen, answered))
}

/// A TCP connection from `from_ns` to `to` (listening in `to_ns`) with one exchange of data
/// each way: the source the listener saw, and the client's own address.
pub fn tcp_echo(
    from_ns: &Netns,
    to_ns: &Netns,
    to: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, std::net::SocketAddr)> {
    tcp_via(from_ns, to, to_ns, to)
}

/// [`tcp_echo`] where the client connects to `via` (a proxy, which sends the connection on
/// to `to`); the client must see `via` as its peer.
pub fn tcp_via(
    from_ns: &Netns,
    via: std::net::SocketAddr,
    to_ns: &Netns,
    to: std::net::SocketAddr,
) -> Result<(std::net::SocketAddr, std::net::SocketAddr)> {
    use std::{
        io::{Read, Write},
        net::TcpStream,
    };
    let listener = to_ns.listen_tcp(to)?;
    let mut client = from_ns.enter(move || {
        TcpStream::connect_timeout(&via, Duration::from_secs(5))
            .with_context(|| format!("connecting to {via}"))
    })?;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    anyhow::ensure!(poll(&mut fds, PollTimeout::from(5000u16))? > 0, "no connection reached {to}");
    let (mut server, seen) = listener.accept()?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
    }
    let mut buf = [0u8; 4];
    client.write_all(b"ping")?;
    server.read_exact(&mut buf).context("the request did not arrive")?;
    server.write_all(b"pong")?;
    client.read_exact(&mut buf).context("the answer did not come back")?;
    anyhow::ensure!(&buf == b"pong", "answer {buf:?}");
    let peer = client.peer_addr()?;
    anyhow::ensure!(peer == via, "the client talks to {peer}, not {via}");
    Ok((seen, client.local_addr()?))
}
