//! What a running (or kept) instance is using, for `tailgate status`:
//! `/run/tailgate/<pin dir, '/' as '_'>.json`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::bpf::Pins;

const DIR: &str = "/run/tailgate";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub backend: String,
    /// Why this backend: "configured", or why BPF could not be used.
    pub reason: String,
    pub pid: u32,
}

pub fn path(pins: &Pins) -> PathBuf {
    let name = pins.root().to_string_lossy().trim_matches('/').replace('/', "_");
    PathBuf::from(DIR).join(format!("{name}.json"))
}

pub fn write(pins: &Pins, state: &RunState) -> Result<()> {
    std::fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
    let path = path(pins);
    std::fs::write(&path, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn read(pins: &Pins) -> Option<RunState> {
    serde_json::from_slice(&std::fs::read(path(pins)).ok()?).ok()
}

pub fn remove(pins: &Pins) {
    let _ = std::fs::remove_file(path(pins));
}
