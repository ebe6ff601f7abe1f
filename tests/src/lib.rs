//! Test support for tailgate: network namespaces with guards, veth and TUN devices, a
//! daemon runner, packet builders, BPF_PROG_TEST_RUN helpers and a real-traffic cost rig
//! for XDP programs (`traffic`).
//!
//! Safety rules: nothing here touches the root network namespace. Every namespace, pin
//! directory and process is owned by a guard that removes it on drop, also when a test
//! panics. Loops that send traffic are bounded in count and time.

pub mod daemon;
pub mod differential;
pub mod flood;
pub mod forwarding;
pub mod model;
pub mod netns;
pub mod packets;
pub mod relay;
pub mod tailnet;
pub mod testrun;
pub mod topology;
pub mod traffic;
pub mod tun;
pub mod wait;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name unique to this process and call: `<tag>-<pid>-<n>`.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
