//! Per-CPU packet counters: plain increments, no atomics, no contention.

use tailgate_abi::counters::Counter;

use crate::maps::{COUNTERS, RULE_HITS};

#[inline(always)]
pub fn count(counter: Counter) {
    bump(COUNTERS.get_ptr_mut(counter as u32));
}

#[inline(always)]
pub fn count_rule(rule_id: u32) {
    bump(RULE_HITS.get_ptr_mut(rule_id));
}

#[inline(always)]
fn bump(slot: Option<*mut u64>) {
    if let Some(slot) = slot {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}
