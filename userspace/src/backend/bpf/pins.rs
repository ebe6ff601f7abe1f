//! Layout of the pin directory on bpffs:
//!
//! ```text
//! <pin-dir>/maps/<MAP_NAME>         every map, by its kernel name (CGNAT_IN_V4, COUNTERS, ...)
//! <pin-dir>/links/<hook>@<ifname>   one BPF link per attachment (xdp@eth0, tc_egress@tailscale0)
//! ```
//! Pinned links keep the programs attached without a process; removing a link pin detaches.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};

use super::links::Hook;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tailgate";
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, hook: Hook, ifname: &str) -> PathBuf {
        self.links_dir().join(format!("{}@{ifname}", hook.pin_prefix()))
    }

    /// Whether anything is pinned here (a running or kept datapath).
    pub fn exists(&self) -> bool {
        self.maps_dir().is_dir()
    }

    /// Mounts bpffs on /sys/fs/bpf if the pin dir is under it and it is not mounted, then
    /// creates the directories.
    pub fn prepare(&self) -> Result<()> {
        if self.root.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
            mount(Some("bpf"), BPFFS, Some("bpf"), MsFlags::empty(), None::<&str>)
                .with_context(|| format!("mounting bpffs on {BPFFS}"))?;
        }
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        if !is_bpffs(&self.root) {
            anyhow::bail!("{} is not on a bpffs mount: pins would not survive", self.root.display());
        }
        Ok(())
    }

    /// Link pins present, as (hook, interface, path).
    pub fn pinned_links(&self) -> Result<Vec<(Hook, String, PathBuf)>> {
        let mut links = Vec::new();
        let entries = match std::fs::read_dir(self.links_dir()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(links),
            Err(e) => return Err(e).context("reading the links pin directory"),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((hook, ifname)) = Hook::from_pin_name(&name) {
                links.push((hook, ifname.to_string(), entry.path()));
            }
        }
        links.sort();
        Ok(links)
    }

    /// Detaches everything and removes every pin and directory. Idempotent.
    pub fn remove_all(&self) -> Result<()> {
        for dir in [self.links_dir(), self.maps_dir()] {
            match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    for entry in entries {
                        remove_file(&entry?.path())?;
                    }
                    remove_dir(&dir)?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
            }
        }
        remove_dir(&self.root)
    }
}

/// Removes a pin; a missing one is fine.
pub fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC).unwrap_or(false)
}
