//! Every map of the datapath. Names, keys and values come from `tailgate_abi`.

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, LpmTrie, PerCpuArray},
    macros::btf_map,
};
use tailgate_abi::{
    cgnat::{PrefixRule, V4Addr, V6Addr, MAX_PREFIXES},
    counters::Counter,
    MAX_RULES,
};

/// Which policy generation the programs read (slot 0: 0 or 1). See `tailgate_abi::generation`.
#[btf_map]
pub static GENERATION: Array<u32, 1> = Array::new();

/// Only written by userspace, to wait for running programs after a generation flip.
#[btf_map]
pub static GEN_BARRIER: ArrayOfMaps<Array<u32, 1>, 1> = ArrayOfMaps::new();

/// A trie per generation.
pub type V4Rules = LpmTrie<V4Addr, PrefixRule, { MAX_PREFIXES as usize }>;
pub type V6Rules = LpmTrie<V6Addr, PrefixRule, { MAX_PREFIXES as usize }>;

/// Source rules for packets entering an uplink, generations 0 and 1.
#[btf_map]
pub static CGNAT_IN_V4_0: V4Rules = LpmTrie::new();
#[btf_map]
pub static CGNAT_IN_V4_1: V4Rules = LpmTrie::new();
#[btf_map]
pub static CGNAT_IN_V6_0: V6Rules = LpmTrie::new();
#[btf_map]
pub static CGNAT_IN_V6_1: V6Rules = LpmTrie::new();

/// Source rules for packets forwarded into the tunnel, generations 0 and 1.
#[btf_map]
pub static CGNAT_FWD_V4_0: V4Rules = LpmTrie::new();
#[btf_map]
pub static CGNAT_FWD_V4_1: V4Rules = LpmTrie::new();
#[btf_map]
pub static CGNAT_FWD_V6_0: V6Rules = LpmTrie::new();
#[btf_map]
pub static CGNAT_FWD_V6_1: V6Rules = LpmTrie::new();

/// Packets per verdict reason (`Counter`).
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// Packets per matching rule id.
#[btf_map]
pub static RULE_HITS: PerCpuArray<u64, { MAX_RULES as usize }> = PerCpuArray::new();

/// The generation to read for this packet. Read once per packet and used for every
/// lookup, so a packet sees one policy whole.
#[inline(always)]
pub fn generation() -> u32 {
    GENERATION.get(0).copied().unwrap_or(0)
}
