//! Exclusive ownership: one daemon per pin dir (whatever its backend), and one daemon
//! writing tailgate's iptables chains per network namespace.
//!
//! Locks are POSIX record locks on files under `/run/tailgate/`: the kernel drops them when
//! the holder dies (also on `kill -9`), and `F_GETLK` names the holder's PID without taking
//! the lock, so `status` and `cleanup` can ask without getting in a starting daemon's way.
//! Instances that could collide must share that directory (a container mounts it from the
//! host, like `/run/xtables.lock`).
//!
//! POSIX locks belong to a process and go when it closes *any* descriptor of the file: a
//! process never opens a lock file it holds a second time (`holder` is for other processes).

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::{errno::Errno, fcntl::FcntlArg};

use crate::backend::bpf::Pins;

/// Where locks and run state live.
pub const RUN_DIR: &str = "/run/tailgate";

/// A held lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct Lock {
    file: File,
    path: PathBuf,
    /// A random id written into the file, naming this holding of the lock.
    id: u64,
}

/// Someone else holds the lock.
#[derive(Debug, thiserror::Error)]
#[error("held by PID {pid}")]
pub struct Held {
    pub pid: i32,
}

impl Lock {
    /// Takes the lock at `path` without waiting. `Ok(Err(held))` when a live process has it.
    pub fn try_acquire(path: &Path) -> Result<Result<Self, Held>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            match set_lock(&file, libc::F_WRLCK) {
                Ok(()) => {}
                Err(Errno::EAGAIN | Errno::EACCES) => match holder_of(&file)? {
                    Some(pid) => return Ok(Err(Held { pid })),
                    // Released meanwhile: try again.
                    None => continue,
                },
                Err(e) => return Err(e).with_context(|| format!("locking {}", path.display())),
            }
            // The previous holder removes the file when it lets go: if the path now names
            // another file (or none), this lock guards nothing; start over.
            let same =
                std::fs::metadata(path).is_ok_and(|m| m.ino() == file.metadata().map_or(0, |f| f.ino()));
            if same {
                let id = random_id()?;
                file.set_len(0)?;
                (&file).write_all(id.to_string().as_bytes())?;
                return Ok(Ok(Self { file, path: path.to_path_buf(), id }));
            }
        }
    }

    /// Identifies this holding of the lock (random, written into the lock file), for records
    /// that must tell the current holder from an earlier one whatever PID namespace the
    /// reader is in. (Not the file's inode: filesystems reuse those at once.)
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The id (see `id`) of the current holding of the lock at `path`, if there is one.
    pub fn current_id(path: &Path) -> Option<u64> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// The PID of the live process holding the lock at `path`, if any.
    pub fn holder(path: &Path) -> Result<Option<i32>> {
        match File::open(path) {
            Ok(file) => holder_of(&file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("opening {}", path.display())),
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Remove while still holding it (see `try_acquire`), then the lock goes with the fd.
        let _ = std::fs::remove_file(&self.path);
        let _ = set_lock(&self.file, libc::F_UNLCK);
    }
}

fn random_id() -> Result<u64> {
    let mut bytes = [0u8; 8];
    File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).context("reading /dev/urandom")?;
    Ok(u64::from_ne_bytes(bytes))
}

fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: plain data; all zeroes is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

fn set_lock(file: &File, kind: libc::c_int) -> nix::Result<()> {
    nix::fcntl::fcntl(file, FcntlArg::F_SETLK(&whole_file(kind))).map(drop)
}

fn holder_of(file: &File) -> Result<Option<i32>> {
    let mut probe = whole_file(libc::F_WRLCK);
    nix::fcntl::fcntl(file, FcntlArg::F_GETLK(&mut probe)).context("querying a lock")?;
    Ok((probe.l_type != libc::F_UNLCK as libc::c_short).then_some(probe.l_pid))
}

/// The lock of the instance using `pins`: `/run/tailgate/<pin dir>.lock`.
pub fn instance_path(pins: &Pins) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{}.lock", instance_name(pins)))
}

/// A file name for the instance of `pins`: its pin dir with '/' as '_' (and '_' and '%'
/// escaped as `%5F`, `%25`, so two directories never share a name).
pub fn instance_name(pins: &Pins) -> String {
    pins.root().to_string_lossy().trim_matches('/').replace('%', "%25").replace('_', "%5F").replace('/', "_")
}

/// The lock of tailgate's iptables chains in this network namespace:
/// `/run/tailgate/iptables-netns-<inode>.lock`.
pub fn netns_path() -> Result<PathBuf> {
    let ns = std::fs::metadata("/proc/thread-self/ns/net").context("identifying the network namespace")?;
    Ok(Path::new(RUN_DIR).join(format!("iptables-netns-{}-{}.lock", ns.dev(), ns.ino())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_distinct_and_readable() {
        let name = |p: &str| instance_name(&Pins::new(p));
        assert_eq!(name("/sys/fs/bpf/tailgate"), "sys_fs_bpf_tailgate");
        assert_ne!(name("/sys/fs/bpf/a_b"), name("/sys/fs/bpf/a/b"));
        assert_ne!(name("/sys/fs/bpf/a%5Fb"), name("/sys/fs/bpf/a_b"));
    }

    #[test]
    fn the_lock_file_goes_with_the_lock() {
        // Two processes contending is covered by the daemon tests (a second `run` is
        // refused naming the first's PID); POSIX locks never conflict within one process.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        assert_eq!(Lock::holder(&path).unwrap(), None);
        let first = Lock::try_acquire(&path).unwrap().unwrap();
        assert!(path.exists());
        assert_eq!(Lock::current_id(&path), Some(first.id()));
        let first_id = first.id();
        drop(first);
        assert!(!path.exists(), "the lock file goes with the lock");
        assert_eq!(Lock::holder(&path).unwrap(), None);
        let second = Lock::try_acquire(&path).unwrap().unwrap();
        assert_ne!(second.id(), first_id, "each holding has its own id");
    }
}
