//! The kernel ABI of tailgate: everything the eBPF programs and the userspace daemon must
//! agree on. Map names, key/value layouts, verdict and counter ids live here and nowhere
//! else. `no_std` so the eBPF crate can use it; the `user` feature adds aya's `Pod` impls.
#![no_std]

pub mod cgnat;
pub mod conntrack;
pub mod counters;
pub mod layout;
pub mod services;
pub mod settings;

/// Policy generations: every policy map holds the policy twice, generation 0 and 1 (keyed by
/// generation), and one switch says which one the programs read. A change is written into
/// the generation nobody reads, then the switch flips: the datapath sees the old policy or
/// the new one, never a mix.
pub mod generation {
    /// `Array<u32, 1>`: slot 0 holds the generation (0 or 1) the programs read.
    pub const MAP_ACTIVE: &str = "GENERATION";
    /// `ArrayOfMaps` of one slot, never read by a program. Updating a map-of-maps makes the
    /// kernel wait until every program that started before has finished (an RCU grace
    /// period): after a flip, userspace writes its slot to know that no packet still reads
    /// the generation it is about to change.
    pub const MAP_BARRIER: &str = "GEN_BARRIER";
}

/// Names of the programs in the eBPF object (the `#[xdp]` / `#[classifier]` function names).
pub mod programs {
    /// XDP on every uplink (Ethernet) interface: inbound source filtering.
    pub const UPLINK_XDP: &str = "tg_uplink";
    /// TC egress on the tunnel (TUN) interface: forwarded-into-tunnel source filtering, MSS
    /// clamp.
    pub const TUNNEL_EGRESS: &str = "tg_tunnel_egress";
    /// TC ingress on the tunnel: subnet-route mark, MSS clamp, flows opened from the tunnel.
    pub const TUNNEL_INGRESS: &str = "tg_tunnel_ingress";
    /// TC egress on every uplink: records the gateway's own flows (`[cgnat] allow_replies`).
    pub const UPLINK_EGRESS: &str = "tg_uplink_egress";
    /// TC ingress on the tunnel, first, while services are configured: DNAT.
    pub const SERVICE_IN: &str = "tg_service_in";
    /// TC egress on the tunnel, last, while services are configured: replies translated back.
    pub const SERVICE_OUT: &str = "tg_service_out";
    /// The same on every uplink, for LAN clients.
    pub const SERVICE_UPLINK_IN: &str = "tg_service_uplink_in";
    pub const SERVICE_UPLINK_OUT: &str = "tg_service_uplink_out";
    /// TC ingress on every uplink, first, while masquerading: replies to masqueraded flows
    /// translated back.
    pub const MASQUERADE_IN: &str = "tg_masquerade_in";
    /// TC egress on every uplink, first: marked packets from the tunnel masqueraded.
    pub const MASQUERADE_OUT: &str = "tg_masquerade_out";
    /// TC egress on the tunnel, last, with the egress proxy: flows to its target get the
    /// gateway's tailnet address (SNAT). Its replies are translated back by `SERVICE_IN`.
    pub const PROXY_OUT: &str = "tg_proxy_out";
}

/// Load-time constants of the object (`EbpfLoader::override_global`).
pub mod globals {
    /// `u32`: where the IP header starts in a packet the tunnel programs see. 0 on a TUN
    /// device (raw IP); BPF_PROG_TEST_RUN builds an Ethernet frame even for a program meant
    /// for a TUN device, so tests load with 14.
    pub const TUNNEL_L3_OFFSET: &str = "TUNNEL_L3_OFFSET";
}

/// Name of the per-CPU array counting packets per [`counters::Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Name of the per-CPU array counting packets per rule id (see [`cgnat::PrefixRule`]).
pub const MAP_RULE_HITS: &str = "RULE_HITS";

/// Number of rule ids, and so of per-rule counters. A rule (prefix + verdict) has one id
/// wherever it appears. Per-CPU memory: `MAX_RULES * 8` bytes per CPU.
pub const MAX_RULES: u32 = 1 << 17;

/// The verdict a matching rule gives.
pub mod verdict {
    pub const PASS: u32 = 0;
    pub const DROP: u32 = 1;
    /// No rule matched (only in [`crate::cgnat::PrefixRule::NONE`]).
    pub const NONE: u32 = 2;
}

/// The reference's packet marks (defaults of `[subnet_routes] mark`).
pub mod mark {
    /// Traffic from the tunnel to a subnet route: masqueraded on the way out.
    pub const SUBNET_ROUTE: u32 = 0x40000;
    /// Bits of the mark the reference owns.
    pub const MASK: u32 = 0xff0000;
}
