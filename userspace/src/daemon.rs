//! `tailgate run`: apply the config, then follow SIGHUP, config file changes and network
//! devices until SIGTERM/SIGINT.
//!
//! Start is one transaction: the stop signals are caught before anything else, the
//! instance lock is taken, everything that can fail without touching the system (config,
//! file watch, device events) is set up, then the backend starts; a failure or a stop
//! request at any point after that rolls back what the start put in force.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use notify::{
    event::{AccessKind, AccessMode, ModifyKind},
    EventKind, RecursiveMode, Watcher,
};
use sd_notify::NotifyState;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    backend::{
        bpf::{self, BpfBackend, KernelLog, Pins, StartError},
        iptables::{self, exec::Variant, IptablesBackend},
        Backend, Cancel,
    },
    config::{BackendKind, Config, HookPosition, IptablesVariant},
    lock::{self, Lock},
    metrics,
    netdev::{self, Check, LinkEvents},
    policy::{self, DesiredState},
    runstate::{self, RunState},
};

/// How long the config file must stay quiet after a change before it is reloaded...
const SETTLE: Duration = Duration::from_millis(200);
/// ... but a file that keeps changing is reloaded this long after the first change.
const SETTLE_MAX: Duration = Duration::from_secs(2);

pub struct RunOptions {
    pub config: Option<PathBuf>,
    pub pins: Pins,
    pub kernel_log: KernelLog,
}

/// Loads and validates the config and compiles it against this host's interfaces, with
/// `check` saying how strict to be about the listed uplinks (start and reload differ).
pub fn desired_state(path: Option<&Path>, check: Check) -> Result<(Config, DesiredState)> {
    let config = Config::load(path)?;
    let state = compile(&config, check)?;
    Ok((config, state))
}

/// Compiles `config` against this host's devices.
pub fn compile(config: &Config, check: Check) -> Result<DesiredState> {
    let interfaces = netdev::list_for_config()?;
    Ok(policy::compile(config, system(config, &interfaces, check)?))
}

/// What the policy needs to know of the devices: the uplinks, the tunnel's MTU and (for the
/// proxies) addresses.
fn system(
    config: &Config,
    interfaces: &std::collections::BTreeMap<String, netdev::Interface>,
    check: Check,
) -> Result<policy::System, crate::config::ConfigError> {
    let tunnel = interfaces.get(&config.tunnel);
    if let (Some(tunnel), Check::Config | Check::Reload) = (tunnel, check) {
        // The tunnel programs read raw IP packets (a TUN or WireGuard device), not frames.
        if tunnel.ethernet() {
            return Err(crate::config::ConfigError {
                field: "tunnel".into(),
                message: format!(
                    "{:?} is an Ethernet device; the tunnel must carry raw IP packets (a TUN device)",
                    config.tunnel
                ),
            });
        }
    }
    // Only the proxies need addresses: the tunnel's (the gateway's tailnet addresses), and
    // every device's for the egress proxy.
    let proxies = config.proxy.ingress_to.is_some() || config.proxy.egress_to.is_some();
    let addresses = if proxies {
        netdev::addresses().map_err(|e| crate::config::ConfigError {
            field: "tunnel".into(),
            message: format!("reading the devices' addresses: {e}"),
        })?
    } else {
        Default::default()
    };
    let tunnel_addresses = tunnel.and_then(|t| addresses.get(&t.index).cloned()).unwrap_or_default();
    // The target is reached through the tunnel: one of the gateway's own addresses is no
    // target (the proxy would wait for ever, or send traffic to itself).
    if let (Some(to), Check::Config | Check::Reload) = (config.proxy.egress_to, check) {
        let device = addresses.iter().find(|(_, list)| list.contains(&to)).map(|(index, _)| *index);
        if let Some(index) = device {
            let name = interfaces.iter().find(|(_, i)| i.index == index).map_or("?", |(n, _)| n.as_str());
            return Err(crate::config::ConfigError::new(
                config.proxy.egress_source,
                format!("{to} is an address of this gateway ({name}); the target is a tailnet host"),
            ));
        }
    }
    let addresses = match config.proxy.egress_to {
        Some(_) => addresses.into_values().flatten().collect(),
        None => Vec::new(),
    };
    Ok(policy::System {
        uplinks: netdev::resolve_uplinks(config, interfaces, check)?,
        tunnel_mtu: tunnel.and_then(|t| t.mtu),
        tunnel_addresses,
        addresses,
    })
}

