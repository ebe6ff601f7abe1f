//! Source filtering as the README states it: of a direction's prefix rules, the longest
//! prefix containing the address decides; no rule, no decision.

use std::net::IpAddr;

use ipnet::IpNet;
use tailgate::policy::{self, DesiredState};

/// Which list of rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Entering an uplink.
    Inbound,
    /// Forwarded into the tunnel.
    Forward,
}

/// The rule that decides for `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hit {
    pub direction: Direction,
    pub prefix: IpNet,
    pub drop: bool,
}

/// The longest rule of `direction` containing `addr`, by a plain scan (no ordering of the
/// list is assumed).
pub fn decide(state: &DesiredState, direction: Direction, addr: IpAddr) -> Option<Hit> {
    let rules = match direction {
        Direction::Inbound => &state.cgnat.inbound,
        Direction::Forward => &state.cgnat.forward,
    };
    rules.iter().filter(|r| r.prefix.contains(&addr)).max_by_key(|r| r.prefix.prefix_len()).map(|r| Hit {
        direction,
        prefix: r.prefix,
        drop: r.verdict == policy::Verdict::Drop,
    })
}
