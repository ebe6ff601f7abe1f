//! The BPF backend: loads the embedded object, pins its maps, keeps the maps in sync with
//! the desired state (atomically, see `generation`) and the programs attached to the devices
//! the state names, following devices that come and go (see `attachments`).

pub mod attachments;
pub mod cgnat;
pub mod cgnat_plan;
pub mod cgnat_table;
pub mod conntrack;
pub mod generation;
pub mod layout;
pub mod links;
mod mapped;
pub mod masquerade;
pub mod mss;
pub mod pins;
pub mod proxy;
pub mod services;
pub mod settings;
pub mod subnet_routes;
mod sys;
pub mod testrun;

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use aya::{Ebpf, EbpfLoader};
use tailgate_abi::{
    cgnat::LEGACY_MAPS,
    generation::{MAP_ACTIVE, MAP_BARRIER},
    globals,
    settings::Settings,
    MAP_COUNTERS, MAP_RULE_HITS,
};

use self::{
    attachments::Attachments, cgnat::CgnatMaps, generation::Barrier, layout::Stash, services::ServiceMaps,
    settings::SettingsMap,
};
pub use self::{links::Hook, pins::Pins};
use super::{iptables, Backend, Cancel, Interrupted};
use crate::{
    config::FlowsConfig,
    policy::{proxy::Proxy, services::Services, CgnatRules, DesiredState},
};

/// The eBPF object built by `build.rs` from the `datapath-ebpf` crate.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tailgate-datapath.o"));

/// The maps pinned under `<pin-dir>/maps`, by kernel name. The barrier holds no state and is
/// not pinned.
pub fn pinned_maps() -> Vec<&'static str> {
    let mut maps = vec![
        tailgate_abi::layout::MAP,
        MAP_ACTIVE,
        tailgate_abi::settings::MAP,
        MAP_COUNTERS,
        MAP_RULE_HITS,
        // Pinned so flows outlive a restart or an upgrade that keeps the datapath.
        tailgate_abi::conntrack::MAP_V4,
        tailgate_abi::conntrack::MAP_V6,
        tailgate_abi::conntrack::MAP_FRAGS_V4,
        tailgate_abi::conntrack::MAP_FRAGS_V6,
    ];
    maps.extend(cgnat::map_names());
    // Pinned so services keep their tables and flows their backends across restarts.
    maps.extend(services::map_names());
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

/// Load-time parameters of the object.
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    /// Where the IP header starts in what the tunnel programs see: 0 on a TUN device; 14
    /// for BPF_PROG_TEST_RUN, which builds Ethernet frames.
    pub tunnel_l3_offset: u32,
    /// The flow tables' capacity.
    pub flows: FlowsConfig,
}

/// The object loaded into the kernel: maps created (or reused from pins), programs
/// verified and loaded, nothing attached.
pub struct Datapath {
    pub ebpf: Ebpf,
    barrier: Barrier,
    cgnat: CgnatMaps,
    settings: SettingsMap,
    services: ServiceMaps,
    /// The policy the maps hold, once this process wrote it.
    applied: Option<(Arc<CgnatRules>, Settings, Services, Proxy)>,
    /// What the last policy change did (for logs and the benchmark).
    pub last_swap: Option<generation::Swap>,
    /// The policy in force before this process's first change (to roll back to).
    previous: Option<cgnat::Prefixes>,
    previous_settings: Option<Settings>,
    /// Pinned maps of another layout, set aside for this load (see `layout`).
    stash: Stash,
}

impl Datapath {
    /// Loads the object. With `pins`, maps are pinned there, and maps already pinned there
    /// are reused with their contents (rules and counters survive restarts) when their
    /// layout allows; the others are rebuilt (see `layout`).
    pub fn load(pins: Option<&Pins>, log: KernelLog) -> Result<Self, StartError> {
        Self::load_with(pins, log, Params::default())
    }

