//! Every map of the datapath. Names, keys and values come from `tailgate_abi`.

use aya_ebpf::{
    btf_maps::{LpmTrie, PerCpuArray},
    macros::btf_map,
};
use tailgate_abi::{
    cgnat::{PrefixRule, V4Addr, V6Addr, MAX_PREFIXES},
    counters::Counter,
    MAX_RULES,
};

/// Source rules for packets entering an uplink.
#[btf_map]
pub static CGNAT_IN_V4: LpmTrie<V4Addr, PrefixRule, { MAX_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
pub static CGNAT_IN_V6: LpmTrie<V6Addr, PrefixRule, { MAX_PREFIXES as usize }> = LpmTrie::new();

/// Source rules for packets forwarded into the tunnel.
#[btf_map]
pub static CGNAT_FWD_V4: LpmTrie<V4Addr, PrefixRule, { MAX_PREFIXES as usize }> = LpmTrie::new();
#[btf_map]
pub static CGNAT_FWD_V6: LpmTrie<V6Addr, PrefixRule, { MAX_PREFIXES as usize }> = LpmTrie::new();

/// Packets per verdict reason (`Counter`).
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// Packets per matching rule id.
#[btf_map]
pub static RULE_HITS: PerCpuArray<u64, { MAX_RULES as usize }> = PerCpuArray::new();
