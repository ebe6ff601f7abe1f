//! Subnet routes in the BPF backend: the tunnel ingress program sets the mark (its value and
//! mask in `SETTINGS`); the masquerade keys on it (`masquerade`).

use tailgate_abi::settings::{stage, Settings};

use crate::policy::SubnetRoutes;

pub fn fill(routes: &SubnetRoutes, settings: &mut Settings) {
    settings.stages |= stage::MARK;
    settings.mark_value = routes.mark.value;
    settings.mark_mask = routes.mark.mask;
}
