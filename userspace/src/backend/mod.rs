//! Backends apply a `DesiredState`. Only how differs; what is enforced comes from the
//! policy compiler.

pub mod bpf;
pub mod iptables;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Result;

use crate::policy::DesiredState;

/// What every backend does.
pub trait Backend {
    /// Short name for logs and status ("bpf", "iptables").
    fn name(&self) -> &'static str;
    /// Makes the system enforce `state`. On error the previously applied state stays in
    /// force (nothing half-applied).
    fn apply(&mut self, state: &DesiredState) -> Result<()>;
    /// Devices appeared, went or were renamed (`state.uplinks` is resolved anew): follow them.
    /// Only the BPF backend attaches to devices; iptables rules match by name.
    fn devices_changed(&mut self, _state: &DesiredState) -> Result<()> {
        Ok(())
    }
    /// What is wanted but cannot be enforced right now (absent devices), for status.
    fn pending(&self) -> Vec<String> {
        Vec::new()
    }
    /// The iptables variant in use (iptables backend), for status.
    fn variant(&self) -> Option<iptables::exec::Variant> {
        None
    }
    /// Whether the backend found an earlier run's datapath in force and took it over.
    fn inherited(&self) -> bool {
        false
    }
    /// How often `repair` should run; `None`: never (nothing else can change the state).
    fn repair_interval(&self) -> Option<Duration> {
        None
    }
    /// Restores what another program changed; how many tables it rewrote.
    fn repair(&mut self) -> Result<usize> {
        Ok(0)
    }
    /// Stops enforcing and removes everything the backend created, unless `keep`, in which
    /// case the datapath stays in force for the next start to take over.
    fn stop(self: Box<Self>, keep: bool) -> Result<()>;
    /// Completes a start once everything else succeeded: the steps that cannot be undone
    /// (detaching what an earlier run left and this one does not want, removing the other
    /// iptables variant's rules).
    fn commit(&mut self, _state: &DesiredState) -> Result<()> {
        Ok(())
    }
    /// Undoes a start that did not complete: a datapath an earlier run left in force (kept,
    /// or left by a killed daemon; see `inherited`) is put back as it was found; otherwise
    /// everything the start created is removed.
    fn roll_back(self: Box<Self>) -> Result<()>;
}

/// A start was stopped by a signal; everything it did is rolled back.
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal during start")]
pub struct Interrupted;

/// Set when the daemon is asked to stop; long steps check it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn never() -> Self {
        Self::default()
    }

    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Interrupted)` once a stop was requested.
    pub fn check(&self) -> Result<()> {
        if self.requested() {
            return Err(Interrupted.into());
        }
        Ok(())
    }
}
