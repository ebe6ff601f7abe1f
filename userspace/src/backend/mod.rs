//! Backends apply a `DesiredState`. Only how differs; what is enforced comes from the
//! policy compiler.

pub mod bpf;
pub mod iptables;

use std::time::Duration;

use anyhow::Result;

use crate::policy::DesiredState;

/// What every backend does.
pub trait Backend {
    /// Short name for logs and status ("bpf", "iptables").
    fn name(&self) -> &'static str;
    /// Makes the system enforce `state`. On error the previously applied state stays in
    /// force (nothing half-applied).
    fn apply(&mut self, state: &DesiredState) -> Result<()>;
    /// How often `repair` should run; `None`: never (nothing else can change the state).
    fn repair_interval(&self) -> Option<Duration> {
        None
    }
    /// Restores what another program changed.
    fn repair(&mut self) -> Result<()> {
        Ok(())
    }
    /// Stops enforcing and removes everything the backend created, unless `keep`, in which
    /// case the datapath stays in force for the next start to take over.
    fn stop(self: Box<Self>, keep: bool) -> Result<()>;
}
