//! What a stage tells its entry point to do with a packet. Stages only decide; the entry
//! point applies rewrites, counts and returns the verdict, each in one place.

use tailgate_abi::counters::Counter;

/// A filtering stage's answer.
pub enum Verdict {
    /// Let it through; the reason is counted if no later stage drops it.
    Pass(Counter),
    Drop(Counter),
}

/// A change to make to the packet.
pub enum Rewrite {
    /// Set the skb mark to this value.
    Mark(u32),
    /// Replace the 16-bit MSS value at `at` (offset from the packet start; `old` as read,
    /// network order) with `new`; `check` is the TCP checksum's offset (an even distance
    /// from the header start, so `at - check` tells the value's alignment).
    Mss { at: usize, check: usize, old: u16, new: u16 },
}
