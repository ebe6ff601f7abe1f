//! Subnet routes: traffic from the tunnel that the gateway forwards is marked, and (by
//! default) masqueraded to the address of the interface it leaves by.

use crate::config::{Mark, SubnetRoutesConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetRoutes {
    /// Set on every packet from the tunnel the gateway forwards; the other mark bits stay.
    pub mark: Mark,
    /// SNAT marked packets leaving by any interface but the tunnel.
    pub masquerade: bool,
}

pub fn compile(config: &SubnetRoutesConfig) -> SubnetRoutes {
    SubnetRoutes { mark: config.mark, masquerade: config.masquerade }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{config::Config, policy};

    #[test]
    fn reference_defaults_and_overrides() {
        let state = |toml: &str| {
            policy::compile(&Config::parse(toml, &HashMap::new()).unwrap(), Default::default()).subnet_routes
        };
        assert_eq!(
            state(""),
            SubnetRoutes { mark: Mark { value: 0x40000, mask: 0xff0000 }, masquerade: true }
        );
        let s = state("[subnet_routes]\nmark = \"0x10/0xf0\"\nmasquerade = false");
        assert_eq!(s, SubnetRoutes { mark: Mark { value: 0x10, mask: 0xf0 }, masquerade: false });
    }
}
