//! CGNAT source filtering: the policy's source prefixes, looked up longest first.
//!
//! An LPM trie walks one node per bit of depth, and with traffic from many sources every
//! node is a cache miss, so its cost grows with the policy. Instead each direction and
//! family has a [`Plan`] and a slot table:
//!
//! 1. the plan's *range* (the smallest prefix covering every rule of the family: the CGNAT
//!    /10, the tailnet ULA /48) is compared first, with a mask: a source outside it matches
//!    no rule and costs no lookup at all (most real traffic);
//! 2. inside it, one table probe per prefix length the policy has longer than the range,
//!    longest first, with the source masked to that length; the first hit is the longest
//!    matching prefix;
//! 3. no hit: the rule of the range itself, if the policy has one (the built-in drop).
//!
//! So a lookup costs one probe per distinct prefix length (a policy has few), whatever the
//! number of prefixes. A policy with at most [`MAX_INLINE`] prefixes inside the range
//! (the default policy has one: the ChromeOS carve-out) carries them in the plan itself,
//! compared with masks in order: no probe at all. Semantics are exactly
//! longest-prefix-wins.
//!
//! The table is an open-addressing hash table in an array ([`Slot4`], [`Slot6`]): a slot
//! holds the prefix itself and its rule, so a probe reads one slot (one cache line) where a
//! kernel hash map reads a bucket and then the element it points to, two dependent misses
//! under many sources. A prefix sits at [`slot_index`] of its key or, when taken, in one of
//! the next slots (linear probing, at most the plan's [`Shape::max_probe`]); a probe stops at an
//! empty slot. The daemon builds the tables, sized to the policy (at most half full), so it
//! knows the longest run.
//!
//! Each generation (see [`crate::generation`]) has its own tables, the inner maps of an
//! array-of-maps indexed by generation, and its own plans ([`plan_index`]); a table is
//! replaced whole when the policy outgrows it.

/// The tables of each generation (`ArrayOfMaps<Array<Slot4>, 2>`, index = generation) of
/// packets entering an uplink (XDP), IPv4.
pub const MAP_IN_V4: &str = "CGNAT_IN4";
/// ... IPv6 ([`Slot6`]).
pub const MAP_IN_V6: &str = "CGNAT_IN6";
/// Packets forwarded into the tunnel (TC egress on TUN), IPv4.
pub const MAP_FWD_V4: &str = "CGNAT_FWD4";
/// Packets forwarded into the tunnel, IPv6.
pub const MAP_FWD_V6: &str = "CGNAT_FWD6";
/// `Array<Plan, 4>`: the plan of each direction and generation, see [`plan_index`].
pub const MAP_PLAN: &str = "CGNAT_PLAN";

/// Names of the tries of versions before generations existed (keys without the generation
/// byte); a start removes their pins.
pub const LEGACY_MAPS: [&str; 4] = ["CGNAT_IN_V4", "CGNAT_IN_V6", "CGNAT_FWD_V4", "CGNAT_FWD_V6"];

/// Most prefixes a policy may hold (user prefixes plus the built-in ones): one rule id and
/// counter each.
pub const MAX_POLICY_PREFIXES: u32 = crate::MAX_RULES;
/// Flags of the tables (inner maps): their sizes differ (`BPF_F_INNER_MAP`), and the daemon
/// writes a whole table through a memory mapping (`BPF_F_MMAPABLE`) instead of one syscall
/// per slot.
pub const TABLE_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
pub const BPF_F_INNER_MAP: u32 = 1 << 12;

/// Longest run a probe walks: the daemon grows a table whose longest run would be longer.
pub const MAX_PROBE: u32 = 16;
/// Slots of the smallest table (a table is a power of two, at most half full).
pub const MIN_SLOTS: u32 = 64;
/// Slots of the largest table.
pub const MAX_SLOTS: u32 = 1 << 22;

