//! Subnet routes in the BPF backend: the tunnel ingress program sets the mark (its value and
//! mask in `SETTINGS`); the masquerade stays one netfilter rule keyed on that mark (the same
//! desired-state writer and repair as the iptables backend) until the BPF NAT engine comes.

use tailgate_abi::settings::{stage, Settings};

use crate::{
    backend::iptables::{
        exec::Available,
        render::{Builder, Wiring},
        subnet_routes,
        table::TableSpec,
    },
    policy::{DesiredState, SubnetRoutes},
};

pub fn fill(routes: &SubnetRoutes, settings: &mut Settings) {
    settings.stages |= stage::MARK;
    settings.mark_value = routes.mark.value;
    settings.mark_mask = routes.mark.mask;
}

/// The netfilter tables the BPF backend keeps: the masquerade rule where wanted, and every
/// other table empty of tailgate's chains (an earlier iptables-backend run's go).
pub fn tables(state: &DesiredState, wiring: Wiring, available: &Available) -> Vec<TableSpec> {
    let mut b = Builder::new(available, wiring);
    subnet_routes::masquerade(&mut b, state);
    b.finish()
}
