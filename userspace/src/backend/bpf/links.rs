//! Attaching programs as pinned BPF links, taking over links a previous run left pinned
//! (atomic program replacement: no moment without a program), and asking the kernel which
//! device a link is attached to (none once the device is gone).

use std::{os::fd::AsFd, path::Path};

use anyhow::{anyhow, Context, Result};
use aya::{
    programs::{
        links::LinkOrder,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf,
};
use tailgate_abi::programs;

use super::{pins, sys};

/// Where a program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// XDP on an uplink (native if the driver supports it, generic otherwise).
    Xdp,
    /// TC egress (TCX) on an uplink: the gateway's own flows (`[cgnat] allow_replies`).
    UplinkEgress,
    /// TC egress (TCX) on the tunnel.
    TcEgress,
    /// TC ingress (TCX) on the tunnel.
    TcIngress,
    /// TC ingress on the tunnel, first of all programs there, while services are configured:
    /// DNAT. (After the tunnel's own hooks in this order: one pass attaches those first.)
    ServiceIn,
    /// TC egress on the tunnel, last of all programs there: services' reverse NAT.
    ServiceOut,
    /// The same on every uplink (TC ingress first, TC egress last), for LAN clients.
    ServiceUplinkIn,
    ServiceUplinkOut,
    /// TC ingress on every uplink, first, while masquerading: replies translated back.
    MasqueradeIn,
    /// TC egress on every uplink, first (before the services' reverse NAT): the masquerade.
    MasqueradeOut,
    /// TC egress on the tunnel, last, with the egress proxy: its SNAT.
    ProxyOut,
}

impl Hook {
    pub const ALL: [Hook; 11] = [
        Hook::Xdp,
        Hook::UplinkEgress,
        Hook::TcEgress,
        Hook::TcIngress,
        Hook::ServiceIn,
        Hook::ServiceOut,
        Hook::ServiceUplinkIn,
        Hook::ServiceUplinkOut,
        Hook::MasqueradeIn,
        Hook::MasqueradeOut,
        Hook::ProxyOut,
    ];

    pub const fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcEgress => "tc_egress",
            Hook::TcIngress => "tc_ingress",
            Hook::UplinkEgress => "uplink_egress",
            Hook::ServiceIn => "service_in",
            Hook::ServiceOut => "service_out",
            Hook::ServiceUplinkIn => "service_uplink_in",
            Hook::ServiceUplinkOut => "service_uplink_out",
            Hook::MasqueradeIn => "masquerade_in",
            Hook::MasqueradeOut => "masquerade_out",
            Hook::ProxyOut => "proxy_out",
        }
    }

    pub const fn program(self) -> &'static str {
        match self {
            Hook::Xdp => programs::UPLINK_XDP,
            Hook::TcEgress => programs::TUNNEL_EGRESS,
            Hook::TcIngress => programs::TUNNEL_INGRESS,
            Hook::UplinkEgress => programs::UPLINK_EGRESS,
            Hook::ServiceIn => programs::SERVICE_IN,
            Hook::ServiceOut => programs::SERVICE_OUT,
            Hook::ServiceUplinkIn => programs::SERVICE_UPLINK_IN,
            Hook::ServiceUplinkOut => programs::SERVICE_UPLINK_OUT,
            Hook::MasqueradeIn => programs::MASQUERADE_IN,
            Hook::MasqueradeOut => programs::MASQUERADE_OUT,
            Hook::ProxyOut => programs::PROXY_OUT,
        }
    }
}

/// Loads (verifies) the program of `hook`.
pub fn load(ebpf: &mut Ebpf, hook: Hook) -> Result<()> {
    match hook {
        Hook::Xdp => xdp(ebpf)?.load()?,
        // Every other hook is a TC (TCX) one.
        _ => tc(ebpf, hook)?.load()?,
    }
    Ok(())
}

/// One attachment as its pin names it: `<hook>@<ifname>:<ifindex>`. Interface names cannot
/// contain ':', so the split is unambiguous; the ifindex tells a re-created device (same
/// name, new index) from the one the link was made for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PinName {
    pub hook: Hook,
    pub ifname: String,
    pub ifindex: u32,
}

impl PinName {
    pub fn parse(name: &str) -> Option<Self> {
        let (prefix, rest) = name.split_once('@')?;
        let (ifname, ifindex) = rest.rsplit_once(':')?;
        let hook = Hook::ALL.into_iter().find(|h| h.pin_prefix() == prefix)?;
        Some(Self { hook, ifname: ifname.to_string(), ifindex: ifindex.parse().ok()? })
    }
}

impl std::fmt::Display for PinName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.hook.pin_prefix(), self.ifname, self.ifindex)
    }
}