/// An IPv4 prefix and its rule. `addr` is the masked address in host order; `entry` packs
/// the prefix length, verdict and rule id ([`Entry`]); 0 is an empty slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot4 {
    pub addr: u32,
    pub entry: u32,
}

/// An IPv6 prefix and its rule: the masked address as two host-order halves. 24 bytes, the
/// array's element stride, so the daemon's view of a mapped table matches the kernel's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot6 {
    pub hi: u64,
    pub lo: u64,
    pub entry: u32,
    pub pad: u32,
}

/// A slot's prefix length (bits 24..32, never 0: table prefixes are longer than the range),
/// verdict (bits 22..24) and rule id (bits 0..22, [`crate::MAX_RULES`] at most).
pub struct Entry;

impl Entry {
    #[inline(always)]
    pub const fn pack(len: u8, rule: PrefixRule) -> u32 {
        ((len as u32) << 24) | ((rule.verdict & 3) << 22) | (rule.rule_id & ID_MASK)
    }
    #[inline(always)]
    pub const fn len(entry: u32) -> u8 {
        (entry >> 24) as u8
    }
    #[inline(always)]
    pub const fn rule(entry: u32) -> PrefixRule {
        PrefixRule { verdict: (entry >> 22) & 3, rule_id: entry & ID_MASK }
    }
}

const ID_MASK: u32 = (1 << 22) - 1;
const _: () = assert!(crate::MAX_RULES <= ID_MASK);

/// What kernel and daemon read of any slot: its [`Entry`] (0: empty).
pub trait TableSlot {
    fn entry(&self) -> u32;
}

impl TableSlot for Slot4 {
    #[inline(always)]
    fn entry(&self) -> u32 {
        self.entry
    }
}

impl TableSlot for Slot6 {
    #[inline(always)]
    fn entry(&self) -> u32 {
        self.entry
    }
}

/// A table's shape as a plan carries it (and the probe functions take it, one argument):
/// log2 of its slot count (bits 0..8) and the longest probe it needs (bits 8..16).
pub struct Shape;

impl Shape {
    #[inline(always)]
    pub const fn pack(bits: u32, max_probe: u32) -> u32 {
        (bits & 0xff) | ((max_probe & 0xff) << 8)
    }
    #[inline(always)]
    pub const fn bits(shape: u32) -> u32 {
        shape & 0xff
    }
    #[inline(always)]
    pub const fn max_probe(shape: u32) -> u32 {
        (shape >> 8) & 0xff
    }
}

/// The home slot of a key in a table of `1 << bits` slots: Fibonacci hashing (the top
/// `bits` bits of the product), which spreads runs of consecutive prefixes evenly.
#[inline(always)]
pub const fn slot_index(key: u64, bits: u32) -> u32 {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_shr(64 - bits) as u32) & slot_mask(bits)
}

/// The slot after `index` (the last one wraps to the first).
#[inline(always)]
pub const fn next_slot(index: u32, bits: u32) -> u32 {
    index.wrapping_add(1) & slot_mask(bits)
}

#[inline(always)]
const fn slot_mask(bits: u32) -> u32 {
    ((1u64 << (bits & 31)) - 1) as u32
}

/// The hash key of an IPv4 prefix: masked address (host order) and length.
#[inline(always)]
pub const fn key4(addr: u32, len: u8) -> u64 {
    (addr as u64) | ((len as u64) << 32)
}

/// The hash key of an IPv6 prefix: both halves (host order) mixed, and the length.
#[inline(always)]
pub const fn key6(hi: u64, lo: u64, len: u8) -> u64 {
    hi.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ lo ^ (len as u64)
}

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
    /// The table's [`Shape`]: `slot_index(key, bits)` is a prefix's home slot, and a prefix
    /// sits at most `max_probe - 1` slots after it.
    pub table: u32,
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
        table: 0,
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
#[cfg(feature = "user")]
unsafe impl aya::Pod for Slot4 {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Slot6 {}
