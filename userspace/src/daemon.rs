//! `tailgate run`: apply the config, then follow SIGHUP and config file changes until
//! SIGTERM/SIGINT.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    backend::{
        bpf::{BpfBackend, KernelLog, Pins, StartError},
        iptables::{self, exec::Variant, IptablesBackend},
        Backend,
    },
    config::{BackendKind, Config, IptablesVariant},
    netdev,
    policy::{self, DesiredState},
    runstate::{self, RunState},
};

pub struct RunOptions {
    pub config: Option<PathBuf>,
    pub pins: Pins,
    pub kernel_log: KernelLog,
}

/// Loads and validates the config and compiles it against this host's interfaces.
pub fn desired_state(path: Option<&Path>) -> Result<(Config, DesiredState)> {
    let config = Config::load(path)?;
    let uplinks = netdev::resolve_uplinks(&config)?;
    let state = policy::compile(&config, uplinks);
    Ok((config, state))
}

pub async fn run(opts: RunOptions) -> Result<()> {
    let (config, mut state) = desired_state(opts.config.as_deref()).context("invalid configuration")?;
    let (mut backend, reason) = start_backend(&config, &state, &opts)?;
    runstate::write(
        &opts.pins,
        &RunState { backend: backend.name().into(), reason, pid: std::process::id() },
    )?;
    tracing::info!(
        "enforcing on uplinks [{}] and tunnel {} with the {} backend",
        state.uplinks.join(", "),
        state.tunnel,
        backend.name()
    );
    notify_systemd_ready();

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (changes, mut changed) = mpsc::unbounded_channel();
    let _watcher = match &opts.config {
        Some(path) => Some(watch(path, changes)?),
        None => None,
    };
    let mut keep = config.keep_datapath;
    let mut repair = backend.repair_interval().map(|every| {
        let mut timer = tokio::time::interval(every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    });
    loop {
        tokio::select! {
            _ = tick(&mut repair) => {
                if let Err(e) = backend.repair() {
                    tracing::warn!("repair failed: {e:#}");
                }
                continue;
            }
            _ = hup.recv() => tracing::info!("SIGHUP: reloading"),
            Some(()) = changed.recv() => {
                // Editors write in several steps; let them finish, then reload once.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while changed.try_recv().is_ok() {}
                tracing::info!("config file changed: reloading");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if let Some(new_keep) = reload(backend.as_mut(), &config, &mut state, opts.config.as_deref()) {
            keep = new_keep;
        }
    }
    tracing::info!("stopping");
    backend.stop(keep)?;
    if !keep {
        runstate::remove(&opts.pins);
    }
    Ok(())
}

/// Re-reads the config and applies it. Returns the new `keep_datapath` when the config was
/// valid; on any error the running state stays as it was.
fn reload(
    backend: &mut dyn Backend,
    started: &Config,
    state: &mut DesiredState,
    path: Option<&Path>,
) -> Option<bool> {
    let (config, new_state) = match desired_state(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!("reload refused, running state unchanged: {e:#}");
            return None;
        }
    };
    if config.backend != started.backend || config.iptables != started.iptables {
        tracing::warn!("backend and [iptables] settings changed: they take effect at the next start");
    }
    if new_state == *state {
        tracing::info!("configuration unchanged");
    } else {
        match backend.apply(&new_state) {
            Ok(()) => {
                tracing::info!("reloaded");
                *state = new_state;
            }
            Err(e) => tracing::error!("reload failed, running state unchanged: {e:#}"),
        }
    }
    Some(config.keep_datapath)
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
) -> Result<(Box<dyn Backend>, String)> {
    match config.backend {
        BackendKind::Bpf => {
            let bpf = start_bpf(state, opts, config.keep_datapath).context("BPF backend")?;
            Ok((bpf, "configured: backend = \"bpf\"".into()))
        }
        BackendKind::Iptables => {
            Ok((start_iptables(config, state, opts)?, "configured: backend = \"iptables\"".into()))
        }
        BackendKind::Auto => match start_bpf(state, opts, false) {
            Ok(bpf) => Ok((bpf, "auto: BPF loaded, verified and attached".into())),
            Err(e) => {
                tracing::warn!("BPF backend unavailable, falling back to iptables: {e}");
                let reason = format!("auto: BPF {e}");
                Ok((start_iptables(config, state, opts)?, reason))
            }
        },
    }
}

fn start_bpf(state: &DesiredState, opts: &RunOptions, keep: bool) -> Result<Box<dyn Backend>, StartError> {
    let mut bpf = BpfBackend::load(opts.pins.clone(), opts.kernel_log)?;
    if let Err(e) = bpf.start(state) {
        // Leave no half-started datapath (unless a kept one is to be preserved).
        if let Err(stop) = Box::new(bpf).stop(keep) {
            tracing::error!("cleaning up the failed BPF start: {stop:#}");
        }
        return Err(e);
    }
    if let Err(e) = spawn_kernel_log_reader(&mut bpf) {
        tracing::warn!("kernel log reader: {e:#}");
    }
    if let Err(e) = iptables::remove_all() {
        tracing::warn!("removing iptables rules of an earlier run: {e:#}");
    }
    Ok(Box::new(bpf))
}

fn start_iptables(config: &Config, state: &DesiredState, opts: &RunOptions) -> Result<Box<dyn Backend>> {
    let variant = match config.iptables.variant {
        IptablesVariant::Auto => None,
        IptablesVariant::Nft => Some(Variant::Nft),
        IptablesVariant::Legacy => Some(Variant::Legacy),
    };
    let mut backend = IptablesBackend::new(iptables::Options {
        divert: config.iptables.divert,
        variant,
        repair_interval: config.iptables.repair_interval,
    })?;
    backend.apply(state).context("applying the iptables rules")?;
    // Switching from BPF: its datapath goes once the rules are in force.
    opts.pins.remove_all().context("removing the BPF datapath of an earlier run")?;
    Ok(Box::new(backend))
}

/// Watches the config file's directory (editors replace files by rename).
fn watch(path: &Path, changes: mpsc::UnboundedSender<()>) -> Result<notify::RecommendedWatcher> {
    let path = std::path::absolute(path)?;
    let dir = path.parent().context("config path has no directory")?.to_path_buf();
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let ours = event.paths.iter().any(|p| p.file_name() == name.as_deref());
            if ours && !event.kind.is_access() {
                let _ = changes.send(());
            }
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

/// Tells systemd (Type=notify) that the policy is in force.
fn notify_systemd_ready() {
    if let Some(socket) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = std::os::unix::net::UnixDatagram::unbound();
        if let Ok(sock) = sock {
            let _ = sock.send_to(b"READY=1", PathBuf::from(socket));
        }
    }
}
