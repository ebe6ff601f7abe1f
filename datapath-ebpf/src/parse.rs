//! One bounds-checked walk of the headers, shared by every concern.

use core::mem::size_of;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags we look through (802.1ad outer + 802.1Q inner).
const MAX_VLAN_TAGS: usize = 2;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;

/// What the programs need to know about a packet.
pub enum Packet {
    V4 {
        src: [u8; 4],
    },
    V6 {
        src: [u8; 16],
    },
    /// A frame that is not IPv4/IPv6 (ARP, LLDP, ...).
    NotIp,
    /// Too short or malformed to classify; the IP stack discards these itself.
    Malformed,
}

/// Parses an Ethernet frame (optionally VLAN-tagged) starting at `data`.
#[inline(always)]
pub fn ethernet(data: usize, data_end: usize) -> Packet {
    if data + ETH_HLEN > data_end {
        return Packet::Malformed;
    }
    let mut ethertype = read_be16(data + 12);
    let mut l3 = data + ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        if l3 + VLAN_HLEN > data_end {
            return Packet::Malformed;
        }
        ethertype = read_be16(l3 + 2);
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => ipv4(l3, data_end),
        ETH_P_IPV6 => ipv6(l3, data_end),
        _ => Packet::NotIp,
    }
}

/// Parses an IPv4 header at `l3`. Options do not move the source address; fragments carry
/// it in every fragment, so both get the same verdict as a plain packet.
#[inline(always)]
fn ipv4(l3: usize, data_end: usize) -> Packet {
    if l3 + IPV4_HLEN > data_end {
        return Packet::Malformed;
    }
    // SAFETY: bounds checked above.
    let ver_ihl = unsafe { *(l3 as *const u8) };
    if ver_ihl >> 4 != 4 || ver_ihl & 0x0f < 5 {
        return Packet::Malformed;
    }
    Packet::V4 { src: read::<[u8; 4]>(l3 + 12) }
}

/// Parses an IPv6 header at `l3`. Extension headers do not move the source address.
#[inline(always)]
fn ipv6(l3: usize, data_end: usize) -> Packet {
    if l3 + IPV6_HLEN > data_end {
        return Packet::Malformed;
    }
    // SAFETY: bounds checked above.
    let version = unsafe { *(l3 as *const u8) } >> 4;
    if version != 6 {
        return Packet::Malformed;
    }
    Packet::V6 { src: read::<[u8; 16]>(l3 + 8) }
}

/// Callers have checked `addr + size_of::<T>() <= data_end`.
#[inline(always)]
fn read<T: Copy>(addr: usize) -> T {
    debug_assert!(size_of::<T>() <= IPV6_HLEN);
    // SAFETY: bounds checked by the caller; unaligned because packets are.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

#[inline(always)]
fn read_be16(addr: usize) -> u16 {
    u16::from_be(read::<u16>(addr))
}
