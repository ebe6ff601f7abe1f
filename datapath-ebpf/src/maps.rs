//! Every map of the datapath. Names, keys and values come from `tailgate_abi`.

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, PerCpuArray},
    macros::btf_map,
    Global,
};
use tailgate_abi::{
    cgnat::{Plan, PrefixRule, V4Key, V6Key, HASH_FLAGS, MAX_PREFIXES},
    counters::Counter,
    settings::Settings,
    MAX_RULES,
};

/// See `tailgate_abi::globals::TUNNEL_L3_OFFSET`.
#[unsafe(no_mangle)]
pub static TUNNEL_L3_OFFSET: Global<u32> = Global::new(0);

/// The layout version of the pinned maps (`tailgate_abi::layout`); only userspace reads it.
#[btf_map]
pub static LAYOUT: Array<u32, 1> = Array::new();

/// Stage parameters per generation (`tailgate_abi::settings`).
#[btf_map]
pub static SETTINGS: Array<Settings, 2> = Array::new();

/// Which policy generation the programs read (slot 0: 0 or 1). See `tailgate_abi::generation`.
#[btf_map]
pub static GENERATION: Array<u32, 1> = Array::new();

/// Only written by userspace, to wait for running programs after a generation flip.
#[btf_map]
pub static GEN_BARRIER: ArrayOfMaps<Array<u32, 1>, 1> = ArrayOfMaps::new();

/// The prefix rules; keys start with the generation and prefix length (see
/// `tailgate_abi::cgnat`).
pub type V4Rules = HashMap<V4Key, PrefixRule, { MAX_PREFIXES as usize }, { HASH_FLAGS as usize }>;
pub type V6Rules = HashMap<V6Key, PrefixRule, { MAX_PREFIXES as usize }, { HASH_FLAGS as usize }>;

/// How to look up the prefix rules, per direction and generation (`cgnat::plan_index`).
#[btf_map]
pub static CGNAT_PLAN: Array<Plan, 4> = Array::new();

/// Source rules for packets entering an uplink.
#[btf_map]
pub static CGNAT_IN4: V4Rules = HashMap::new();
#[btf_map]
pub static CGNAT_IN6: V6Rules = HashMap::new();

/// Source rules for packets forwarded into the tunnel.
#[btf_map]
pub static CGNAT_FWD4: V4Rules = HashMap::new();
#[btf_map]
pub static CGNAT_FWD6: V6Rules = HashMap::new();

/// Packets per verdict reason (`Counter`).
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// Packets per matching rule id.
#[btf_map]
pub static RULE_HITS: PerCpuArray<u64, { MAX_RULES as usize }> = PerCpuArray::new();

/// The generation to read for this packet. Read once per packet and put into every key, so
/// a packet sees one policy whole.
#[inline(always)]
pub fn generation() -> u8 {
    GENERATION.get(0).copied().unwrap_or(0) as u8
}

/// The stage parameters of `generation`; all stages off if unreadable.
#[inline(always)]
pub fn settings(generation: u8) -> Settings {
    SETTINGS.get(u32::from(generation)).copied().unwrap_or_default()
}
