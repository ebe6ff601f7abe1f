//! CGNAT source filtering: LPM tries keyed by source prefix.
//!
//! Keys are LPM trie keys `{ prefix_len: u32, addr: [u8; N] }` with the address in network
//! byte order (aya's `lpm_trie::Key` on both sides). The kernel knows no ranges: the whole
//! policy, built-in ranges included, is in the tries, so `mode = "off"` is empty tries.
//!
//! Every trie exists once per policy generation (see [`crate::generation`]); index the name
//! arrays with the generation.

/// Source rules for packets entering an uplink (XDP), IPv4, per generation.
pub const MAP_IN_V4: [&str; 2] = ["CGNAT_IN_V4_0", "CGNAT_IN_V4_1"];
/// Source rules for packets entering an uplink (XDP), IPv6, per generation.
pub const MAP_IN_V6: [&str; 2] = ["CGNAT_IN_V6_0", "CGNAT_IN_V6_1"];
/// Source rules for packets forwarded into the tunnel (TC egress on TUN), IPv4.
pub const MAP_FWD_V4: [&str; 2] = ["CGNAT_FWD_V4_0", "CGNAT_FWD_V4_1"];
/// Source rules for packets forwarded into the tunnel (TC egress on TUN), IPv6.
pub const MAP_FWD_V6: [&str; 2] = ["CGNAT_FWD_V6_0", "CGNAT_FWD_V6_1"];

/// Names of the single-generation tries of versions before generations existed; a start
/// removes their pins.
pub const LEGACY_MAPS: [&str; 4] = ["CGNAT_IN_V4", "CGNAT_IN_V6", "CGNAT_FWD_V4", "CGNAT_FWD_V6"];

/// Most prefixes a policy may hold (user prefixes plus the built-in ones): one rule id and
/// counter each.
pub const MAX_POLICY_PREFIXES: u32 = crate::MAX_RULES;
/// Capacity of each trie: one policy. Only the inactive generation is ever written, so it
/// can be emptied before it is refilled. LPM tries are not preallocated: unused capacity
/// costs nothing.
pub const MAX_PREFIXES: u32 = MAX_POLICY_PREFIXES;

pub type V4Addr = [u8; 4];
pub type V6Addr = [u8; 16];

/// Value of every prefix trie: what to do with a matching packet, and which rule matched
/// (index into `RULE_HITS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixRule {
    /// One of [`crate::verdict`].
    pub verdict: u32,
    /// Below [`crate::MAX_RULES`]; allocated by the daemon, stable across reloads, shared by
    /// the inbound and forward entries of the same prefix and verdict.
    pub rule_id: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PrefixRule {}
