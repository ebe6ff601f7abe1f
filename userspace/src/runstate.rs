//! What a running (or kept) instance is using, for `tailgate status`:
//! `/run/tailgate/<pin dir, '/' as '_'>.json`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{backend::bpf::Pins, lock};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub backend: String,
    /// Why this backend: "configured", or why BPF could not be used.
    pub reason: String,
    pub pid: u32,
    /// The id of the instance lock held by the daemon that wrote this (`Lock::id`).
    #[serde(default)]
    pub lock: u64,
    /// The iptables variant in use (iptables backend).
    #[serde(default)]
    pub variant: Option<crate::backend::iptables::exec::Variant>,
    /// The tunnel device name (iptables: to judge rules of others against it).
    #[serde(default)]
    pub tunnel: Option<String>,
    /// What the daemon waits for (absent devices), e.g. "tc_egress on tun0 (absent)".
    #[serde(default)]
    pub pending: Vec<String>,
    /// The config file the daemon reads (for `explain`).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// The variables of its environment that override the file (`config::overrides`).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

pub fn path(pins: &Pins) -> PathBuf {
    PathBuf::from(lock::RUN_DIR).join(format!("{}.json", lock::instance_name(pins)))
}

/// Writes the file whole (write + rename): a reader never sees half of it.
pub fn write(pins: &Pins, state: &RunState) -> Result<()> {
    std::fs::create_dir_all(lock::RUN_DIR).with_context(|| format!("creating {}", lock::RUN_DIR))?;
    let path = path(pins);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display())).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

pub fn read(pins: &Pins) -> Option<RunState> {
    serde_json::from_slice(&std::fs::read(path(pins)).ok()?).ok()
}

pub fn remove(pins: &Pins) {
    let path = path(pins);
    let _ = std::fs::remove_file(path.with_extension("json.tmp"));
    let _ = std::fs::remove_file(path);
}
