//! Per-policy parameters of the packet stages that have no table of their own (subnet-route
//! mark, MSS clamp): one `Settings` per policy generation, so they change together with the
//! prefix rules, atomically (see [`crate::generation`]).

/// `Array<Settings, 2>`, indexed by generation.
pub const MAP: &str = "SETTINGS";

/// Bits of [`Settings::stages`]: a stage whose bit is clear does nothing (one branch).
pub mod stage {
    /// Set the subnet-route mark on packets arriving from the tunnel.
    pub const MARK: u32 = 1 << 0;
    /// Clamp the MSS of SYN and SYN-ACK crossing the tunnel.
    pub const MSS: u32 = 1 << 1;
    /// Record the gateway's own flows towards filtered addresses at the uplinks' egress and
    /// let their replies through the inbound filter (`[cgnat] allow_replies`).
    pub const OWN_FLOWS: u32 = 1 << 2;
    /// Record flows opened from the tunnel; a packet forwarded into the tunnel from another
    /// device passes only as part of one (`[subnet_routes] stateful`).
    pub const STATEFUL: u32 = 1 << 3;
    /// Tailnet traffic for the gateway's own tailnet address goes to the ingress proxy's
    /// destination (a service entry with port 0: any port, kept).
    pub const INGRESS_PROXY: u32 = 1 << 4;
    /// Masquerade marked traffic leaving an uplink (`[subnet_routes] masquerade`) with
    /// ports from `nat_ports`, and translate its replies back (`crate::nat`).
    pub const MASQUERADE: u32 = 1 << 5;
    /// The egress proxy: traffic arriving on an uplink for one of the gateway's addresses
    /// goes to `proxy_target` (service entries of scope `UPLINKS`), and leaves the tunnel
    /// with `proxy_source` and a port of `nat_ports`; the gateway's own flows out of the
    /// uplinks and the target's flows from the tunnel are recorded so that their replies
    /// are left alone.
    pub const EGRESS_PROXY: u32 = 1 << 6;
}

/// The parameters of one generation. All zero: every stage off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Enabled stages ([`stage`] bits).
    pub stages: u32,
    /// Subnet-route mark: `mark = (mark & !mark_mask) | mark_value`.
    pub mark_value: u32,
    pub mark_mask: u32,
    /// Highest MSS let through in a SYN over IPv4 / IPv6.
    pub mss_v4: u16,
    pub mss_v6: u16,
    /// The source ports the NAT engine gives translated flows, first and last (inclusive):
    /// outside the host's `ip_local_port_range`, so the host's own sockets never collide.
    pub nat_ports: [u16; 2],
    /// The egress proxy's address family (`crate::services::family`), 0 without it.
    pub proxy_family: u8,
    pub pad: [u8; 3],
    /// The egress proxy's target and the gateway's tailnet address its flows leave with
    /// (IPv4: the first 4 bytes).
    pub proxy_target: [u8; 16],
    pub proxy_source: [u8; 16],
}

impl Settings {
    /// Every stage off.
    pub const OFF: Settings = Settings {
        stages: 0,
        mark_value: 0,
        mark_mask: 0,
        mss_v4: 0,
        mss_v6: 0,
        nat_ports: [0; 2],
        proxy_family: 0,
        pad: [0; 3],
        proxy_target: [0; 16],
        proxy_source: [0; 16],
    };
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Settings {}
