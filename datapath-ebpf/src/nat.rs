//! Applying the NAT engine's rewrites (`stage::NatRewrite`, `stage::ErrorRewrite`) with the
//! kernel's checksum helpers, which keep checksums right with offload (CHECKSUM_PARTIAL)
//! too. (The IPv6 address difference is computed inline in both: a shared helper taking the
//! addresses by value made LLVM copy them on every path, misses included — measured at
//! ~+100 ns on the egress program's miss path.)

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};

use crate::{
    parse,
    stage::{Addr, ErrorRewrite, NatRewrite},
};

/// Rewrites an address and port, updating the checksums incrementally with the helpers
/// (right with checksum offload too): the address is part of the transport checksum's
/// pseudo-header, the port part of the transport header; a UDP checksum of 0 ("none")
/// stays 0.
#[inline(always)]
pub fn translate(ctx: &TcContext, nat: &NatRewrite) -> bool {
    let (check, zero) = match nat.proto {
        parse::IPPROTO_TCP => (nat.l4 + 16, 0),
        parse::IPPROTO_UDP => (nat.l4 + 6, BPF_F_MARK_MANGLED_0 as u64),
        // ICMP echo: the checksum is at 2.
        _ => (nat.l4 + 2, 0),
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | zero;
    // ICMPv4's checksum covers no pseudo-header.
    let in_l4 = nat.proto != parse::IPPROTO_ICMP;
    let port_at = match nat.proto {
        parse::IPPROTO_TCP | parse::IPPROTO_UDP if nat.source => nat.l4,
        parse::IPPROTO_TCP | parse::IPPROTO_UDP => nat.l4 + 2,
        // An echo's identifier (the ingress proxy keeps it, the masquerade may change it).
        _ => nat.l4 + 4,
    };
    let addresses = match (nat.from, nat.to) {
        (Addr::V4(from), Addr::V4(to)) => {
            let at = nat.l3 + if nat.source { 12 } else { 16 };
            let (old, new) = (u64::from(u32::from_ne_bytes(from)), u64::from(u32::from_ne_bytes(to)));
            (!in_l4 || ctx.l4_csum_replace(check, old, new, pseudo | 4).is_ok())
                && ctx.l3_csum_replace(nat.l3 + 10, old, new, 4).is_ok()
                && ctx.store(at, &to, 0).is_ok()
        }
        (Addr::V6(mut from), Addr::V6(mut to)) => {
            let at = nat.l3 + if nat.source { 8 } else { 24 };
            // SAFETY: two 16-byte locals.
            let diff = unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
            diff >= 0
                && ctx.l4_csum_replace(check, 0, diff as u64, pseudo).is_ok()
                && ctx.store(at, &to, 0).is_ok()
        }
        _ => false,
    };
    let (old, new) = (nat.from_port.to_be(), nat.to_port.to_be());
    addresses
        && (old == new
            || (ctx.l4_csum_replace(check, u64::from(old), u64::from(new), zero | 2).is_ok()
                && ctx.store(port_at, &new, 0).is_ok()))
}

/// Translates an ICMP error back (see `icmp_error::reverse`). Every changed field in
/// the quoted packet is also a change to the error's checksum, applied field by field;
/// the quoted IPv4 header keeps summing to its checksum, so its own changes cancel out
/// there. (Fields of the quote are at even offsets from the error's header: no byte
/// swapping.)
#[inline(always)]
pub fn translate_error(ctx: &TcContext, e: &ErrorRewrite) -> bool {
    let icmp_check = e.icmp + 2;
    // A 16-bit field of the quote changes from `old` to `new`: the error's checksum too.
    let field = |at: usize, old: u16, new: u16| {
        ctx.store(at, &new, 0).is_ok()
            && ctx.l3_csum_replace(icmp_check, u64::from(old), u64::from(new), 2).is_ok()
    };
    let inner_check = |change: fn(&TcContext, usize, u64, u64) -> bool, old: u64, new: u64| {
        quoted_check(ctx, e, icmp_check, change, old, new)
    };
    // The quote's end, and the error's address on the other side (the quote travelled the
    // other way).
    let source = e.quoted_source;
    let addresses = match (e.from, e.to) {
        (Addr::V4(from), Addr::V4(to)) => {
            let (old, new) = (u64::from(u32::from_ne_bytes(from)), u64::from(u32::from_ne_bytes(to)));
            let (inner, outer) = if source { (12, 16) } else { (16, 12) };
            ctx.store(e.inner_l3 + inner, &to, 0).is_ok()
                && ctx.l3_csum_replace(e.inner_l3 + 10, old, new, 4).is_ok()
                && inner_check(replace4, old, new)
                && (!e.outer
                    || (ctx.store(e.l3 + outer, &to, 0).is_ok()
                        && ctx.l3_csum_replace(e.l3 + 10, old, new, 4).is_ok()))
        }
        (Addr::V6(mut from), Addr::V6(mut to)) => {
            let (inner, outer) = if source { (8, 24) } else { (24, 8) };
            // SAFETY: two 16-byte locals.
            let diff = unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
            diff >= 0
                && ctx.store(e.inner_l3 + inner, &to, 0).is_ok()
                && ctx.l4_csum_replace(icmp_check, 0, diff as u64, 0).is_ok()
                && inner_check(replace_by_diff, 0, diff as u64)
                // The error's addresses are in its checksum's pseudo-header.
                && (!e.outer
                    || (ctx.store(e.l3 + outer, &to, 0).is_ok()
                        && ctx.l4_csum_replace(icmp_check, 0, diff as u64, BPF_F_PSEUDO_HDR as u64).is_ok()))
        }
        _ => false,
    };
    let (old, new) = (e.from_port.to_be(), e.to_port.to_be());
    let port_at = if source { e.inner_l4 } else { e.inner_l4 + 2 };
    addresses
        && (old == new || (field(port_at, old, new) && inner_check(replace2, u64::from(old), u64::from(new))))
}

/// The quoted transport checksum changed by `change(at, old, new)`, and the error's
/// checksum by what that did to the field. Nothing when the quote holds none.
#[inline(always)]
fn quoted_check(
    ctx: &TcContext,
    e: &ErrorRewrite,
    icmp_check: usize,
    change: fn(&TcContext, usize, u64, u64) -> bool,
    old: u64,
    new: u64,
) -> bool {
    if e.inner_check == 0 {
        return true;
    }
    let Ok(before) = ctx.load::<u16>(e.inner_check) else { return false };
    if !change(ctx, e.inner_check, old, new) {
        return false;
    }
    let Ok(after) = ctx.load::<u16>(e.inner_check) else { return false };
    ctx.l3_csum_replace(icmp_check, u64::from(before), u64::from(after), 2).is_ok()
}

#[inline(always)]
fn replace4(ctx: &TcContext, at: usize, old: u64, new: u64) -> bool {
    ctx.l3_csum_replace(at, old, new, 4).is_ok()
}

#[inline(always)]
fn replace2(ctx: &TcContext, at: usize, old: u64, new: u64) -> bool {
    ctx.l3_csum_replace(at, old, new, 2).is_ok()
}

#[inline(always)]
fn replace_by_diff(ctx: &TcContext, at: usize, _: u64, diff: u64) -> bool {
    ctx.l4_csum_replace(at, 0, diff, 0).is_ok()
}
