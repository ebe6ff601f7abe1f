//! Flow tracking: which owning paths record flows, and so which reply checks apply.

use crate::config::{CgnatMode, Config};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conntrack {
    /// Record the gateway's own flows out of each uplink (towards addresses the inbound
    /// rules drop) and let their replies through: `[cgnat] allow_replies`, when the CGNAT
    /// filter is on.
    pub own_replies: bool,
    /// Record flows opened from the tunnel and forward into it from other devices only
    /// what belongs to one: `[subnet_routes] stateful`.
    pub stateful: bool,
}

pub fn compile(config: &Config) -> Conntrack {
    Conntrack {
        own_replies: config.cgnat.allow_replies && config.cgnat.mode == CgnatMode::Drop,
        stateful: config.subnet_routes.stateful,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::policy;

    fn state(toml: &str) -> Conntrack {
        policy::compile(&Config::parse(toml, &HashMap::new()).unwrap(), Default::default()).conntrack
    }

    #[test]
    fn defaults_and_switches() {
        assert_eq!(state(""), Conntrack { own_replies: true, stateful: false });
        assert_eq!(
            state("[cgnat]\nallow_replies = false\n[subnet_routes]\nstateful = true"),
            Conntrack { own_replies: false, stateful: true }
        );
        // Nothing is dropped inbound: no replies to let through.
        assert!(!state("[cgnat]\nmode = \"off\"").own_replies);
    }
}
