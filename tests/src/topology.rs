//! The gateway topology the scenarios share:
//!
//! ```text
//!  lan ns                     gw ns                              side ns
//!  eth0 100.64.0.2/24  ─veth─ eth0 100.64.0.1/24  (uplink, XDP)
//!       192.0.2.2/24               192.0.2.1/24
//!       100.90.0.9/32 (spoof)
//!       fd7a:115c:a1e0::2/64      fd7a:115c:a1e0::1/64, 2001:db8::1/64
//!       2001:db8::2/64
//!                             eth1 198.51.100.1/24 ─veth─ eth0 198.51.100.2/24
//!                                  100.64.7.1/24               100.64.7.2/24
//!                             tun0 100.101.0.1/32 (TUN held by the test; TC egress)
//!                                  route 100.101.0.0/16 (the tailnet)
//! ```
//! The LAN is CGNAT space, as on clouds that number their LANs there. eth1 is not an
//! uplink (a container bridge, say), so CGNAT sources from it reach the forward path.

use anyhow::Result;

use crate::{
    daemon::PinDir,
    netns::{veth, Netns},
    tun::Tun,
};

pub const GW_LAN_CGNAT: &str = "100.64.0.1";
pub const GW_LAN: &str = "192.0.2.1";
pub const LAN_CGNAT: &str = "100.64.0.2";
pub const LAN: &str = "192.0.2.2";
pub const LAN_SPOOF: &str = "100.90.0.9";
pub const SIDE: &str = "198.51.100.2";
pub const SIDE_CGNAT: &str = "100.64.7.2";
pub const GW_TAILNET: &str = "100.101.0.1";
pub const GW_ULA: &str = "fd7a:115c:a1e0::1";
pub const LAN_ULA: &str = "fd7a:115c:a1e0::2";
pub const GW_V6: &str = "2001:db8::1";
pub const LAN_V6: &str = "2001:db8::2";
pub const PEER: &str = "100.101.2.3";

/// What the default config attaches on this topology with BPF, as `daemon::attachments`
/// lists it.
pub const BPF_ATTACHMENTS: [&str; 6] = [
    "xdp@eth0",
    "uplink_egress@eth0",
    "tc_egress@tun0",
    "tc_ingress@tun0",
    "masquerade_in@eth0",
    "masquerade_out@eth0",
];

/// The backends every scenario runs on.
pub const BACKENDS: [&str; 2] = ["bpf", "iptables"];

/// Config for this topology: `backend`, and extra TOML for the `[cgnat]` table.
pub fn config(backend: &str, cgnat: &str) -> String {
    format!("tunnel = \"tun0\"\ninterfaces = [\"eth0\"]\nbackend = \"{backend}\"\n[cgnat]\n{cgnat}\n")
}

/// Runs a scenario function `fn(backend: &str)` once per backend, as tests `<name>::bpf` and
/// `<name>::iptables`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn bpf() {
                super::$name("bpf")
            }
            #[test]
            fn iptables() {
                super::$name("iptables")
            }
        }
    )*};
}

pub struct Topology {
    // Field order is drop order: the TUN goes before its namespace.
    pub tun: Tun,
    pub pins: PinDir,
    pub gw: Netns,
    pub lan: Netns,
    pub side: Netns,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let gw = Netns::new("tg-gw")?;
        let lan = Netns::new("tg-lan")?;
        let side = Netns::new("tg-side")?;
        veth(&gw, "eth1", &side, "eth0")?;
        for (ns, dev, addr) in [
            (&gw, "eth1", "198.51.100.1/24"),
            (&gw, "eth1", "100.64.7.1/24"),
            (&side, "eth0", "198.51.100.2/24"),
            (&side, "eth0", "100.64.7.2/24"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", dev])?;
        }
        side.ip(&["route", "add", "100.101.0.0/16", "via", "198.51.100.1"])?;
        let tun = Tun::open(&gw, "tun0")?;
        gw.sysctl("net.ipv4.ip_forward", "1")?;
        let t = Self { tun, pins: PinDir::new(&gw), gw, lan, side };
        t.wire_lan()?;
        t.wire_tunnel()?;
        Ok(t)
    }

