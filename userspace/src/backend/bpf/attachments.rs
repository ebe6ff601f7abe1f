//! Which devices the programs are attached to, keyed by ifindex: a device deleted and
//! re-created under the same name is a new device and gets a new link; a link whose device
//! is gone is defunct and its pin goes; a renamed device keeps its link (the pin is renamed).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use anyhow::Result;
use aya::Ebpf;

use super::{
    links::{self, Hook, PinName},
    pins::{self, Pins},
};
use crate::{backend::Cancel, netdev, policy::DesiredState};

/// (hook, ifindex) → interface name.
type Wanted = BTreeMap<(Hook, u32), String>;

pub struct Attachments {
    pins: Pins,
    /// Attachments this process made or took over.
    owned: BTreeSet<(Hook, u32)>,
    /// What is wanted but cannot be attached now (device absent), for status.
    pending: Vec<String>,
    /// Whether a link an earlier run left now runs this process's program.
    took_over: bool,
}

/// Links one call attached anew (to undo if what follows fails).
pub struct Fresh(Vec<((Hook, u32), PathBuf)>);

impl Attachments {
    pub fn new(pins: Pins) -> Self {
        Self { pins, owned: BTreeSet::new(), pending: Vec::new(), took_over: false }
    }

    /// Whether any link an earlier run left was switched to this process's program.
    pub fn took_over(&self) -> bool {
        self.took_over
    }

    /// Wanted but not attachable now, e.g. "tc_egress on tun0 (absent)".
    pub fn pending(&self) -> Vec<String> {
        self.pending.clone()
    }

    /// The devices `state` names that exist now, by ifindex. Notes what is absent.
    fn wanted(&mut self, state: &DesiredState) -> Result<Wanted> {
        let interfaces = netdev::interfaces()?;
        let mut wanted = Wanted::new();
        let mut pending = Vec::new();
        // The services' programs only while there are services or proxies: traffic pays
        // nothing for them otherwise.
        let proxies = state.proxy.ingress.is_some() || state.proxy.egress.is_some();
        let nat = !state.services.is_empty() || proxies;
        let services = [Hook::ServiceIn, Hook::ServiceOut].into_iter().filter(|_| nat);
        let proxy = [Hook::ProxyOut].into_iter().filter(|_| state.proxy.egress.is_some());
        let tunnel = [Hook::TcEgress, Hook::TcIngress].into_iter().chain(services).chain(proxy);
        let tunnel = tunnel.map(|hook| (hook, &state.tunnel));
        // The gateway's own flows are recorded only where their replies are checked (the
        // inbound filter; the egress proxy, which leaves them alone).
        let egress = state
            .uplinks
            .iter()
            .filter(|_| state.conntrack.own_replies || state.proxy.egress.is_some())
            .map(|u| (Hook::UplinkEgress, u));
        // Services and the ingress proxy for LAN clients too (the reference's proxy rule
        // matches every incoming device), the egress proxy's DNAT.
        let services_on_uplinks = [Hook::ServiceUplinkIn, Hook::ServiceUplinkOut]
            .into_iter()
            .filter(|_| nat)
            .flat_map(|hook| state.uplinks.iter().map(move |u| (hook, u)));
        let masquerade = [Hook::MasqueradeIn, Hook::MasqueradeOut]
            .into_iter()
            .filter(|_| state.subnet_routes.masquerade)
            .flat_map(|hook| state.uplinks.iter().map(move |u| (hook, u)));
        let uplinks = state
            .uplinks
            .iter()
            .map(|u| (Hook::Xdp, u))
            .chain(egress)
            .chain(services_on_uplinks)
            .chain(masquerade);
        for (hook, ifname) in uplinks.chain(tunnel) {
            let on_tunnel = matches!(
                hook,
                Hook::TcEgress | Hook::TcIngress | Hook::ServiceIn | Hook::ServiceOut | Hook::ProxyOut
            );
            match interfaces.get(ifname) {
                // Re-created as another kind of device while running: the tunnel programs
                // would read frames as IP packets.
                Some(iface) if on_tunnel && iface.ethernet() => pending.push(format!(
                    "{} on {ifname} (an Ethernet device, not a raw-IP tunnel)",
                    hook.pin_prefix()
                )),
                Some(iface) => {
                    wanted.insert((hook, iface.index), ifname.clone());
                }
                None => pending.push(format!("{} on {ifname} (absent)", hook.pin_prefix())),
            }
        }
        if pending != self.pending {
            for what in pending.iter().filter(|p| !self.pending.contains(p)) {
                tracing::warn!("{what}: attached once it appears");
            }
            self.pending = pending;
        }
        Ok(wanted)
    }