pub async fn run(opts: RunOptions) -> Result<()> {
    // First: a stop request is from now on a flag the start checks between its steps, not a
    // kill half-way through it.
    let cancel = Cancel::default();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, cancel.flag()).context("installing signal handlers")?;
    }
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    notify(&[NotifyState::Status("starting")]);

    let instance = match Lock::try_acquire(&lock::instance_path(&opts.pins))? {
        Ok(lock) => lock,
        Err(held) => bail!(
            "another tailgate (PID {}) is running with pin dir {}; stop it first or use another --pin-dir",
            held.pid,
            opts.pins.root().display()
        ),
    };
    // Read before the config is parsed: a change made after this read differs from it.
    let mut last_read = contents(opts.config.as_deref());
    let (config, mut state) =
        desired_state(opts.config.as_deref(), Check::Config).context("invalid configuration")?;
    let (changes, mut changed) = mpsc::unbounded_channel();
    let _watcher = match &opts.config {
        Some(path) => Some(watch(path, changes).context("watching the config file")?),
        None => None,
    };
    let mut links = LinkEvents::subscribe().context("watching network devices (rtnetlink)")?;

    // The metrics socket before anything is started: an address that cannot be bound
    // refuses the start.
    let metrics = match config.metrics_listen {
        Some(addr) => Some(metrics::Listener::bind(addr).await?),
        None => None,
    };
    let stats = Arc::new(metrics::Stats::default());
    // Services forward from the tunnel: before anything is started, so a gateway that
    // cannot forward refuses to start rather than blackholing their connections.
    turn_on_forwarding(&state)?;
    // What an earlier run recorded (it describes what is in force until this start stands).
    let earlier = runstate::read(&opts.pins);
    let (mut backend, reason) = match start_backend(&config, &state, &opts, &cancel) {
        Ok(started) => started,
        Err(e) if e.is::<crate::backend::Interrupted>() => {
            tracing::info!("stopped during start: everything it did is rolled back");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    // The start is complete only once the run state is written and no stop came meanwhile.
    let mut run_state = RunState {
        backend: backend.name().into(),
        reason,
        pid: std::process::id(),
        lock: instance.id(),
        variant: backend.variant(),
        tunnel: Some(state.tunnel.clone()),
        pending: backend.pending(),
        config: opts.config.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        env: crate::config::overrides(&std::env::vars().collect()),
    };
    if let Err(e) = runstate::write(&opts.pins, &run_state) {
        roll_back(backend, &opts.pins, earlier.as_ref());
        return Err(e.context("recording the run state; start rolled back"));
    }
    if cancel.requested() {
        roll_back(backend, &opts.pins, earlier.as_ref());
        tracing::info!("stopped during start: everything it did is rolled back");
        return Ok(());
    }
    // Past this point the start stands; what follows cannot be undone.
    commit(backend.as_mut(), &state, &opts.pins);
    if let (Some(listener), Some(addr)) = (metrics, config.metrics_listen) {
        listener.serve(metrics::Served {
            pins: opts.pins.clone(),
            stats: stats.clone(),
            backend: backend.name().to_string(),
            reason: run_state.reason.clone(),
        });
        tracing::info!("metrics on http://{addr}/metrics, health on /healthz");
    }
    release_memory();
    warn_if_not_forwarding();
    log_proxies(&config, &state);
    tracing::info!(
        "enforcing on uplinks [{}] and tunnel {} with the {} backend",
        state.uplinks.join(", "),
        state.tunnel,
        backend.name()
    );
    notify(&[NotifyState::Ready, NotifyState::Status(&enforcing(backend.as_ref()))]);

    // The config in force: reloads replace it; device events resolve uplinks against it.
    let mut current = config.clone();
    let mut repair = backend.repair_interval().map(|every| {
        let mut timer = tokio::time::interval(every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    });
    // A file change is reloaded once the file has been quiet for SETTLE (writers that finish
    // in several steps — truncate, close, append — get to finish), and at the latest
    // SETTLE_MAX after the first change. Meanwhile everything else goes on.
    let mut reload_at: Option<(Instant, Instant)> = None;
    // systemd's watchdog (`WatchdogSec=`): pinged from this loop at half the interval, so a
    // loop that stops turning (a hung reload, a deadlock) gets the service restarted.
    let mut watchdog = sd_notify::watchdog_enabled().map(|every| {
        let mut timer = tokio::time::interval(every / 2);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    });
    loop {
        tokio::select! {
            _ = tick(&mut watchdog) => {
                notify(&[NotifyState::Watchdog]);
                continue;
            }
            _ = tick(&mut repair) => {
                match backend.repair() {
                    Ok(0) => {}
                    Ok(_) => metrics::Stats::count(&stats.repairs),
                    Err(e) => tracing::warn!("repair failed: {e:#}"),
                }
                continue;
            }
            event = links.changed() => {
                if let Err(e) = event {
                    tracing::warn!("reading device events: {e}; listing devices anew");
                }
                follow_devices(backend.as_mut(), &current, &mut state);
                record(&opts.pins, &mut run_state, &state, backend.as_ref());
                continue;
            }
            _ = hup.recv() => tracing::info!("SIGHUP: reloading"),
            Some(()) = changed.recv() => {
                let now = Instant::now();
                let first = reload_at.map_or(now, |(first, _)| first);
                reload_at = Some((first, (now + SETTLE).min(first + SETTLE_MAX)));
                continue;
            }
            _ = at(reload_at.map(|(_, due)| due)) => {
                // A file rewritten with the contents last read (config management writing
                // what is there, a watch event that arrives after SIGHUP's reload read the
                // file) is no new config: not reloaded, not counted.
                if contents(opts.config.as_deref()) == last_read {
                    reload_at = None;
                    tracing::info!("config file rewritten unchanged: not reloaded");
                    continue;
                }
                tracing::info!("config file changed: reloading")
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        reload_at = None;
        last_read = contents(opts.config.as_deref());
        notify_reloading();
        match reload(backend.as_mut(), &config, &mut state, opts.config.as_deref()) {
            Some(new) => {
                current = new;
                metrics::Stats::count(&stats.reloads);
            }
            None => metrics::Stats::count(&stats.reloads_refused),
        }
        record(&opts.pins, &mut run_state, &state, backend.as_ref());
        notify(&[NotifyState::Ready]);
        // After READY: the policy is in force; the trim does not delay it. The status
        // after it says the reload is wholly done (what a memory reading waits for).
        release_memory();
        notify(&[NotifyState::Status(&enforcing(backend.as_ref()))]);
    }
    tracing::info!("stopping");
    notify(&[NotifyState::Stopping]);
    let keep = current.keep_datapath;
    backend.stop(keep)?;
    if !keep {
        runstate::remove(&opts.pins);
    }
    Ok(())
}

/// Undoes a start: removes what it put in force, or puts a datapath an earlier run left back
/// as it found it; the earlier run's record (which may describe the other backend's
/// datapath, still in force) is put back too.
fn roll_back(backend: Box<dyn Backend>, pins: &Pins, earlier: Option<&RunState>) {
    if let Err(e) = backend.roll_back() {
        tracing::error!("rolling back the start: {e:#}");
    }
    match earlier {
        Some(earlier) => {
            if let Err(e) = runstate::write(pins, earlier) {
                tracing::warn!("putting the earlier run state back: {e:#}");
            }
        }
        None => runstate::remove(pins),
    }
}

/// Turns IP forwarding on where services need it (see `forwarding`).
fn turn_on_forwarding(state: &DesiredState) -> Result<()> {
    for key in crate::forwarding::ensure(state, Path::new("/"))? {
        tracing::info!("turned IP forwarding on for services ({key} = 1)");
    }
    Ok(())
}

/// A gateway that does not forward routes nothing from the tunnel: say so once (read only;
/// enabling forwarding is the host's decision unless services need it).
fn warn_if_not_forwarding() {
    for (key, family) in
        [("/proc/sys/net/ipv4/ip_forward", "IPv4"), ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6")]
    {
        if std::fs::read_to_string(key).is_ok_and(|v| v.trim() == "0") {
            tracing::warn!(
                "{family} forwarding is off ({key} = 0): subnet routes and exit traffic from the tunnel \
                 are not forwarded until it is on"
            );
        }
    }
}

/// Completes a start: the backend's irreversible steps, then what the other backend left
/// behind goes (switching backends).
fn commit(backend: &mut dyn Backend, state: &DesiredState, pins: &Pins) {
    if let Err(e) = backend.commit(state) {
        tracing::warn!("completing the start: {e:#}");
    }
    // The BPF backend's commit already removed an earlier iptables run's rules.
    if backend.name() != "bpf" {
        if let Err(e) = pins.remove_all(&bpf::known_maps()) {
            tracing::warn!("removing the BPF datapath of an earlier run: {e:#}");
        }
    }
}

/// Rewrites the run state when what it shows (tunnel, what is waited for) changed.
fn record(pins: &Pins, run_state: &mut RunState, state: &DesiredState, backend: &dyn Backend) {
    let (tunnel, pending) = (Some(state.tunnel.clone()), backend.pending());
    if run_state.tunnel != tunnel || run_state.pending != pending {
        run_state.tunnel = tunnel;
        run_state.pending = pending;
        if let Err(e) = runstate::write(pins, run_state) {
            tracing::warn!("{e:#}");
        }
    }
}

/// Re-reads the config and applies it. Returns the new config once it is in force; on any
/// error the running state (and the config in force) stays as it was.
fn reload(
    backend: &mut dyn Backend,
    started: &Config,
    state: &mut DesiredState,
    path: Option<&Path>,
) -> Option<Config> {
    // A listed uplink that is absent right now is waited for, not an error (Check::Reload):
    // it may be going through a restart of its own.
    let loaded = path.map_or(Ok(()), refuse_empty).and_then(|()| desired_state(path, Check::Reload));
    let (config, new_state) = match loaded {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("reload refused, running state unchanged: {e:#}");
            return None;
        }
    };
    if config.backend != started.backend || config.iptables != started.iptables {
        tracing::warn!("backend and [iptables] settings changed: they take effect at the next start");
    }
    if config.metrics_listen != started.metrics_listen {
        tracing::warn!("metrics_listen changed: it takes effect at the next start");
    }
    if config.flows != started.flows {
        tracing::warn!(
            "[flows] table sizes changed: they take effect at the next start (the tables in use keep \
             {} IPv4 and {} IPv6 entries)",
            started.flows.max_entries_v4,
            started.flows.max_entries_v6
        );
    }
    if new_state == *state {
        tracing::info!("configuration unchanged");
    } else {
        if let Err(e) = turn_on_forwarding(&new_state) {
            tracing::error!("reload refused, running state unchanged: {e:#}");
            return None;
        }
        match backend.apply(&new_state) {
            Ok(()) => {
                tracing::info!("reloaded");
                *state = new_state;
            }
            Err(e) => {
                // The old config stays the one in force, for device events too.
                tracing::error!("reload failed, running state unchanged: {e:#}");
                return None;
            }
        }
    }
    Some(config)
}

/// The config file's bytes as they are now (`None`: no file given, or unreadable — a
/// reload then says why).
fn contents(path: Option<&Path>) -> Option<Vec<u8>> {
    std::fs::read(path?).ok()
}

/// A reload never applies an empty file: a file truncated by a writer that has not written
/// yet looks the same, and would drop the whole policy back to the defaults.
fn refuse_empty(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.trim().is_empty() {
        bail!(
            "{} is empty (truncated while being written?); to run with the defaults, write a comment into it",
            path.display()
        );
    }
    Ok(())
}

/// Devices changed: resolve the uplinks anew (listed ones that went away are skipped until
/// they are back) and let the backend follow.
fn follow_devices(backend: &mut dyn Backend, config: &Config, state: &mut DesiredState) {
    let system = netdev::interfaces()
        .map_err(anyhow::Error::from)
        .and_then(|all| Ok(system(config, &all, Check::Running)?));
    let new = match system {
        Ok(system) => policy::compile(config, system),
        Err(e) => return tracing::warn!("listing devices: {e:#}"),
    };
    state.uplinks = new.uplinks.clone();
    if let Err(e) = backend.devices_changed(state) {
        tracing::error!("following device changes: {e:#}");
    }
    // What depends on a device's properties (the MSS clamp on the tunnel's MTU, the proxies
    // on the devices' addresses).
    if new != *state {
        if new.proxy != state.proxy {
            // The proxy's destination family may need forwarding only now.
            if let Err(e) = turn_on_forwarding(&new) {
                tracing::error!("proxy: {e:#}");
            }
        }
        match backend.apply(&new) {
            Ok(()) => {
                if new.mss != state.mss {
                    tracing::info!("tunnel MTU changed: MSS clamp now {:?}", new.mss.limits());
                }
                if new.proxy != state.proxy {
                    log_proxies(config, &new);
                }
                *state = new;
            }
            Err(e) => tracing::error!("following device changes: {e:#}"),
        }
    }
}

/// Where the proxies take traffic from, or that they wait for an address.
fn log_proxies(config: &Config, state: &DesiredState) {
    match (config.proxy.egress_to, &state.proxy.egress) {
        (Some(_), Some(egress)) => {
            let on: Vec<String> = egress.on.iter().map(ToString::to_string).collect();
            tracing::info!(
                "egress proxy: traffic arriving by the uplinks for [{}] goes to {} from {}",
                on.join(", "),
                egress.to,
                egress.source
            )
        }
        (Some(to), None) => tracing::warn!(
            "egress proxy: waiting for the tunnel {} to have an {} address other than {to} (its source)",
            config.tunnel,
            if to.is_ipv4() { "IPv4" } else { "IPv6" }
        ),
        (None, _) => {}
    }
    match (config.proxy.ingress_to, state.proxy.ingress) {
        (Some(_), Some(ingress)) => {
            tracing::info!("ingress proxy: tailnet traffic for {} goes to {}", ingress.from, ingress.to)
        }
        (Some(to), None) => tracing::warn!(
            "ingress proxy: waiting for the tunnel {} to have an {} address other than {to} (traffic for it \
             goes to {to} then)",
            config.tunnel,
            if to.is_ipv4() { "IPv4" } else { "IPv6" }
        ),
        (None, _) => {}
    }
}

/// Resolves at `due`; never without one.
async fn at(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

async fn tick(timer: &mut Option<tokio::time::Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Starts the configured backend; with `auto`, BPF and else iptables. Returns it with the
/// reason it was chosen. Whatever the other backend left behind is removed.
fn start_backend(
    config: &Config,
    state: &DesiredState,
    opts: &RunOptions,
    cancel: &Cancel,
) -> Result<(Box<dyn Backend>, String)> {
    match config.backend {
        BackendKind::Bpf => match start_bpf(config, state, opts, cancel) {
            Ok(bpf) => Ok((bpf, "configured: backend = \"bpf\"".into())),
            Err(e) if e.interrupted() => Err(e.error),
            Err(e) => Err(anyhow::Error::new(e).context("BPF backend")),
        },
        BackendKind::Iptables => Ok((
            start_iptables(config, state, &opts.pins, cancel)?,
            "configured: backend = \"iptables\"".into(),
        )),
        BackendKind::Auto => match start_bpf(config, state, opts, cancel) {
            Ok(bpf) => Ok((bpf, "auto: BPF loaded, verified and attached".into())),
            Err(e) if e.interrupted() => Err(e.error),
            Err(e) => {
                tracing::warn!("BPF backend unavailable, falling back to iptables: {e}");
                let reason = format!("auto: BPF {e}");
                Ok((start_iptables(config, state, &opts.pins, cancel)?, reason))
            }
        },
    }
}

fn start_bpf(
    config: &Config,
    state: &DesiredState,
    opts: &RunOptions,
    cancel: &Cancel,
) -> Result<Box<dyn Backend>, StartError> {
    notify(&[NotifyState::Status("loading the BPF datapath")]);
    let mut bpf = BpfBackend::load(opts.pins.clone(), opts.kernel_log, config.flows)?;
    notify(&[NotifyState::Status("writing the policy and attaching")]);
    let started = cancel
        .check()
        .map_err(|error| StartError { step: "load", error })
        .and_then(|()| bpf.start(state, cancel));
    if let Err(e) = started {
        // Leave no half-started datapath; one an earlier run left is put back as it was.
        if let Err(undo) = Box::new(bpf).roll_back() {
            tracing::error!("cleaning up the failed BPF start: {undo:#}");
        }
        return Err(e);
    }
    if let Err(e) = spawn_kernel_log_reader(&mut bpf) {
        tracing::warn!("kernel log reader: {e:#}");
    }
    Ok(Box::new(bpf))
}

fn start_iptables(
    config: &Config,
    state: &DesiredState,
    pins: &Pins,
    cancel: &Cancel,
) -> Result<Box<dyn Backend>> {
    notify(&[NotifyState::Status("writing iptables rules")]);
    let mut backend = IptablesBackend::new(iptables_options(config, pins))?;
    cancel.check()?;
    if let Err(e) = backend.apply(state) {
        if let Err(undo) = Box::new(backend).roll_back() {
            tracing::error!("cleaning up the failed iptables start: {undo:#}");
        }
        return Err(e.context("applying the iptables rules"));
    }
    Ok(Box::new(backend))
}

/// `[iptables]`: how the iptables backend writes; its sets are named after `pins`.
pub fn iptables_options(config: &Config, pins: &Pins) -> iptables::Options {
    let variant = match config.iptables.variant {
        IptablesVariant::Auto => None,
        IptablesVariant::Nft => Some(Variant::Nft),
        IptablesVariant::Legacy => Some(Variant::Legacy),
    };
    iptables::Options {
        divert: config.iptables.divert,
        hook_first: config.iptables.hook_position == HookPosition::First,
        variant,
        repair_interval: config.iptables.repair_interval,
        sets: iptables::sets::name_prefix(&lock::instance_name(pins)),
    }
}

/// Watches the config file's directory and reports a change once a new version is complete:
/// closed after writing, or renamed into place (editors, config management, and the
/// `..data` symlink swap of a Kubernetes ConfigMap). A file truncated and still being
/// written is not reloaded half-written.
fn watch(path: &Path, changes: mpsc::UnboundedSender<()>) -> Result<notify::RecommendedWatcher> {
    let path = std::path::absolute(path)?;
    let dir = path.parent().context("config path has no directory")?.to_path_buf();
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let complete = matches!(
            event.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write)) | EventKind::Modify(ModifyKind::Name(_))
        );
        let ours = event.paths.iter().any(|p| {
            let file = p.file_name();
            file == name.as_deref() || file == Some(std::ffi::OsStr::new("..data"))
        });
        if complete && ours {
            let _ = changes.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

fn spawn_kernel_log_reader(bpf: &mut BpfBackend) -> Result<()> {
    let Some(logger) = bpf.take_logger() else {
        return Ok(());
    };
    // SAFETY: the logger owns its ring buffer fd for as long as the AsyncFd owns the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("watching the kernel log: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Tells the service manager (systemd `Type=notify`, or a test harness) where the daemon is;
/// nothing happens without `NOTIFY_SOCKET`.
/// Gives the heap a start or reload freed back to the system: parsing a config of 100,000
/// prefixes and loading the object take tens of MiB for a moment, which malloc would
/// otherwise keep as resident memory.
fn release_memory() {
    // SAFETY: malloc_trim only releases free heap pages; no pointer is invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The status while the policy is in force (and the daemon idle).
fn enforcing(backend: &dyn Backend) -> String {
    format!("enforcing with the {} backend", backend.name())
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// `RELOADING=1` with the timestamp systemd ≥ 253 requires.
fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}
