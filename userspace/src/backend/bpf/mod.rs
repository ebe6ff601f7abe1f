//! The BPF backend: loads the embedded object, pins its maps, keeps the maps in sync with
//! the desired state (atomically, see `generation`) and the programs attached to the devices
//! the state names, following devices that come and go (see `attachments`).

pub mod attachments;
pub mod cgnat;
pub mod generation;
pub mod links;
pub mod pins;
mod sys;

use anyhow::{Context, Result};
use aya::{Ebpf, EbpfLoader};
use tailgate_abi::{
    cgnat::LEGACY_MAPS,
    generation::{MAP_ACTIVE, MAP_BARRIER},
    MAP_COUNTERS, MAP_RULE_HITS,
};

use self::{attachments::Attachments, cgnat::CgnatMaps, generation::Barrier};
pub use self::{links::Hook, pins::Pins};
use super::{Backend, Cancel, Interrupted};
use crate::policy::{CgnatRules, DesiredState};

/// The eBPF object built by `build.rs` from the `datapath-ebpf` crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tailgate-datapath.o"));

/// The maps pinned under `<pin-dir>/maps`, by kernel name. The barrier holds no state and is
/// not pinned.
pub fn pinned_maps() -> Vec<&'static str> {
    let mut maps = vec![MAP_ACTIVE, MAP_COUNTERS, MAP_RULE_HITS];
    maps.extend(cgnat::map_names());
    maps
}

/// Every map name tailgate ever pinned, older versions' included: what cleanup may remove.
pub fn known_maps() -> Vec<&'static str> {
    let mut maps = pinned_maps();
    maps.extend(LEGACY_MAPS);
    maps
}

/// Why the BPF backend could not start, and at which step: `load` (object, maps, bpffs),
/// `verify` (the verifier refused a program) or `attach`.
#[derive(Debug, thiserror::Error)]
#[error("{step} failed: {error:#}")]
pub struct StartError {
    pub step: &'static str,
    pub error: anyhow::Error,
}

impl StartError {
    /// Whether the start stopped because the daemon was asked to stop.
    pub fn interrupted(&self) -> bool {
        self.error.is::<Interrupted>()
    }
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
    barrier: Barrier,
    cgnat: CgnatMaps,
    /// The policy the maps hold, once this process wrote it.
    applied: Option<CgnatRules>,
    /// What the last policy change did (for logs and the benchmark).
    pub last_swap: Option<generation::Swap>,
    /// The policy in force before this process's first change (to roll back to).
    previous: Option<cgnat::Tries>,
}

impl Datapath {
    /// Loads the object. With `pins`, maps are pinned there, and maps already pinned there
    /// are reused with their contents (rules and counters survive restarts).
    pub fn load(pins: Option<&Pins>, log: KernelLog) -> Result<Self, StartError> {
        let level = log as u8;
        let map_paths: Vec<_> = match pins {
            Some(pins) => pinned_maps().into_iter().map(|name| (name, pins.map(name))).collect(),
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
        let barrier = Barrier::take(&mut ebpf).context(MAP_BARRIER).map_err(at("load"))?;
        Ok(Self {
            ebpf,
            barrier,
            cgnat: CgnatMaps::default(),
            applied: None,
            last_swap: None,
            previous: None,
        })
    }

    /// Makes the maps hold `state`'s rules, switching the datapath from the old policy to
    /// the new one at once. Returns `None` when they already did.
    pub fn sync(&mut self, state: &DesiredState) -> Result<Option<cgnat::SyncReport>> {
        if self.applied.as_ref() == Some(&state.cgnat) {
            return Ok(None);
        }
        self.cgnat.plan(&mut self.ebpf, &state.cgnat)?;
        if self.applied.is_none() && self.previous.is_none() {
            self.previous = self.cgnat.held(generation::active(&self.ebpf)?).cloned();
        }
        let swap = generation::swap(&mut self.ebpf, &mut self.barrier, &mut [&mut self.cgnat])?;
        tracing::debug!(
            "policy generation {} active ({} entries changed; waited {:?} for running programs)",
            swap.active,
            swap.changed,
            swap.grace
        );
        self.applied = Some(state.cgnat.clone());
        self.last_swap = Some(swap);
        Ok(self.cgnat.report)
    }

    /// Puts back the policy that was in force before this process's first change.
    fn restore_previous(&mut self) -> Result<()> {
        let Some(previous) = self.previous.take() else { return Ok(()) };
        self.cgnat.restore(previous);
        generation::swap(&mut self.ebpf, &mut self.barrier, &mut [&mut self.cgnat])?;
        self.applied = None;
        Ok(())
    }
}

pub struct BpfBackend {
    datapath: Datapath,
    pins: Pins,
    attachments: Attachments,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Whether a datapath was pinned here before this process (a kept one it takes over).
    inherited: bool,
    /// What the start attached anew (undone by a roll-back).
    started: Option<attachments::Fresh>,
}

impl BpfBackend {
    /// Loads the datapath with maps pinned under `pins`. Nothing is attached until `start`.
    pub fn load(pins: Pins, log: KernelLog) -> Result<Self, StartError> {
        let inherited = pins.exists();
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
        let attachments = Attachments::new(pins.clone());
        Ok(Self { datapath, pins, attachments, logger, inherited, started: None })
    }

