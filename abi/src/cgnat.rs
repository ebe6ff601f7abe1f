//! CGNAT source filtering: the policy's source prefixes, looked up longest first.
//!
//! An LPM trie walks one node per bit of depth, and with traffic from many sources every
//! node is a cache miss, so its cost grows with the policy. Instead each direction and
//! family has a [`Plan`] and a hash map:
//!
//! 1. the plan's *range* (the smallest prefix covering every rule of the family: the CGNAT
//!    /10, the tailnet ULA /48) is compared first, with a mask: a source outside it matches
//!    no rule and costs no lookup at all (most real traffic);
//! 2. inside it, one hash lookup per prefix length the policy has longer than the range,
//!    longest first, with the source masked to that length; the first hit is the longest
//!    matching prefix;
//! 3. no hit: the rule of the range itself, if the policy has one (the built-in drop).
//!
//! So a lookup costs one hash probe per distinct prefix length (a policy has few), whatever
//! the number of prefixes. A policy with at most [`MAX_INLINE`] prefixes inside the range
//! (the default policy has one: the ChromeOS carve-out) carries them in the plan itself,
//! compared with masks in order: no hash probe at all. Semantics are exactly
//! longest-prefix-wins.
//!
//! Both policy generations (see [`crate::generation`]) live in the same maps: hash keys
//! start with `[generation, prefix length, 0, 0]`, and the plans are indexed by
//! generation ([`plan_index`]). One hash map per direction and family keeps one lookup call
//! site per map in the programs.

/// Source rules for packets entering an uplink (XDP), IPv4.
pub const MAP_IN_V4: &str = "CGNAT_IN4";
/// Source rules for packets entering an uplink (XDP), IPv6.
pub const MAP_IN_V6: &str = "CGNAT_IN6";
/// Source rules for packets forwarded into the tunnel (TC egress on TUN), IPv4.
pub const MAP_FWD_V4: &str = "CGNAT_FWD4";
/// Source rules for packets forwarded into the tunnel (TC egress on TUN), IPv6.
pub const MAP_FWD_V6: &str = "CGNAT_FWD6";
/// `Array<Plan, 4>`: the plan of each direction and generation, see [`plan_index`].
pub const MAP_PLAN: &str = "CGNAT_PLAN";

/// Names of the tries of versions before generations existed (keys without the generation
/// byte); a start removes their pins.
pub const LEGACY_MAPS: [&str; 4] = ["CGNAT_IN_V4", "CGNAT_IN_V6", "CGNAT_FWD_V4", "CGNAT_FWD_V6"];

/// Bytes of the tag `[generation, prefix length, 0, 0]` at the start of every key.
pub const TAG_LEN: usize = 4;

/// Most prefixes a policy may hold (user prefixes plus the built-in ones): one rule id and
/// counter each.
pub const MAX_POLICY_PREFIXES: u32 = crate::MAX_RULES;
/// Capacity of each hash map: both generations of the largest policy. The maps are not
/// preallocated (`BPF_F_NO_PREALLOC`): unused capacity costs only the bucket array.
pub const MAX_PREFIXES: u32 = 2 * MAX_POLICY_PREFIXES;
/// `BPF_F_NO_PREALLOC`.
pub const HASH_FLAGS: u32 = 1;

/// Key: the tag `[generation, prefix length, 0, 0]`, then the IPv4 address masked to the
/// prefix length, in network byte order.
pub type V4Key = [u8; 8];
/// Key: the tag, then the IPv6 address masked to the prefix length.
pub type V6Key = [u8; 20];

/// Directions, for [`plan_index`].
pub const INBOUND: u32 = 0;
pub const FORWARD: u32 = 1;

/// Where the plan of `direction` ([`INBOUND`] / [`FORWARD`]) in `generation` is.
#[inline(always)]
pub const fn plan_index(direction: u32, generation: u32) -> u32 {
    direction * 2 + (generation & 1)
}

/// Value of every prefix map: what to do with a matching packet, and which rule matched
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

impl PrefixRule {
    /// "No rule": the range of a plan whose own prefix is not a rule.
    pub const NONE: PrefixRule = PrefixRule { verdict: crate::verdict::NONE, rule_id: u32::MAX };
}

/// Prefixes a plan carries itself instead of probing the hash map.
pub const MAX_INLINE: usize = 4;

/// A prefix carried in the plan: `s & mask == net` matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inline<const A: usize> {
    pub net: [u8; A],
    pub mask: [u8; A],
    pub rule: PrefixRule,
}

/// How to look up one family's rules of one direction and generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyPlan<const A: usize, const L: usize> {
    /// The range, as address and mask bytes in network order: a source `s` is inside when
    /// `s & mask == net`. No rules at all: `active` is 0.
    pub net: [u8; A],
    pub mask: [u8; A],
    /// 1 when the family has rules.
    pub active: u32,
    /// How many entries of `lengths` are used.
    pub count: u32,
    /// The rule of the range itself, or [`PrefixRule::NONE`].
    pub fallback: PrefixRule,
    /// How many entries of `inline` are used; when not 0 they are all the prefixes longer
    /// than the range (longest first) and `lengths` is not probed.
    pub inline_count: u32,
    pub inline: [Inline<A>; MAX_INLINE],
    /// Prefix lengths present in the policy that are longer than the range, longest first.
    pub lengths: [u8; L],
}

/// IPv4: up to 32 lengths longer than the range.
pub type Plan4 = FamilyPlan<4, 32>;
/// IPv6: up to 128 lengths longer than the range.
pub type Plan6 = FamilyPlan<16, 128>;

/// The plan of one direction in one generation. IPv4 first: the IPv4 path reads one cache
/// line.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub v4: Plan4,
    pub v6: Plan6,
}

impl<const A: usize, const L: usize> FamilyPlan<A, L> {
    /// A family without rules.
    pub const EMPTY: Self = Self {
        net: [0; A],
        mask: [0; A],
        active: 0,
        count: 0,
        fallback: PrefixRule::NONE,
        inline_count: 0,
        inline: [Inline { net: [0; A], mask: [0; A], rule: PrefixRule::NONE }; MAX_INLINE],
        lengths: [0; L],
    };
}

impl Plan {
    /// No rules in either family.
    pub const EMPTY: Plan = Plan { v4: Plan4::EMPTY, v6: Plan6::EMPTY };
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PrefixRule {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Plan {}
