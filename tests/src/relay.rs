//! A TUN-to-TUN relay: stands in for the overlay daemon, carrying every packet one TUN
//! device's host sends into it out of the other TUN device, both ways, so sockets on both
//! sides of the tunnel are real.

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::AsFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use anyhow::Result;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::tun::Tun;

/// Runs until dropped.
pub struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(a: &Tun, b: &Tun) -> Result<Self> {
        let (mut a, mut b) = (a.clone_file()?, b.clone_file()?);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                // Wake up every 50 ms to see the stop flag.
                let ready = {
                    let mut fds = [
                        PollFd::new(a.as_fd(), PollFlags::POLLIN),
                        PollFd::new(b.as_fd(), PollFlags::POLLIN),
                    ];
                    match poll(&mut fds, PollTimeout::from(50u16)) {
                        Ok(n) if n > 0 => {
                            fds.map(|f| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
                        }
                        _ => [false, false],
                    }
                };
                if ready[0] {
                    forward(&mut a, &mut b, &mut buf);
                }
                if ready[1] {
                    forward(&mut b, &mut a, &mut buf);
                }
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

/// One packet from `from` to `to`; a device gone meanwhile loses it, as a tunnel would.
fn forward(from: &mut File, to: &mut File, buf: &mut [u8]) {
    if let Ok(n) = from.read(buf) {
        let _ = to.write_all(&buf[..n]);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
