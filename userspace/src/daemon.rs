//! `tailgate run`: apply the config, then follow SIGHUP and config file changes until
//! SIGTERM/SIGINT.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    backend::{
        bpf::{BpfBackend, KernelLog, Pins},
        Backend,
    },
    config::{BackendKind, Config},
    netdev,
    policy::{self, DesiredState},
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
    let mut backend: Box<dyn Backend> = match config.backend {
        BackendKind::Auto | BackendKind::Bpf => {
            let mut bpf = BpfBackend::load(opts.pins.clone(), opts.kernel_log).context("BPF backend")?;
            spawn_kernel_log_reader(&mut bpf)?;
            Box::new(bpf)
        }
        BackendKind::Iptables => {
            bail!("backend: the iptables backend is not available in this version")
        }
    };
    if let Err(e) = backend.apply(&state) {
        let _ = backend.stop(config.keep_datapath);
        return Err(e.context("applying the configuration"));
    }
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
    loop {
        tokio::select! {
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
        match desired_state(opts.config.as_deref()) {
            Err(e) => tracing::error!("reload refused, running state unchanged: {e:#}"),
            Ok((new_config, new_state)) => {
                if new_config.backend != config.backend {
                    tracing::warn!(
                        "backend changed to {}: takes effect at the next start",
                        new_config.backend
                    );
                }
                keep = new_config.keep_datapath;
                if new_state == state {
                    tracing::info!("configuration unchanged");
                    continue;
                }
                match backend.apply(&new_state) {
                    Ok(()) => {
                        tracing::info!("reloaded");
                        state = new_state;
                    }
                    Err(e) => tracing::error!("reload failed, running state unchanged: {e:#}"),
                }
            }
        }
    }
    tracing::info!("stopping");
    backend.stop(keep)
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
