//! Network namespaces owned by a guard.

use std::{
    fs::File,
    os::fd::AsFd,
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// A network namespace created for a test; deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        let name = crate::unique(tag);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a command inside the namespace and returns its output (not checked).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.name))
    }

    /// Sets a sysctl inside the namespace only.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let out = self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        if !out.status.success() {
            bail!("sysctl {key} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// One ping with a 1 s timeout, optionally from a given source address.
    pub fn ping(&self, dst: &str, src: Option<&str>) -> bool {
        let mut args = vec!["-c", "1", "-W", "1", "-n", "-q"];
        if let Some(src) = src {
            args.extend(["-I", src]);
        }
        args.push(dst);
        self.exec("ping", &args).map(|o| o.status.success()).unwrap_or(false)
    }

    /// Sends `count` UDP datagrams from `src` (an address of this namespace) to `dst:port`.
    pub fn send_udp(&self, src: &str, dst: &str, port: u16, count: usize) -> Result<()> {
        let (src, dst) = (src.to_string(), format!("{dst}:{port}"));
        self.enter(move || {
            let sock = std::net::UdpSocket::bind((src.as_str(), 0))?;
            for _ in 0..count {
                sock.send_to(b"tailgate", &dst)?;
            }
            Ok(())
        })
    }

    /// A TCP listener on `addr` in this namespace; see [`Netns::bind`].
    pub fn listen_tcp(&self, addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
        self.bind(addr, std::net::TcpListener::bind)
    }

    /// A UDP socket bound to `addr` in this namespace; see [`Netns::bind`].
    pub fn bind_udp(&self, addr: std::net::SocketAddr) -> Result<std::net::UdpSocket> {
        self.bind(addr, std::net::UdpSocket::bind)
    }

    /// Binds a fixed address that an earlier socket of the same test may still hold for
    /// a moment: a process that another test's thread forks keeps a copy of every open
    /// socket until it execs (close-on-exec closes them only then), so a listener dropped
    /// just before can still be listening. Tries again while the address is in use, for
    /// at most 3 s.
    fn bind<S: Send>(
        &self,
        addr: std::net::SocketAddr,
        bind: fn(std::net::SocketAddr) -> std::io::Result<S>,
    ) -> Result<S> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        self.enter(move || loop {
            match bind(addr) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                other => return other.with_context(|| format!("binding {addr}")),
            }
        })
    }

    /// Runs `f` on a thread that has entered this namespace (sockets and devices it
    /// creates belong to the namespace).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).context("setns")?;
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A veth pair: `a_name` in `a`, `b_name` in `b`, both up, created directly inside the
/// namespaces.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    a.ip(&["link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", b.name()])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])
}

pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