    /// Devices changed: attaches what is wanted, detaches what is not (or whose device is
    /// gone). A failure is logged and the rest goes on.
    pub fn reconcile(&mut self, ebpf: &mut Ebpf, state: &DesiredState) -> Result<()> {
        let wanted = self.wanted(state)?;
        self.attach(ebpf, &wanted, false, &Cancel::never())?;
        self.detach(&wanted)
    }

    /// Attaches (or takes over) everything `state` wants (at start, and first thing in a
    /// reload); the first failure undoes this call's attachments.
    pub fn attach_all(&mut self, ebpf: &mut Ebpf, state: &DesiredState, cancel: &Cancel) -> Result<Fresh> {
        let wanted = self.wanted(state)?;
        self.attach(ebpf, &wanted, true, cancel)
    }

    /// The last half of a reload: detach what the new state no longer has.
    pub fn detach_unwanted(&mut self, state: &DesiredState) -> Result<()> {
        let wanted = self.wanted(state)?;
        self.detach(&wanted)
    }

    /// Detaches what one `attach_all` attached.
    pub fn undo(&mut self, fresh: Fresh) {
        for (key, pin) in fresh.0 {
            let _ = links::detach(&pin);
            self.owned.remove(&key);
        }
    }

    fn attach(&mut self, ebpf: &mut Ebpf, wanted: &Wanted, strict: bool, cancel: &Cancel) -> Result<Fresh> {
        let pinned = self.pins.pinned_links()?;
        let mut fresh = Fresh(Vec::new());
        for (&(hook, ifindex), ifname) in wanted {
            let key = (hook, ifindex);
            let live = pinned.iter().find(|p| p.live && (p.name.hook, p.name.ifindex) == key);
            if self.owned.contains(&key) && live.is_some() {
                continue;
            }
            let name = PinName { hook, ifname: ifname.clone(), ifindex };
            let result = match live {
                // A link a previous run left: replace its program (no gap).
                Some(p) => links::take_over(ebpf, hook, &p.path).map(|()| {
                    self.took_over = true;
                    "took over the pinned link"
                }),
                None => {
                    // A pin at that path holds a dead link (or nothing usable): replace it.
                    let path = self.pins.link(&name);
                    pins::remove_file(&path)
                        .and_then(|()| links::attach(ebpf, hook, ifname, ifindex, &path))
                        .map(|()| {
                            fresh.0.push((key, path));
                            "attached"
                        })
                }
            };
            match result {
                Ok(how) => {
                    tracing::info!("{} on {ifname} (ifindex {ifindex}): {how}", hook.pin_prefix());
                    self.owned.insert(key);
                }
                // The device went (or was re-created) meanwhile: not a failure of the start;
                // its link event brings it back here.
                Err(e) if !still_there(ifname, ifindex) => {
                    tracing::info!(
                        "{} on {ifname}: device changed while attaching ({e:#})",
                        hook.pin_prefix()
                    );
                }
                Err(e) if strict => {
                    self.undo(fresh);
                    return Err(e);
                }
                Err(e) => tracing::error!("{} on {ifname}: {e:#}", hook.pin_prefix()),
            }
            if let Err(e) = cancel.check() {
                self.undo(fresh);
                return Err(e);
            }
        }
        Ok(fresh)
    }

    fn detach(&mut self, wanted: &Wanted) -> Result<()> {
        for pinned in self.pins.pinned_links()? {
            let key = (pinned.name.hook, pinned.name.ifindex);
            let what = format!("{} on {} (ifindex {})", key.0.pin_prefix(), pinned.name.ifname, key.1);
            match wanted.get(&key) {
                Some(ifname) if pinned.live => {
                    // Same device, maybe renamed (or a pin of an older version): name the pin
                    // after what it is now.
                    let name = PinName { ifname: ifname.clone(), ..pinned.name.clone() };
                    let path = self.pins.link(&name);
                    if path != pinned.path {
                        if let Err(e) = std::fs::rename(&pinned.path, &path) {
                            tracing::warn!("renaming pin {} to {name}: {e}", pinned.path.display());
                        }
                    }
                }
                _ => {
                    links::detach(&pinned.path)?;
                    self.owned.remove(&key);
                    if pinned.live {
                        tracing::info!("{what}: detached");
                    } else {
                        tracing::info!("{what}: device gone, link removed");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether `ifname` still names the device `ifindex`.
fn still_there(ifname: &str, ifindex: u32) -> bool {
    netdev::interfaces().map_or(true, |all| all.get(ifname).is_some_and(|i| i.index == ifindex))
}
