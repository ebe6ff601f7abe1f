//! Attaching programs as pinned BPF links, and taking over links a previous run left
//! pinned (atomic program replacement: no moment without a program).

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf,
};
use tailgate_abi::programs;

use super::pins;

/// Where a program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// XDP on an uplink (native if the driver supports it, generic otherwise).
    Xdp,
    /// TC egress (TCX) on the tunnel.
    TcEgress,
}

impl Hook {
    pub const fn pin_prefix(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcEgress => "tc_egress",
        }
    }

    pub const fn program(self) -> &'static str {
        match self {
            Hook::Xdp => programs::UPLINK_XDP,
            Hook::TcEgress => programs::TUNNEL_EGRESS,
        }
    }

    pub fn from_pin_name(name: &str) -> Option<(Hook, &str)> {
        let (prefix, ifname) = name.split_once('@')?;
        [Hook::Xdp, Hook::TcEgress].into_iter().find(|h| h.pin_prefix() == prefix).map(|h| (h, ifname))
    }
}

/// How an attachment came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new link.
    New,
    /// A link pinned by an earlier run now runs this run's program.
    TookOver,
}

/// Attaches `hook`'s program to `ifname` and pins the link at `pin`. If a live link is
/// already pinned there, its program is replaced atomically instead.
pub fn attach(ebpf: &mut Ebpf, hook: Hook, ifname: &str, pin: &Path) -> Result<Attached> {
    if pin.exists() {
        match take_over(ebpf, hook, pin) {
            Ok(()) => return Ok(Attached::TookOver),
            Err(e) => {
                tracing::warn!("pinned link {} is stale ({e:#}); attaching anew", pin.display());
                pins::remove_file(pin)?;
            }
        }
    }
    let link: FdLink = match hook {
        Hook::Xdp => {
            let prog = xdp(ebpf)?;
            // Native mode where the driver takes it (the kernel's default), generic where the
            // driver refuses (e.g. an MTU too large for single-buffer XDP).
            let id = match prog.attach(ifname, XdpMode::Default) {
                Ok(id) => id,
                Err(native) => {
                    let native = anyhow::Error::from(native);
                    let id = prog.attach(ifname, XdpMode::Skb).map_err(|generic| {
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
        Hook::TcEgress => {
            let prog = tc(ebpf, hook)?;
            let id = prog
                .attach(ifname, TcAttachType::Egress)
                .with_context(|| format!("attaching TC egress to {ifname}"))?;
            prog.take_link(id)?.try_into().map_err(|_| {
                anyhow!("TC on {ifname} was attached without a BPF link (kernel older than 6.6?)")
            })?
        }
    };
    link.pin(pin).with_context(|| format!("pinning the link at {}", pin.display()))?;
    Ok(Attached::New)
}

fn take_over(ebpf: &mut Ebpf, hook: Hook, pin: &Path) -> Result<()> {
    let link: FdLink = PinnedLink::from_pin(pin)?.into();
    match hook {
        Hook::Xdp => {
            let link = XdpLink::try_from(link).map_err(|e| anyhow!("not an XDP link: {e}"))?;
            let prog = xdp(ebpf)?;
            let id = prog.attach_to_link(link)?;
            // The pin keeps the link; this process's fd can go.
            drop(prog.take_link(id)?);
        }
        Hook::TcEgress => {
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
