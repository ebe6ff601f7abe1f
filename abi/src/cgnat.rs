//! CGNAT source filtering: LPM tries keyed by source prefix.
//!
//! Keys are LPM trie keys `{ prefix_len: u32, addr: [u8; N] }` with the address in network
//! byte order (aya's `lpm_trie::Key` on both sides). The kernel knows no ranges: the whole
//! policy, built-in ranges included, is in the tries, so `mode = "off"` is empty tries.
//!
//! Both policy generations (see [`crate::generation`]) live in the same trie: every key
//! starts with a 4-byte tag `[generation, 0, 0, 0]` that is always matched (a prefix of
//! length `L` is stored with length `32 + L`), so a lookup with generation `g` only ever
//! finds entries of `g`. (4 bytes, not 1: the key data must keep the value aligned.)
//! One map per direction and family keeps one lookup call site per map in the programs
//! (a call site fed two maps costs a slow generic call).

/// Source rules for packets entering an uplink (XDP), IPv4.
pub const MAP_IN_V4: &str = "CGNAT_IN4";
/// Source rules for packets entering an uplink (XDP), IPv6.
pub const MAP_IN_V6: &str = "CGNAT_IN6";
/// Source rules for packets forwarded into the tunnel (TC egress on TUN), IPv4.
pub const MAP_FWD_V4: &str = "CGNAT_FWD4";
/// Source rules for packets forwarded into the tunnel (TC egress on TUN), IPv6.
pub const MAP_FWD_V6: &str = "CGNAT_FWD6";

/// Names of the tries of versions before generations existed (keys without the generation
/// byte); a start removes their pins.
pub const LEGACY_MAPS: [&str; 4] = ["CGNAT_IN_V4", "CGNAT_IN_V6", "CGNAT_FWD_V4", "CGNAT_FWD_V6"];

/// Bits of the generation tag at the start of every key.
pub const GENERATION_BITS: u32 = 32;
/// Bytes of the tag.
pub const TAG_LEN: usize = 4;

/// Most prefixes a policy may hold (user prefixes plus the built-in ones): one rule id and
/// counter each.
pub const MAX_POLICY_PREFIXES: u32 = crate::MAX_RULES;
/// Capacity of each trie: both generations of the largest policy. LPM tries are not
/// preallocated: unused capacity costs nothing.
pub const MAX_PREFIXES: u32 = 2 * MAX_POLICY_PREFIXES;

/// Key data: the tag, then the IPv4 address in network byte order.
pub type V4Key = [u8; 8];
/// Key data: the tag, then the IPv6 address.
pub type V6Key = [u8; 20];

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
