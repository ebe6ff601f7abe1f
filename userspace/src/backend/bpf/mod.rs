//! The BPF backend: loads the embedded object, pins its maps, keeps the maps in sync with
//! the desired state and the programs attached where the state says.

pub mod cgnat;
pub mod links;
pub mod pins;

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use aya::{Ebpf, EbpfLoader};
use tailgate_abi::{
    cgnat::{MAP_FWD_V4, MAP_FWD_V6, MAP_IN_V4, MAP_IN_V6},
    MAP_COUNTERS, MAP_RULE_HITS,
};

pub use self::{links::Hook, pins::Pins};
use super::Backend;
use crate::policy::DesiredState;

/// The eBPF object built by `build.rs` from the `datapath-ebpf` crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tailgate-datapath.o"));

/// Every map of the object, by kernel name (also its pin name).
pub const MAPS: [&str; 6] = [MAP_IN_V4, MAP_IN_V6, MAP_FWD_V4, MAP_FWD_V6, MAP_COUNTERS, MAP_RULE_HITS];

/// Why the BPF backend could not start, and at which step: `load` (object, maps, bpffs),
/// `verify` (the verifier refused a program) or `attach`.
#[derive(Debug, thiserror::Error)]
#[error("{step} failed: {error:#}")]
pub struct StartError {
    pub step: &'static str,
    pub error: anyhow::Error,
}

fn at(step: &'static str) -> impl FnOnce(anyhow::Error) -> StartError {
    move |error| StartError { step, error }
}

/// Kernel-side log level (aya-log). `Off` costs one load and branch per log site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KernelLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The object loaded into the kernel: maps created (or reused from pins), programs
/// verified and loaded, nothing attached.
pub struct Datapath {
    pub ebpf: Ebpf,
}

impl Datapath {
    /// Loads the object. With `pins`, maps are pinned there, and maps already pinned there
    /// are reused with their contents (rules and counters survive restarts).
    pub fn load(pins: Option<&Pins>, log: KernelLog) -> Result<Self, StartError> {
        let level = log as u8;
        let map_paths: Vec<_> = match pins {
            Some(pins) => MAPS.iter().map(|name| (*name, pins.map(name))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &level, true);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object").map_err(at("load"))?;
        let xdp = links::xdp(&mut ebpf).map_err(at("load"))?;
        xdp.load().context("the uplink XDP program").map_err(at("verify"))?;
        let tc = links::tc(&mut ebpf, Hook::TcEgress).map_err(at("load"))?;
        tc.load().context("the tunnel TC program").map_err(at("verify"))?;
        Ok(Self { ebpf })
    }

    /// Makes the maps hold `state`'s rules.
    pub fn sync(&mut self, state: &DesiredState) -> Result<cgnat::SyncReport> {
        cgnat::sync(&mut self.ebpf, &state.cgnat)
    }
}

pub struct BpfBackend {
    datapath: Datapath,
    pins: Pins,
    /// Attachments this process made or took over.
    attached: BTreeSet<(Hook, String)>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl BpfBackend {
    /// Loads the datapath with maps pinned under `pins`. Nothing is attached until `apply`.
    pub fn load(pins: Pins, log: KernelLog) -> Result<Self, StartError> {
        pins.prepare().map_err(at("load"))?;
        let mut datapath = Datapath::load(Some(&pins), log)?;
        let logger = match log {
            KernelLog::Off => None,
            _ => Some(
                aya_log::EbpfLogger::init(&mut datapath.ebpf)
                    .context("starting the kernel log reader")
                    .map_err(at("load"))?,
            ),
        };
        Ok(Self { datapath, pins, attached: BTreeSet::new(), logger })
    }

    /// The kernel log reader (present when kernel logging is on), to poll when readable.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    fn wanted(state: &DesiredState) -> BTreeSet<(Hook, String)> {
        let mut wanted: BTreeSet<_> = state.uplinks.iter().map(|i| (Hook::Xdp, i.clone())).collect();
        wanted.insert((Hook::TcEgress, state.tunnel.clone()));
        wanted
    }

    /// Attaches what is wanted and not yet attached by this process. On failure, detaches
    /// what this call attached anew and returns the error.
    fn attach_missing(&mut self, wanted: &BTreeSet<(Hook, String)>) -> Result<()> {
        let mut fresh = Vec::new();
        let missing: Vec<_> = wanted.difference(&self.attached).cloned().collect();
        for (hook, ifname) in missing {
            let pin = self.pins.link(hook, &ifname);
            match links::attach(&mut self.datapath.ebpf, hook, &ifname, &pin) {
                Ok(how) => {
                    tracing::info!(
                        "{} on {ifname}: {}",
                        hook.pin_prefix(),
                        match how {
                            links::Attached::New => "attached",
                            links::Attached::TookOver => "took over the pinned link",
                        }
                    );
                    if how == links::Attached::New {
                        fresh.push((hook, ifname.clone(), pin));
                    }
                    self.attached.insert((hook, ifname));
                }
                Err(e) => {
                    for (hook, ifname, pin) in fresh {
                        let _ = links::detach(&pin);
                        self.attached.remove(&(hook, ifname));
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The first apply, with the step that failed.
    pub fn start(&mut self, state: &DesiredState) -> Result<(), StartError> {
        self.apply_state(state).map_err(at("attach"))
    }

    fn apply_state(&mut self, state: &DesiredState) -> Result<()> {
        let wanted = Self::wanted(state);
        // First apply: fill the maps before any program runs. Later: attach new
        // interfaces first (they enforce the old rules until the maps change), so a failed
        // attach leaves the running state as it was.
        let report = if self.attached.is_empty() {
            let report = self.datapath.sync(state)?;
            self.attach_missing(&wanted)?;
            report
        } else {
            self.attach_missing(&wanted)?;
            self.datapath.sync(state)?
        };
        tracing::info!(
            "rules: {} added, {} removed, {} unchanged",
            report.added,
            report.removed,
            report.unchanged
        );
        for (hook, ifname, pin) in self.pins.pinned_links()? {
            if !wanted.contains(&(hook, ifname.clone())) {
                links::detach(&pin)?;
                self.attached.remove(&(hook, ifname.clone()));
                tracing::info!("{} on {ifname}: detached", hook.pin_prefix());
            }
        }
        Ok(())
    }

    fn stop_datapath(self, keep: bool) -> Result<()> {
        if keep {
            tracing::info!(
                "keep_datapath: leaving programs attached and maps pinned under {}",
                self.pins.root().display()
            );
            return Ok(());
        }
        let pins = self.pins.clone();
        drop(self);
        pins.remove_all()?;
        tracing::info!("detached and unpinned everything under {}", pins.root().display());
        Ok(())
    }
}

impl Backend for BpfBackend {
    fn name(&self) -> &'static str {
        "bpf"
    }

    fn apply(&mut self, state: &DesiredState) -> Result<()> {
        self.apply_state(state)
    }

    fn stop(self: Box<Self>, keep: bool) -> Result<()> {
        self.stop_datapath(keep)
    }
}
