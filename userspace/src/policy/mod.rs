//! The policy compiler: `Config` (plus what the system says: uplinks, tunnel MTU) →
//! `DesiredState`, in pure code, one module per feature. Both backends apply the same
//! `DesiredState`, which is what keeps them equivalent; nothing a backend enforces is
//! derived anywhere else.

pub mod cgnat;
pub mod conntrack;
pub mod maglev;
pub mod mss;
pub mod nat;
pub mod proxy;
pub mod services;
pub mod subnet_routes;

pub use self::{
    cgnat::{resolve, CgnatRules, Origin, Rule, Verdict, CGNAT_V4, CHROMEOS_V4, TAILNET_ULA_V6},
    conntrack::Conntrack,
    mss::Mss,
    subnet_routes::SubnetRoutes,
};
use std::sync::Arc;

use crate::config::Config;

/// Everything the datapath must enforce, independent of how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    pub tunnel: String,
    pub uplinks: Vec<String>,
    /// Shared: the daemon, the backend and the map sync hold the same rules (100,000 of
    /// them are megabytes), and an unchanged policy compares equal by pointer.
    pub cgnat: Arc<CgnatRules>,
    pub subnet_routes: SubnetRoutes,
    pub mss: Mss,
    pub conntrack: Conntrack,
    /// `[[service]]`.
    pub services: services::Services,
    /// `[proxy]`.
    pub proxy: proxy::Proxy,
    /// `[nat]`.
    pub nat: nat::Nat,
}

/// What the policy depends on besides the config: read from the system by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct System {
    /// The uplinks, resolved from the config and the devices present.
    pub uplinks: Vec<String>,
    /// The tunnel device's MTU; `None` while it is absent.
    pub tunnel_mtu: Option<u32>,
    /// The tunnel device's addresses (the gateway's tailnet addresses).
    pub tunnel_addresses: Vec<std::net::IpAddr>,
    /// Every device's addresses (the egress proxy takes what arrives for them).
    pub addresses: Vec<std::net::IpAddr>,
}

/// Compiles a validated config and what the system says into the desired state.
pub fn compile(config: &Config, system: System) -> DesiredState {
    DesiredState {
        tunnel: config.tunnel.clone(),
        uplinks: system.uplinks,
        cgnat: Arc::new(cgnat::compile(&config.cgnat, config.user_prefixes())),
        subnet_routes: subnet_routes::compile(&config.subnet_routes),
        mss: mss::compile(&config.mss, system.tunnel_mtu),
        conntrack: conntrack::compile(config),
        services: services::compile(config),
        proxy: proxy::compile(config, &system.tunnel_addresses, &system.addresses),
        nat: nat::compile(&config.nat),
    }
}
