//! A TUN device opened by the test, as the overlay daemon would open it.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::netns::Netns;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
nix::ioctl_write_int!(tunsetiff, b'T', 202);

/// An open TUN device: writes inject packets as if they came from the tunnel, reads return
/// what the host sends into the tunnel. The device disappears when this is dropped (or
/// `delete`d), as when the overlay daemon restarts.
pub struct Tun {
    file: Option<File>,
    pub name: String,
}

impl Tun {
    /// Creates and opens TUN device `name` inside `ns` (raw IP, no packet info header).
    pub fn open(ns: &Netns, name: &str) -> Result<Self> {
        let mut tun = Self { file: None, name: name.to_string() };
        tun.create(ns)?;
        Ok(tun)
    }

    /// Closes the device: the kernel deletes it. Returns once it is gone.
    pub fn delete(&mut self, ns: &Netns) -> Result<()> {
        self.file = None;
        let gone =
            crate::wait::until(Duration::from_secs(5), || ns.ip(&["link", "show", &self.name]).is_err());
        anyhow::ensure!(gone, "{} still exists", self.name);
        Ok(())
    }

    /// Creates the device (again), up, without addresses.
    pub fn create(&mut self, ns: &Netns) -> Result<()> {
        let name = self.name.clone();
        let file = ns.enter(|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .context("opening /dev/net/tun")?;
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *dst = src as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI;
            unsafe { tunsetiff(file.as_raw_fd(), &req as *const _ as u64) }.context("TUNSETIFF")?;
            Ok(file)
        })?;
        self.file = Some(file);
        ns.ip(&["link", "set", &name, "up"])
    }

    /// Another handle on the open device (for a relay thread).
    pub fn clone_file(&self) -> Result<File> {
        let file = self.file.as_ref().with_context(|| format!("{} is deleted", self.name))?;
        Ok(file.try_clone()?)
    }

    fn file(&mut self) -> Result<&mut File> {
        self.file.as_mut().with_context(|| format!("{} is deleted", self.name))
    }

    /// Injects one raw IP packet.
    pub fn send(&mut self, packet: &[u8]) -> Result<()> {
        self.file()?.write_all(packet).context("writing to the TUN device")
    }

    /// The first packet the host sends into the tunnel that `want` accepts, within `timeout`.
    pub fn recv_matching(&mut self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let file = self.file.as_mut()?;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let ms = PollTimeout::from(left.as_millis().min(1000) as u16);
            let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&*file), PollFlags::POLLIN)];
            if poll(&mut fds, ms).unwrap_or(0) > 0 {
                if let Ok(n) = file.read(&mut buf) {
                    if want(&buf[..n]) {
                        return Some(buf[..n].to_vec());
                    }
                }
            }
        }
    }
}