    /// The gateway's eth0 and the LAN host's eth0, with their addresses and the LAN's
    /// default route.
    fn wire_lan(&self) -> Result<()> {
        let (gw, lan) = (&self.gw, &self.lan);
        veth(gw, "eth0", lan, "eth0")?;
        for (ns, addr) in [
            (gw, "100.64.0.1/24"),
            (gw, "192.0.2.1/24"),
            (lan, "100.64.0.2/24"),
            (lan, "192.0.2.2/24"),
            (lan, "100.90.0.9/32"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", "eth0"])?;
        }
        for (ns, addr) in [
            (gw, "fd7a:115c:a1e0::1/64"),
            (gw, "2001:db8::1/64"),
            (lan, "fd7a:115c:a1e0::2/64"),
            (lan, "2001:db8::2/64"),
        ] {
            ns.ip(&["addr", "add", addr, "dev", "eth0", "nodad"])?;
        }
        lan.ip(&["route", "add", "default", "via", GW_LAN])
    }

    /// The tunnel's address and the tailnet route through it.
    fn wire_tunnel(&self) -> Result<()> {
        self.gw.ip(&["addr", "add", "100.101.0.1/32", "dev", "tun0"])?;
        self.gw.ip(&["route", "add", "100.101.0.0/16", "dev", "tun0"])
    }

    /// Deletes the tunnel device, as a restart of the overlay daemon does.
    pub fn delete_tunnel(&mut self) -> Result<()> {
        self.tun.delete(&self.gw)
    }

    /// Creates the tunnel device anew (a new ifindex), with its address and route.
    pub fn create_tunnel(&mut self) -> Result<()> {
        self.tun.create(&self.gw)?;
        self.wire_tunnel()
    }

    /// Deletes the LAN link (both ends of the veth pair) and creates it anew.
    pub fn recreate_lan(&self) -> Result<()> {
        self.gw.ip(&["link", "del", "eth0"])?;
        self.wire_lan()
    }

    /// The ifindex of `dev` in the gateway.
    pub fn ifindex(&self, dev: &str) -> Option<u64> {
        let out = self.gw.exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")]).ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Whether `backend`'s datapath is installed in the gateway namespace (iptables: its
    /// filter rules; the BPF backend keeps a nat rule too, see `netfilter_rules`).
    pub fn installed(&self, backend: &str) -> bool {
        let (program, args, needle): (&str, &[&str], &str) = match backend {
            "bpf" => ("ip", &["-d", "link", "show", "dev", "eth0"], "prog/xdp"),
            _ => ("iptables-save", &["-t", "filter"], "tailgate:"),
        };
        let out = self.gw.exec(program, args).expect("inspecting the gateway");
        String::from_utf8_lossy(&out.stdout).contains(needle)
    }

    /// Whether any rule of tailgate's is in the gateway's netfilter tables (either backend).
    pub fn netfilter_rules(&self) -> bool {
        ["iptables-save", "ip6tables-save"].iter().any(|program| {
            let out = self.gw.exec(program, &[]).expect("inspecting the gateway");
            String::from_utf8_lossy(&out.stdout).contains("tailgate:")
        })
    }

    /// The ipset sets in the gateway's namespace (the iptables backend's prefix lists).
    pub fn ipsets(&self) -> Vec<String> {
        let out = self.gw.exec("ipset", &["list", "-n"]).expect("listing the gateway's sets");
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// Whether the LAN neighbour and the gateway can exchange pings over CGNAT addresses.
    pub fn cgnat_neighbours_ping(&self) -> bool {
        self.lan.ping(GW_LAN_CGNAT, Some(LAN_CGNAT))
    }
}
