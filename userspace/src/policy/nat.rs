//! The BPF NAT engine's parameters (the masquerade's source ports; see `config::nat`).

use crate::config::NatConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nat {
    /// First and last source port given to translated flows.
    pub ports: [u16; 2],
}

impl Default for Nat {
    fn default() -> Self {
        compile(&NatConfig::default())
    }
}

pub fn compile(config: &NatConfig) -> Nat {
    Nat { ports: config.ports }
}
