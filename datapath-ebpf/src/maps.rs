//! Every map of the datapath. Names, keys and values come from `tailgate_abi`.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
    Global,
};
use tailgate_abi::{
    cgnat::{Plan, Slot4, Slot6, TABLE_FLAGS},
    conntrack::{Flow, FlowKey4, FlowKey6, Nat, DEFAULT_ENTRIES_V4, DEFAULT_ENTRIES_V6, FRAG_ENTRIES},
    counters::Counter,
    services::{self, Backend, Service, ServiceKey, MAX_BACKENDS, MAX_SERVICES, MAX_TABLES},
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

/// The prefix tables of both generations (index = generation); each inner map is sized to
/// its policy by the daemon (see `tailgate_abi::cgnat`).
pub type V4Tables = ArrayOfMaps<Array<Slot4, 1, { TABLE_FLAGS as usize }>, 2>;
pub type V6Tables = ArrayOfMaps<Array<Slot6, 1, { TABLE_FLAGS as usize }>, 2>;

/// How to look up the prefix rules, per direction and generation (`cgnat::plan_index`).
#[btf_map]
pub static CGNAT_PLAN: Array<Plan, 4> = Array::new();

/// Source rules for packets entering an uplink.
#[btf_map]
pub static CGNAT_IN4: V4Tables = ArrayOfMaps::new();
#[btf_map]
pub static CGNAT_IN6: V6Tables = ArrayOfMaps::new();

/// Source rules for packets forwarded into the tunnel.
#[btf_map]
pub static CGNAT_FWD4: V4Tables = ArrayOfMaps::new();
#[btf_map]
pub static CGNAT_FWD6: V6Tables = ArrayOfMaps::new();

/// The flow tables (`tailgate_abi::conntrack`); the daemon sets their capacity at load.
#[btf_map]
pub static FLOWS4: LruHashMap<FlowKey4, Flow, { DEFAULT_ENTRIES_V4 as usize }> = LruHashMap::new();
#[btf_map]
pub static FLOWS6: LruHashMap<FlowKey6, Flow, { DEFAULT_ENTRIES_V6 as usize }> = LruHashMap::new();

/// Fragmented datagrams of flows (`tailgate_abi::conntrack::MAP_FRAGS_V4`).
#[btf_map]
pub static FRAGS4: LruHashMap<FlowKey4, u64, { FRAG_ENTRIES as usize }> = LruHashMap::new();
#[btf_map]
pub static FRAGS6: LruHashMap<FlowKey6, u64, { FRAG_ENTRIES as usize }> = LruHashMap::new();

/// Services of both generations (`tailgate_abi::services`).
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, { 2 * MAX_SERVICES as usize }> = HashMap::new();

/// The services' Maglev tables, each sized to its service by the daemon: two slots (backend
/// ids) per element (the kernel stores array elements 8 bytes apart).
#[btf_map]
pub static SERVICE_TABLES: ArrayOfMaps<
    Array<[u32; 2], 1, { services::TABLE_FLAGS as usize }>,
    { MAX_TABLES as usize },
> = ArrayOfMaps::new();

/// Backend id → address and port.
#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// Per-CPU room for what the service stage builds of one packet (keys, entries): more than
/// the 512 bytes of stack a call chain has next to the parse. `services::Room<K>` per
/// family, spelled out (BTF names cannot carry generic parameters).
macro_rules! scratch {
    ($name:ident, $key:ty) => {
        #[repr(C)]
        pub struct $name {
            pub key: $key,
            pub reply: $key,
            pub flow: Flow,
            pub reply_flow: Flow,
            pub nat: Nat,
            pub vip: Nat,
            pub service: ServiceKey,
            pub fib: bpf_fib_lookup,
        }
    };
}
scratch!(Scratch4, FlowKey4);
scratch!(Scratch6, FlowKey6);

#[btf_map]
pub static SCRATCH4: PerCpuArray<Scratch4, 1> = PerCpuArray::new();
#[btf_map]
pub static SCRATCH6: PerCpuArray<Scratch6, 1> = PerCpuArray::new();

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

/// The stage parameters of `generation`; all stages off if unreadable. (The map value
/// itself: a copy would take stack the NAT programs have not.)
#[inline(always)]
pub fn settings(generation: u8) -> &'static Settings {
    SETTINGS.get(u32::from(generation)).unwrap_or(&Settings::OFF)
}
