//! Layout of the pin directory on bpffs:
//!
//! ```text
//! <pin-dir>/maps/<MAP_NAME>                   every map, by its kernel name
//! <pin-dir>/links/<hook>@<ifname>:<ifindex>   one BPF link per attachment (xdp@eth0:2)
//! ```
//! Pinned links keep the programs attached without a process; removing a link pin detaches.
//! tailgate only ever removes what it creates here: the maps it knows by name (this
//! version's and older versions'), link pins of its own naming, and the directories once
//! empty. It creates nothing on a filesystem that is not bpffs.

use std::{
    io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

use super::links::{self, Hook, PinName};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tailgate";
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, Clone)]
pub struct Pins {
    root: PathBuf,
}

/// A link pin found in the links directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedLink {
    /// What the attachment is: the hook, the interface name as pinned, and the ifindex the
    /// link was made for.
    pub name: PinName,
    pub path: PathBuf,
    /// Whether the link is still attached to that device (false once the device is gone).
    pub live: bool,
}

impl Pins {
    /// `root` as one name per directory: absolute, `.` and `..` resolved, and the part that
    /// exists with its symlinks resolved. The instance lock is keyed by this name, so two
    /// spellings of one directory must not give two names.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root: PathBuf = root.into();
        let absolute = std::path::absolute(&root).unwrap_or(root);
        let mut lexical = PathBuf::from("/");
        for part in absolute.components() {
            match part {
                std::path::Component::ParentDir => {
                    lexical.pop();
                }
                std::path::Component::Normal(name) => lexical.push(name),
                _ => {}
            }
        }
        // Resolve symlinks in the longest existing ancestor; keep the rest as written.
        let existing = lexical.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/")).to_path_buf();
        let rest = lexical.strip_prefix(&existing).map(Path::to_path_buf).unwrap_or_default();
        let root = match std::fs::canonicalize(&existing) {
            Ok(base) if rest.as_os_str().is_empty() => base,
            Ok(base) => base.join(&rest),
            Err(_) => lexical,
        };
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Where a pinned map of another layout waits while a start replaces it (see `layout`).
    pub fn stale_map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(format!("{name}{STALE_SUFFIX}"))
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, name: &PinName) -> PathBuf {
        self.links_dir().join(name.to_string())
    }

    /// Whether a datapath is pinned here (a running or kept one).
    pub fn exists(&self) -> bool {
        is_bpffs(&self.root) && self.maps_dir().is_dir()
    }

    /// Mounts bpffs on /sys/fs/bpf if the pin dir is under it and nothing is mounted there,
    /// refuses a pin dir that would not be on bpffs, then creates the directories.
    pub fn prepare(&self) -> Result<()> {
        if self.root.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
            mount(Some("bpf"), BPFFS, Some("bpf"), MsFlags::empty(), None::<&str>)
                .with_context(|| format!("mounting bpffs on {BPFFS}"))?;
        }
        // Check before creating anything: pins only work on bpffs, and a directory made
        // elsewhere would be left to the user to clean up.
        let existing = self.root.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
        if !is_bpffs(existing) {
            bail!(
                "pin dir {} is not on a bpffs mount ({} is not bpffs); use a directory under {BPFFS}",
                self.root.display(),
                existing.display()
            );
        }
        for dir in [self.maps_dir(), self.links_dir()] {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// The link pins present, with whether each is still attached. Pins of older versions
    /// (`<hook>@<ifname>`) are named after the device their link is attached to.
    pub fn pinned_links(&self) -> Result<Vec<PinnedLink>> {
        let mut found = Vec::new();
        for (file_name, path) in self.entries(&self.links_dir())? {
            let (name, device) = if let Some(name) = PinName::parse(&file_name) {
                let device = links::pinned_device(&path).unwrap_or(0);
                (name, device)
            } else if let Some((hook, ifname)) = legacy_link_name(&file_name) {
                let device = links::pinned_device(&path).unwrap_or(0);
                (PinName { hook, ifname: ifname.to_string(), ifindex: device }, device)
            } else {
                continue;
            };
            let live = device != 0 && device == name.ifindex;
            found.push(PinnedLink { name, path, live });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Detaches and unpins everything tailgate pinned here, and removes the directories
    /// once empty. Anything else found there stays. Idempotent.
    pub fn remove_all(&self, maps: &[&str]) -> Result<()> {
        if !is_bpffs(&self.root) {
            // tailgate never creates anything outside bpffs.
            return Ok(());
        }
        for (file_name, path) in self.entries(&self.links_dir())? {
            if PinName::parse(&file_name).is_some() || legacy_link_name(&file_name).is_some() {
                remove_file(&path)?;
            }
        }
        for (file_name, path) in self.entries(&self.maps_dir())? {
            let name = file_name.strip_suffix(STALE_SUFFIX).unwrap_or(&file_name);
            if maps.contains(&name) {
                remove_file(&path)?;
            }
        }
        for dir in [self.links_dir(), self.maps_dir(), self.root.clone()] {
            remove_dir_if_empty(&dir)?;
        }
        Ok(())
    }

    /// Removes every set-aside copy (`<NAME>@stale`) of the maps named.
    pub fn remove_stale(&self, maps: &[&str]) -> Result<()> {
        for (file_name, path) in self.entries(&self.maps_dir())? {
            if file_name.strip_suffix(STALE_SUFFIX).is_some_and(|name| maps.contains(&name)) {
                remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// (file name, path) of the entries of `dir`; none if it does not exist.
    fn entries(&self, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            found.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
        }
        Ok(found)
    }
}

/// `<hook>@<ifname>`: how versions before ifindex-keyed pins named links.
fn legacy_link_name(name: &str) -> Option<(Hook, &str)> {
    let (prefix, ifname) = name.split_once('@')?;
    let hook = Hook::ALL.into_iter().find(|h| h.pin_prefix() == prefix)?;
    (!ifname.contains(':') && !ifname.is_empty()).then_some((hook, ifname))
}

/// Suffix of a pinned map set aside by a start that rebuilds it (see `layout`).
/// (bpffs refuses names with a dot.)
pub const STALE_SUFFIX: &str = "@stale";

/// Removes a pin; a missing one is fine.
pub fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Removes a directory unless something is left in it (not ours) or it is gone already.
fn remove_dir_if_empty(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::DirectoryNotEmpty => {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        Ok(()) => Ok(()),
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_directory_has_one_name() {
        let a = Pins::new("/sys/fs/bpf/tailgate/");
        assert_eq!(a.root(), Path::new("/sys/fs/bpf/tailgate"));
        // Existing or not, no trailing separator.
        assert_eq!(Pins::new("/tmp/").root().as_os_str(), "/tmp");
        for other in ["/sys/fs/bpf/./tailgate", "/sys/fs/bpf/x/../tailgate", "/sys/fs/../fs/bpf/tailgate"] {
            assert_eq!(Pins::new(other).root(), a.root(), "{other}");
        }
        assert!(Pins::new("relative").root().is_absolute());
        // A symlink to a directory names that directory.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let real = std::fs::canonicalize(dir.path().join("real")).unwrap();
        assert_eq!(Pins::new(dir.path().join("link/pins")).root(), real.join("pins"));
    }

    #[test]
    fn a_pin_dir_off_bpffs_is_refused_and_nothing_there_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let pins = Pins::new(dir.path().join("tailgate"));
        let e = pins.prepare().unwrap_err();
        assert!(e.to_string().contains("not on a bpffs mount"), "{e:#}");
        assert!(!pins.root().exists(), "nothing created");
        // Files that look like tailgate's are left alone off bpffs.
        std::fs::create_dir_all(pins.maps_dir()).unwrap();
        std::fs::create_dir_all(pins.links_dir()).unwrap();
        std::fs::write(pins.map("COUNTERS"), "mine").unwrap();
        std::fs::write(pins.links_dir().join("xdp@eth0:2"), "mine").unwrap();
        pins.remove_all(&["COUNTERS"]).unwrap();
        assert!(pins.map("COUNTERS").exists() && pins.links_dir().join("xdp@eth0:2").exists());
    }

    #[test]
    fn legacy_link_names() {
        assert_eq!(legacy_link_name("xdp@eth0"), Some((Hook::Xdp, "eth0")));
        assert_eq!(legacy_link_name("tc_egress@tailscale0"), Some((Hook::TcEgress, "tailscale0")));
        assert_eq!(legacy_link_name("xdp@eth0:3"), None);
        assert_eq!(legacy_link_name("mine@x"), None);
    }
}
