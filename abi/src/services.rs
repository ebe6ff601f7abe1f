//! Services: DNAT load balancing of a virtual address and port (the VIP) over backends, with
//! Maglev consistent hashing.
//!
//! - [`MAP_SERVICES`]: the services of both policy generations (the generation is part of
//!   the key), each naming its lookup table;
//! - [`MAP_TABLES`]: an array of maps; slot `Service::table` holds the service's Maglev table
//!   (a prime number of slots, each a backend id; two per array element, `[u32; 2]`: the
//!   kernel stores array elements 8 bytes apart, so 4 bytes per slot). A changed service
//!   gets a new table in a free slot and the new generation points to it: no packet sees a
//!   half-written table;
//! - [`MAP_BACKENDS`]: backend id → address and port. Ids outlive table changes; an id is
//!   cleared only once no generation uses it, and a flow whose backend id is cleared (or
//!   names another address) is balanced again.
//!
//! A flow to a VIP is recorded in the flow table twice (`crate::conntrack`): in zone
//! [`crate::conntrack::zone::DNAT`] under its original tuple (client → VIP) with the backend
//! in `Flow::nat`, so it keeps its backend across table changes; and in zone
//! [`crate::conntrack::zone::DNAT_REPLY`] under the translated tuple (client → backend) with
//! the VIP in `Flow::nat`, so a reply (backend → client) is translated back.

/// `HashMap<ServiceKey, Service>`.
pub const MAP_SERVICES: &str = "SERVICES";
/// `ArrayOfMaps<Array<u32>>`, [`MAX_TABLES`] slots.
pub const MAP_TABLES: &str = "SERVICE_TABLES";
/// `Array<Backend>`, [`MAX_BACKENDS`] entries; id 0 is never used.
pub const MAP_BACKENDS: &str = "BACKENDS";

/// Services per policy (keys of one generation).
pub const MAX_SERVICES: u32 = 16_384;
/// Table slots: every service's table of both generations when each changed.
pub const MAX_TABLES: u32 = 2 * MAX_SERVICES;
/// Backend ids (all services together), 0 excluded.
pub const MAX_BACKENDS: u32 = 65_536;
/// Flags of the tables (inner maps): their sizes differ, and the daemon fills a table
/// through a memory mapping.
pub const TABLE_FLAGS: u32 = crate::cgnat::TABLE_FLAGS;

/// Bounds of a table's size (prime). A table needs many slots per backend for even shares
/// and small disruption (Maglev's paper: ≥ 100).
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;
pub const MIN_TABLE_SIZE: u32 = 251;
pub const MAX_TABLE_SIZE: u32 = 1_048_573;

/// Address families as in `Backend::family` and `ServiceKey::family`.
pub mod family {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}

/// A service as packets address it. IPv4 addresses fill the first 4 bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    /// The policy generation this entry belongs to.
    pub generation: u8,
    /// Where the entry applies ([`scope`]).
    pub scope: u8,
    pub pad: [u8; 2],
}

/// Where a service entry applies (`ServiceKey::scope`).
pub mod scope {
    /// Wherever its address is reached: the tunnel and the uplinks (services, the ingress
    /// proxy).
    pub const ANY: u8 = 0;
    /// Only for traffic arriving on an uplink (the egress proxy: "arriving elsewhere").
    pub const UPLINKS: u8 = 1;
}

/// Where a service's table is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Slot of [`MAP_TABLES`].
    pub table: u32,
    /// Entries of that table (prime).
    pub size: u32,
    /// What the table was built from (size, backends, weights): the daemon reuses a table
    /// whose digest matches. Not read by the programs.
    pub digest: u64,
}

/// A backend, and the service it was allocated for (read back by the daemon after a restart
/// to keep ids stable).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port: u16,
    /// [`family`]; 0: the id is free.
    pub family: u8,
    pub pad: u8,
    pub service: ServiceKey,
}

/// The hash of a flow's tuple that picks its table slot: a fixed function (MurmurHash3's
/// 32-bit mixing over the tuple's words, fixed seed), so every gateway picks the same
/// backend for the same flow — never the kernel's skb hash, which is random per boot.
/// `words`: the source address, then the destination address (IPv4: one word each), then
/// `(sport << 16) | dport`, then the protocol.
#[inline(always)]
pub const fn flow_hash4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = SEED;
    h = mix(h, src);
    h = mix(h, dst);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 16)
}

/// [`flow_hash4`] for IPv6: four words per address.
#[inline(always)]
pub const fn flow_hash6(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = SEED;
    h = mix(h, src[0]);
    h = mix(h, src[1]);
    h = mix(h, src[2]);
    h = mix(h, src[3]);
    h = mix(h, dst[0]);
    h = mix(h, dst[1]);
    h = mix(h, dst[2]);
    h = mix(h, dst[3]);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 40)
}

const SEED: u32 = 0x7461_696c; // "tail"

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(h: u32, len: u32) -> u32 {
    let mut h = h ^ len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 24);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(size_of::<Backend>(), 44);
    }

    #[test]
    fn the_flow_hash_is_fixed() {
        // Pinned: every gateway (and every version) must pick the same slot.
        assert_eq!(
            flow_hash4(0x6465_0203, 0x6465_6667, 40000, 80, 6),
            flow_hash4(0x6465_0203, 0x6465_6667, 40000, 80, 6)
        );
        assert_ne!(
            flow_hash4(0x6465_0203, 0x6465_6667, 40000, 80, 6),
            flow_hash4(0x6465_0203, 0x6465_6667, 40001, 80, 6)
        );
        assert_eq!(flow_hash4(0x6465_0203, 0x6465_6667, 40000, 80, 6), PINNED4);
        assert_eq!(
            flow_hash6([0xfd7a_115c, 0xa1e0, 0, 3], [0xfd7a_115c, 0xa1e0, 0, 0x99], 40000, 80, 6),
            PINNED6
        );
    }

    const PINNED4: u32 = 2_015_832_320;
    const PINNED6: u32 = 3_857_759_398;

    #[test]
    fn flows_spread_evenly() {
        // 100,000 client ports over 7 buckets: each within 3 % of its share.
        let mut buckets = [0u32; 7];
        for port in 0..100_000u32 {
            let h = flow_hash4(0x6465_0203 + port / 60_000, 0x6465_6667, (port % 60_000) as u16, 80, 6);
            buckets[(h % 7) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 - 100_000.0 / 7.0).abs() < 0.03 * 100_000.0 / 7.0, "{buckets:?}");
        }
    }
}
