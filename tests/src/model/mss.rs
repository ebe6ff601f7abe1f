//! MSS clamping as the README states it: TCP SYN and SYN-ACK (no RST, not a fragment) whose
//! first MSS option is above the limit get the limit, the TCP checksum adjusted; options that
//! cannot be walked (a zero or overlong length, cut by the header's end, more than twelve)
//! leave the packet and count as bad options; no option, nothing to do.

use super::packet::{Ip, TCP};

/// What the clamp does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clamp {
    Untouched,
    BadOptions,
    /// The frame with the MSS lowered.
    Lowered(Vec<u8>),
}

/// Whether the clamp looks at `p` at all.
pub fn applies(p: &Ip) -> bool {
    p.proto == TCP && !p.fragment && p.ports.is_some_and(|t| t.flags & 0x06 == 0x02)
}

/// The clamp of `p` in `f` with `limit` (`None`: no clamp configured).
pub fn clamp(p: &Ip, f: &[u8], limit: Option<u16>) -> Clamp {
    let (Some(limit), Some(tcp)) = (limit, p.ports) else { return Clamp::Untouched };
    if !applies(p) {
        return Clamp::Untouched;
    }
    if tcp.tcp_len < 20 || tcp.at + tcp.tcp_len > f.len() {
        return Clamp::BadOptions;
    }
    let end = tcp.at + tcp.tcp_len;
    let mut at = tcp.at + 20;
    for _ in 0..12 {
        if at >= end || f[at] == 0 {
            return Clamp::Untouched;
        }
        let len = if f[at] == 1 {
            1
        } else {
            f.get(at + 1).filter(|_| at + 2 <= end).map_or(0, |&l| usize::from(l))
        };
        if len == 0 || (f[at] != 1 && (len < 2 || at + len > end)) {
            return Clamp::BadOptions;
        }
        if f[at] == 2 && len == 4 {
            let mss = u16::from_be_bytes([f[at + 2], f[at + 3]]);
            if mss <= limit {
                return Clamp::Untouched;
            }
            let mut out = f.to_vec();
            out[at + 2..at + 4].copy_from_slice(&limit.to_be_bytes());
            let check = tcp.at + 16;
            let old = u16::from_be_bytes([f[check], f[check + 1]]);
            let new = adjusted(old, &f[tcp.at..end], &out[tcp.at..end], at + 2 - tcp.at);
            out[check..check + 2].copy_from_slice(&new.to_be_bytes());
            return Clamp::Lowered(out);
        }
        at += len;
    }
    Clamp::BadOptions
}

/// The TCP checksum after the two bytes at `at` (from the header start) changed from
/// `before` to `after` (RFC 1624: HC' = ~(~HC + ~m + m'), over the 16-bit words they touch,
/// the result folded as the kernel's csum_fold: a zero sum is written as 0).
fn adjusted(check: u16, before: &[u8], after: &[u8], at: usize) -> u16 {
    let words = |b: &[u8]| -> u64 {
        let first = at & !1;
        let last = (at + 1) & !1;
        let word = |i: usize| u64::from(u16::from_be_bytes([b[i], *b.get(i + 1).unwrap_or(&0)]));
        if first == last {
            word(first)
        } else {
            word(first) + word(last)
        }
    };
    // Sums mod 0xffff: one's complement addition.
    let m = words(before) % 0xffff;
    let m2 = words(after) % 0xffff;
    let total = (u64::from(!check) + (0xffff - m) + m2) % 0xffff;
    if total == 0 {
        0
    } else {
        !(total as u16)
    }
}