/// Attaches `hook`'s program to interface `ifindex` (`ifname` for messages) and pins the link
/// at `pin`; fails if the kernel attached it to another device.
pub fn attach(ebpf: &mut Ebpf, hook: Hook, ifname: &str, ifindex: u32, pin: &Path) -> Result<()> {
    let link: FdLink = match hook {
        Hook::Xdp => {
            let prog = xdp(ebpf)?;
            // Native mode where the driver takes it (the kernel's default), generic where the
            // driver refuses (e.g. an MTU too large for single-buffer XDP).
            let id = match prog.attach_to_if_index(ifindex, XdpMode::Default) {
                Ok(id) => id,
                Err(native) => {
                    let native = anyhow::Error::from(native);
                    let id = prog.attach_to_if_index(ifindex, XdpMode::Skb).map_err(|generic| {
                        let generic = anyhow::Error::from(generic);
                        anyhow!("attaching XDP to {ifname}: native: {native:#}; generic: {generic:#}")
                    })?;
                    tracing::warn!(
                        "XDP native mode refused on {ifname} ({native:#}); attached in generic mode"
                    );
                    id
                }
            };
            prog.take_link(id)?.try_into().map_err(|_| {
                anyhow!("XDP on {ifname} was attached without a BPF link (kernel older than 5.9?)")
            })?
        }
        // Every other hook is a TC (TCX) one.
        _ => {
            let prog = tc(ebpf, hook)?;
            let kind = match hook {
                Hook::TcIngress | Hook::ServiceIn | Hook::ServiceUplinkIn | Hook::MasqueradeIn => {
                    TcAttachType::Ingress
                }
                _ => TcAttachType::Egress,
            };
            // The services' programs around the tunnel's: DNAT before everything on the way
            // out of the tunnel, reverse NAT after everything on the way in (the filters judge
            // a reply before its source is translated back, as netfilter's FORWARD does); the
            // egress proxy's SNAT after the filters too. On an uplink's ingress the
            // masquerade's replies first, then the DNAT (the egress proxy would take them
            // otherwise): first and last, whatever order they are attached in. The masquerade
            // first on the way out: a backend's reply must still show the backend (the flow
            // it belongs to came from the LAN, and is not masqueraded).
            let order = match hook {
                Hook::ServiceIn | Hook::MasqueradeIn | Hook::MasqueradeOut => LinkOrder::first(),
                Hook::ServiceOut | Hook::ServiceUplinkIn | Hook::ServiceUplinkOut | Hook::ProxyOut => {
                    LinkOrder::last()
                }
                _ => LinkOrder::default(),
            };
            // TCX attaches by name; the pin records what the kernel reports below.
            let id = prog
                .attach_with_options(ifname, kind, TcAttachOptions::TcxOrder(order))
                .with_context(|| format!("attaching {} to {ifname}", hook.pin_prefix()))?;
            prog.take_link(id)?.try_into().map_err(|_| {
                anyhow!("TC on {ifname} was attached without a BPF link (kernel older than 6.6?)")
            })?
        }
    };
    link.pin(pin).with_context(|| format!("pinning the link at {}", pin.display()))?;
    let attached_to = pinned_device(pin)?;
    if attached_to != ifindex {
        // The name now belongs to another device (re-created meanwhile). The next
        // reconcile sees the new one.
        detach(pin)?;
        anyhow::bail!("{ifname} changed while attaching (ifindex {ifindex} -> {attached_to})");
    }
    Ok(())
}

/// Makes the live link pinned at `pin` run this run's program (atomic replacement).
pub fn take_over(ebpf: &mut Ebpf, hook: Hook, pin: &Path) -> Result<()> {
    let link: FdLink = PinnedLink::from_pin(pin)?.into();
    match hook {
        Hook::Xdp => {
            let link = XdpLink::try_from(link).map_err(|e| anyhow!("not an XDP link: {e}"))?;
            let prog = xdp(ebpf)?;
            let id = prog.attach_to_link(link)?;
            // The pin keeps the link; this process's fd can go.
            drop(prog.take_link(id)?);
        }
        // Every other hook is a TC (TCX) one.
        _ => {
            let link = SchedClassifierLink::try_from(link).map_err(|e| anyhow!("not a TC link: {e}"))?;
            let prog = tc(ebpf, hook)?;
            let id = prog.attach_to_link(link)?;
            drop(prog.take_link(id)?);
        }
    }
    Ok(())
}

/// Detaches by removing the pin (the link goes with its last reference).
pub fn detach(pin: &Path) -> Result<()> {
    pins::remove_file(pin)
}

/// The ifindex the link pinned at `pin` is attached to; 0 when its device is gone (the
/// kernel detaches a link from a device that is unregistered, and the pin then holds a
/// defunct link).
pub fn pinned_device(pin: &Path) -> Result<u32> {
    // aya keeps a link's fd private, so open the pin directly.
    let fd = sys::obj_get(pin).with_context(|| format!("opening {}", pin.display()))?;
    let info = sys::link_info(fd.as_fd()).context("BPF_OBJ_GET_INFO_BY_FD on a link")?;
    match info.link_type {
        sys::BPF_LINK_TYPE_XDP | sys::BPF_LINK_TYPE_TCX => Ok(info.ifindex),
        other => anyhow::bail!("{} is a link of type {other}, not XDP or TCX", pin.display()),
    }
}

/// The id of the program the link pinned at `pin` runs (to find it in the kernel's list of
/// a device's programs, in their order).
pub fn pinned_program(pin: &Path) -> Result<u32> {
    let fd = sys::obj_get(pin).with_context(|| format!("opening {}", pin.display()))?;
    Ok(sys::link_info(fd.as_fd()).context("BPF_OBJ_GET_INFO_BY_FD on a link")?.prog_id)
}

pub fn xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let name = Hook::Xdp.program();
    let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    Ok(prog.try_into()?)
}

pub fn tc(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier> {
    let name = hook.program();
    let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    Ok(prog.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        for name in ["xdp@eth0:4", "tc_egress@tailscale0:17", "xdp@eth0.100:9"] {
            assert_eq!(PinName::parse(name).unwrap().to_string(), name);
        }
        let p = PinName::parse("xdp@eth0.100:9").unwrap();
        assert_eq!((p.hook, p.ifname.as_str(), p.ifindex), (Hook::Xdp, "eth0.100", 9));
        // Older versions' names (no ifindex), other files: not ours.
        assert_eq!(PinName::parse("tc_ingress@tun0:3").unwrap().hook, Hook::TcIngress);
        for name in ["xdp@eth0", "tc_other@eth0:3", "xdp@eth0:x", "README"] {
            assert_eq!(PinName::parse(name), None, "{name}");
        }
    }
}