    /// The kernel log reader (present when kernel logging is on), to poll when readable.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self.logger.take()
    }

    /// The first apply: the maps are filled before any program runs, then the programs are
    /// attached (or links a previous run kept are taken over). `cancel` is checked between
    /// steps. Nothing is detached before `commit`.
    pub fn start(&mut self, state: &DesiredState, cancel: &Cancel) -> Result<(), StartError> {
        // Upgrading a datapath kept by a version before policy generations: the links are
        // about to run this version's program on this version's maps, so a roll-back puts
        // the old policy into those.
        if let Some(legacy) = cgnat::legacy_policy(&self.pins).map_err(at("load"))? {
            self.datapath.previous = Some(legacy);
        }
        self.sync_and_log(state).map_err(at("load"))?;
        cancel.check().map_err(at("attach"))?;
        let fresh =
            self.attachments.attach_all(&mut self.datapath.ebpf, state, cancel).map_err(at("attach"))?;
        self.started = Some(fresh);
        Ok(())
    }

    fn sync_and_log(&mut self, state: &DesiredState) -> Result<()> {
        if let Some(report) = self.datapath.sync(state)? {
            tracing::info!(
                "rules: {} added, {} removed, {} unchanged",
                report.added,
                report.removed,
                report.unchanged
            );
        }
        Ok(())
    }
}

impl Backend for BpfBackend {
    fn name(&self) -> &'static str {
        "bpf"
    }

    fn apply(&mut self, state: &DesiredState) -> Result<()> {
        // New devices first (they enforce the old rules until the switch), so a failed
        // attach leaves the running state as it was; then the policy; then detach.
        let plan = self.attachments.attach_all(&mut self.datapath.ebpf, state, &Cancel::never())?;
        if let Err(e) = self.sync_and_log(state) {
            self.attachments.undo(plan);
            return Err(e);
        }
        // The new state is in force; what is left is cleanup, retried at the next change.
        if let Err(e) = self.attachments.detach_unwanted(state) {
            tracing::warn!("detaching what the new configuration no longer wants: {e:#}");
        }
        Ok(())
    }

    fn devices_changed(&mut self, state: &DesiredState) -> Result<()> {
        self.attachments.reconcile(&mut self.datapath.ebpf, state)
    }

    fn pending(&self) -> Vec<String> {
        self.attachments.pending()
    }

    fn inherited(&self) -> bool {
        self.inherited
    }

    fn commit(&mut self, state: &DesiredState) -> Result<()> {
        self.started = None;
        self.attachments.detach_unwanted(state)?;
        // Pins of versions before policy generations: their programs were just replaced.
        for name in LEGACY_MAPS {
            pins::remove_file(&self.pins.map(name))?;
        }
        Ok(())
    }

    fn roll_back(mut self: Box<Self>) -> Result<()> {
        if !self.inherited {
            return self.stop(false);
        }
        if let Some(fresh) = self.started.take() {
            self.attachments.undo(fresh);
        }
        self.datapath.restore_previous()?;
        tracing::info!("start rolled back: the kept datapath is as it was");
        Ok(())
    }

    fn stop(self: Box<Self>, keep: bool) -> Result<()> {
        if keep {
            tracing::info!(
                "keep_datapath: leaving programs attached and maps pinned under {}",
                self.pins.root().display()
            );
            return Ok(());
        }
        let pins = self.pins.clone();
        drop(self);
        pins.remove_all(&known_maps())?;
        tracing::info!("detached and unpinned everything under {}", pins.root().display());
        Ok(())
    }
}
