//! MSS clamping of TCP SYN and SYN-ACK crossing the tunnel, as `xt_TCPMSS` does: only ever
//! lowers, only the first MSS option, never a packet with RST, a non-SYN or a fragment. The
//! options are walked with bounds-checked loads; anything odd (zero or overlong option
//! length, options cut by the packet end) leaves the packet as it was. A SYN without an MSS
//! option is left too: the peer then assumes 536 (IPv4) or 1220 (IPv6); growing the header
//! to add one, as xt_TCPMSS does, is not worth it (see the README on the difference).

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use tailgate_abi::{
    counters::Counter,
    settings::{stage, Settings},
};

use crate::{
    parse::{tcp_flag, Ip, Packet, IPPROTO_TCP, TCP_CHECK, TCP_HLEN},
    stage::Rewrite,
};

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOLEN_MSS: usize = 4;
/// Options walked before giving up (leaving the packet as it is). Every SYN seen in practice
/// has at most six (MSS first on Linux, BSD and Windows); NOP padding counts as one each.
/// The bound keeps the walk within what the verifier accepts.
const MAX_OPTIONS: usize = 12;

/// What the clamp does with a packet.
pub enum Clamp {
    /// Not a SYN through a clamp, or the MSS is already low enough.
    Untouched,
    /// The options could not be walked safely.
    BadOptions(Counter),
    Lower(Rewrite),
}

/// Whether `packet` is one the clamp looks at: a TCP SYN (or SYN-ACK) without RST, not a
/// fragment. Every other packet skips the stage without reading its settings.
#[inline(always)]
pub fn applies(packet: &Packet) -> bool {
    packet.proto == IPPROTO_TCP
        && !packet.fragment
        && packet.l4.is_some_and(|l4| l4.tcp_flags & (tcp_flag::SYN | tcp_flag::RST) == tcp_flag::SYN)
}

/// The clamp for `packet`, a segment `applies` accepted.
#[inline(always)]
pub fn clamp(ctx: &TcContext, packet: &Packet, settings: &Settings) -> Clamp {
    if settings.stages & stage::MSS == 0 || !applies(packet) {
        return Clamp::Untouched;
    }
    let Some(l4) = packet.l4 else { return Clamp::Untouched };
    let limit = match packet.ip {
        Ip::V4 { .. } => settings.mss_v4,
        Ip::V6 { .. } => settings.mss_v6,
    };
    let (offset, tcp_len) = (usize::from(l4.offset), usize::from(l4.tcp_len));
    if tcp_len < TCP_HLEN || offset + tcp_len > ctx.len() as usize {
        return Clamp::BadOptions(Counter::MssBadOptions);
    }
    let end = offset + tcp_len;
    // SAFETY: the context pointer is valid for the program's run.
    let found = tg_mss_option(ctx.skb.skb, (offset + TCP_HLEN) as u32, end as u32);
    match (found >> 32) as u8 {
        FOUND => {
            let (at, old) = ((found >> 16) as u16, found as u16);
            if u16::from_be(old) <= limit {
                return Clamp::Untouched;
            }
            Clamp::Lower(Rewrite::Mss {
                at: usize::from(at),
                check: offset + TCP_CHECK,
                old,
                new: limit.to_be(),
            })
        }
        BAD => Clamp::BadOptions(Counter::MssBadOptions),
        _ => Clamp::Untouched,
    }
}

/// Outcomes of [`tg_mss_option`] (bits 32..40 of its result).
const NONE: u8 = 0;
const FOUND: u8 = 1;
const BAD: u8 = 2;

/// Walks the TCP options in `[start, end)` for the first MSS option: `FOUND << 32 | at << 16 |
/// value` (`at`: the value's offset, `value` as read, network order), `NONE << 32` when
/// there is none, `BAD << 32` when the options cannot be walked safely.
///
/// A global function (kept global by bpf-linker's `--export`, see `userspace/build.rs`):
/// the verifier checks its loop once, on its own, instead of once for every path of the
/// program that leads here.
#[unsafe(no_mangle)]
pub extern "C" fn tg_mss_option(skb: *mut __sk_buff, start: u32, end: u32) -> u64 {
    let ctx = TcContext::new(skb);
    let bad = u64::from(BAD) << 32;
    let (mut at, end) = (start as usize, end as usize);
    for _ in 0..MAX_OPTIONS {
        if at >= end {
            // Options end at the header end: no MSS option.
            return u64::from(NONE) << 32;
        }
        let Ok(kind) = ctx.load::<u8>(at) else { return bad };
        if kind == TCPOPT_EOL {
            return u64::from(NONE) << 32;
        }
        let len = if kind == TCPOPT_NOP {
            1
        } else {
            if at + 2 > end {
                return bad;
            }
            let Ok(len) = ctx.load::<u8>(at + 1) else { return bad };
            let len = usize::from(len);
            if len < 2 || at + len > end {
                return bad;
            }
            len
        };
        if kind == TCPOPT_MSS && len == TCPOLEN_MSS {
            let Ok(value) = ctx.load::<u16>(at + 2) else { return bad };
            return (u64::from(FOUND) << 32) | (((at + 2) as u64 & 0xffff) << 16) | u64::from(value);
        }
        at += len;
    }
    // More options than walked: leave it (an MSS option, if any, came later than any stack
    // puts it).
    bad
}
