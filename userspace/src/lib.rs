//! tailgate: CGNAT source filtering (and, later, marking, DNAT, MSS clamping) for overlay
//! gateway nodes, in XDP/TC with an iptables fallback.
//!
//! config → policy (pure) → backend (bpf) → kernel; `status` reads the pinned state.

pub mod backend;
pub mod config;
pub mod daemon;
pub mod explain;
pub mod forwarding;
pub mod lock;
pub mod metrics;
pub mod netdev;
pub mod policy;
pub mod runstate;
pub mod status;