    pub fn load_with(pins: Option<&Pins>, log: KernelLog, params: Params) -> Result<Self, StartError> {
        let sizes = conntrack::capacities(&params.flows);
        let stash = match pins {
            Some(pins) => layout::set_aside_incompatible(pins, &pinned_maps(), &sizes).map_err(at("load"))?,
            None => Stash::default(),
        };
        // Flow tables created anew next to kept counters: `status` derives evictions from
        // the flow counters, which must start with the tables.
        let fresh_flows = pins.is_some_and(|pins| {
            pins.map(MAP_COUNTERS).exists() && sizes.iter().any(|(name, _)| !pins.map(name).exists())
        });
        match Self::load_object(pins, log, params) {
            Ok(mut datapath) => {
                datapath.stash = stash;
                if fresh_flows {
                    conntrack::reset_counters(&mut datapath.ebpf).map_err(at("load"))?;
                }
                Ok(datapath)
            }
            Err(e) => {
                stash.put_back();
                Err(e)
            }
        }
    }

    fn load_object(pins: Option<&Pins>, log: KernelLog, params: Params) -> Result<Self, StartError> {
        let level = log as u8;
        let map_paths: Vec<_> = match pins {
            Some(pins) => pinned_maps().into_iter().map(|name| (name, pins.map(name))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        loader.override_global(aya_log::LEVEL, &level, true);
        loader.override_global(globals::TUNNEL_L3_OFFSET, &params.tunnel_l3_offset, true);
        for (name, size) in conntrack::capacities(&params.flows) {
            loader.map_max_entries(name, size);
        }
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object").map_err(at("load"))?;
        for hook in Hook::ALL {
            links::load(&mut ebpf, hook)
                .with_context(|| format!("the {} program", hook.pin_prefix()))
                .map_err(at("verify"))?;
        }
        if pins.is_some() {
            layout::record(&mut ebpf).map_err(at("load"))?;
        }
        let barrier = Barrier::take(&mut ebpf).context(MAP_BARRIER).map_err(at("load"))?;
        Ok(Self {
            ebpf,
            barrier,
            cgnat: CgnatMaps::default(),
            settings: SettingsMap::default(),
            services: ServiceMaps::default(),
            applied: None,
            last_swap: None,
            previous: None,
            previous_settings: None,
            stash: Stash::default(),
        })
    }

    /// Makes the maps hold `state`'s policy (every feature's), switching the datapath from
    /// the old policy to the new one at once. Returns `None` when they already did.
    pub fn sync(&mut self, state: &DesiredState) -> Result<Option<cgnat::SyncReport>> {
        let settings = settings::compile(state);
        if self.applied.as_ref().is_some_and(|(c, s, v, p)| {
            *c == state.cgnat && *s == settings && *v == state.services && *p == state.proxy
        }) {
            return Ok(None);
        }
        self.cgnat.plan(&mut self.ebpf, &state.cgnat)?;
        self.settings.desired = settings;
        self.services.set_desired(&state.services, &state.proxy);
        if self.applied.is_none() && self.previous_settings.is_none() {
            let active = generation::active(&self.ebpf)?;
            // Prefixes rebuilt for this layout hold nothing of the old policy: there is nothing
            // to go back to (a roll-back leaves the new policy rather than none).
            let rebuilt = cgnat::map_names().any(|name| self.stash.holds(name));
            if !rebuilt {
                self.previous = self.previous.take().or_else(|| self.cgnat.held(active));
            }
            self.previous_settings = Some(SettingsMap::read(&self.ebpf, active)?);
            self.services.snapshot(&self.ebpf, active)?;
        }
        let swap = generation::swap(
            &mut self.ebpf,
            &mut self.barrier,
            &mut [&mut self.cgnat, &mut self.settings, &mut self.services],
        );
        self.cgnat.settle();
        let swap = swap?;
        tracing::debug!(
            "policy generation {} active ({} entries changed; waited {:?} for running programs)",
            swap.active,
            swap.changed,
            swap.grace
        );
        self.applied = Some((state.cgnat.clone(), settings, state.services.clone(), state.proxy.clone()));
        self.last_swap = Some(swap);
        Ok(self.cgnat.report)
    }

    /// Puts back the policy that was in force before this process's first change.
    fn restore_previous(&mut self) -> Result<()> {
        let Some(settings) = self.previous_settings.take() else { return Ok(()) };
        let Some(previous) = self.previous.take() else {
            tracing::warn!("the maps were rebuilt for this version's layout: the new policy stays in force");
            return Ok(());
        };
        self.cgnat.restore(previous);
        self.settings.desired = settings;
        self.services.restore_snapshot();
        generation::swap(
            &mut self.ebpf,
            &mut self.barrier,
            &mut [&mut self.cgnat, &mut self.settings, &mut self.services],
        )?;
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
    /// The state in force (to go back to when a reload fails half-way).
    applied: Option<DesiredState>,
}

impl BpfBackend {
    /// Loads the datapath with maps pinned under `pins`. Nothing is attached until `start`.
    pub fn load(pins: Pins, log: KernelLog, flows: FlowsConfig) -> Result<Self, StartError> {
        let inherited = pins.exists();
        pins.prepare().map_err(at("load"))?;
        let mut datapath = Datapath::load_with(Some(&pins), log, Params { flows, ..Params::default() })?;
        let logger = match log {
            KernelLog::Off => None,
            _ => Some(
                aya_log::EbpfLogger::init(&mut datapath.ebpf)
                    .context("starting the kernel log reader")
                    .map_err(at("load"))?,
            ),
        };
        let attachments = Attachments::new(pins.clone());
        Ok(Self { datapath, pins, attachments, logger, inherited, started: None, applied: None })
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
        masquerade::check_ports(state, Path::new("/")).map_err(at("load"))?;
        self.sync_and_log(state).map_err(at("load"))?;
        cancel.check().map_err(at("attach"))?;
        let fresh =
            self.attachments.attach_all(&mut self.datapath.ebpf, state, cancel).map_err(at("attach"))?;
        self.started = Some(fresh);
        self.applied = Some(state.clone());
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
        masquerade::check_ports(state, Path::new("/"))?;
        // New devices first (they enforce the old rules until the switch), so a failed
        // attach leaves the running state as it was; then the policy; then detach.
        let plan = self.attachments.attach_all(&mut self.datapath.ebpf, state, &Cancel::never())?;
        if let Err(e) = self.sync_and_log(state) {
            self.attachments.undo(plan);
            return Err(e);
        }
        self.applied = Some(state.clone());
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
        // No roll-back after this: the policy of before need not be kept (a copy of the
        // whole policy once a reload changed it).
        self.datapath.previous = None;
        if let Err(e) = self.datapath.services.unpin(&mut self.datapath.ebpf) {
            tracing::warn!("freeing the service tables the start replaced: {e:#}");
        }
        std::mem::take(&mut self.datapath.stash).discard();
        // Maps set aside by a start that was killed before its commit.
        self.pins.remove_stale(&pinned_maps())?;
        // Rules an earlier iptables run left go (they would enforce the old policy alongside
        // the programs), and the masquerade rule of a BPF run before the NAT engine.
        let netfilter = iptables::remove_all().context("iptables rules of an earlier run left in place");
        self.attachments.detach_unwanted(state)?;
        // Pins of versions before policy generations: their programs were just replaced.
        for name in LEGACY_MAPS {
            pins::remove_file(&self.pins.map(name))?;
        }
        netfilter
    }

    fn roll_back(mut self: Box<Self>) -> Result<()> {
        // Maps of another layout set aside: back in place if the old programs still run.
        let stash = std::mem::take(&mut self.datapath.stash);
        if self.attachments.took_over() {
            stash.discard();
        } else {
            stash.put_back();
        }
        if !self.inherited {
            return self.stop_bpf(false);
        }
        if let Some(fresh) = self.started.take() {
            self.attachments.undo(fresh);
        }
        self.datapath.restore_previous()?;
        tracing::info!("start rolled back: the kept datapath is as it was");
        Ok(())
    }

    fn stop(self: Box<Self>, keep: bool) -> Result<()> {
        self.stop_bpf(keep)
    }
}

impl BpfBackend {
    fn stop_bpf(self: Box<Self>, keep: bool) -> Result<()> {
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
