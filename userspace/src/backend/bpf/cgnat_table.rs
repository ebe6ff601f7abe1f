//! The CGNAT slot tables (see `tailgate_abi::cgnat`): open addressing with linear probing
//! over an array of slots, each holding a prefix and its rule. Pure code over a slice of
//! slots, so the same functions fill a fresh table, change a mapped one in place, and read
//! one back; `cgnat` maps the tables.

use tailgate_abi::cgnat::{
    key4, key6, next_slot, slot_index, Entry, PrefixRule, Slot4, Slot6, TableSlot, MIN_SLOTS,
};

use super::cgnat::{Prefix, PrefixMap};

/// A slot of one family.
pub trait Slot: TableSlot + Copy + Default + aya::Pod {
    fn new(prefix: &Prefix, rule: PrefixRule) -> Self;
    /// The prefix of an occupied slot.
    fn prefix(&self) -> Prefix;
    /// The hash key of a prefix, as the kernel computes it.
    fn key(prefix: &Prefix) -> u64;
}

impl Slot for Slot4 {
    fn new(prefix: &Prefix, rule: PrefixRule) -> Self {
        let (_, len, addr) = prefix;
        Slot4 {
            addr: u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]),
            entry: Entry::pack(*len as u8, rule),
        }
    }
    fn prefix(&self) -> Prefix {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&self.addr.to_be_bytes());
        (false, u32::from(Entry::len(self.entry)), addr)
    }
    fn key((_, len, addr): &Prefix) -> u64 {
        key4(u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]), *len as u8)
    }
}

impl Slot for Slot6 {
    fn new(prefix: &Prefix, rule: PrefixRule) -> Self {
        let (hi, lo) = halves(&prefix.2);
        Slot6 { hi, lo, entry: Entry::pack(prefix.1 as u8, rule), pad: 0 }
    }
    fn prefix(&self) -> Prefix {
        let mut addr = [0u8; 16];
        addr[..8].copy_from_slice(&self.hi.to_be_bytes());
        addr[8..].copy_from_slice(&self.lo.to_be_bytes());
        (true, u32::from(Entry::len(self.entry)), addr)
    }
    fn key((_, len, addr): &Prefix) -> u64 {
        let (hi, lo) = halves(addr);
        key6(hi, lo, *len as u8)
    }
}

fn halves(addr: &[u8; 16]) -> (u64, u64) {
    let word = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    (word(&addr[..8]), word(&addr[8..]))
}

/// Slots of a table for `count` prefixes: a power of two, at most half full.
pub fn capacity_for(count: usize) -> u32 {
    (count.max(1) * 2).next_power_of_two().max(MIN_SLOTS as usize).min(u32::MAX as usize / 2 + 1) as u32
}

/// Whether a table of `capacity` slots suits `count` prefixes: at most half full, and not
/// more than 8 times too large (a shrunken policy gets a smaller table).
pub fn suits(capacity: u32, count: usize) -> bool {
    let capacity = capacity as usize;
    count * 2 <= capacity && (capacity <= MIN_SLOTS as usize || count * 8 >= capacity)
}

/// log2 of a table's slot count (a power of two): the plan's `Shape::bits`.
pub fn bits<S>(slots: &[S]) -> u32 {
    slots.len().trailing_zeros()
}

fn home<S: Slot>(prefix: &Prefix, slots: &[S]) -> usize {
    slot_index(S::key(prefix), bits(slots)) as usize
}

fn next<S>(i: usize, slots: &[S]) -> usize {
    next_slot(i as u32, bits(slots)) as usize
}

/// Where `prefix` is (`Ok`), else the empty slot where it would go (`Err(Some)`), or
/// `Err(None)` in a full table.
fn position<S: Slot>(slots: &[S], prefix: &Prefix) -> Result<usize, Option<usize>> {
    let mut i = home(prefix, slots);
    for _ in 0..slots.len() {
        let slot = &slots[i];
        if slot.entry() == 0 {
            return Err(Some(i));
        }
        if slot.prefix() == *prefix {
            return Ok(i);
        }
        i = next(i, slots);
    }
    Err(None)
}

/// The rule of `prefix` in the table.
pub fn find<S: Slot>(slots: &[S], prefix: &Prefix) -> Option<PrefixRule> {
    position(slots, prefix).ok().map(|i| Entry::rule(slots[i].entry()))
}

/// Puts `prefix` with `rule` into the table (replacing its rule if present). Returns the
/// probe that finds it (slots from its home to it), `None` when the table is full.
pub fn insert<S: Slot>(slots: &mut [S], prefix: &Prefix, rule: PrefixRule) -> Option<u32> {
    let (Ok(i) | Err(Some(i))) = position(slots, prefix) else { return None };
    slots[i] = S::new(prefix, rule);
    Some(run(i, prefix, slots))
}

/// The probe that finds `prefix` at slot `i`: the slots from its home to `i`.
fn run<S: Slot>(i: usize, prefix: &Prefix, slots: &[S]) -> u32 {
    (i.wrapping_sub(home(prefix, slots)) & (slots.len() - 1)) as u32 + 1
}

/// Takes `prefix` out, moving later slots of its run back so no probe stops early
/// (backward-shift deletion: no tombstones).
pub fn remove<S: Slot>(slots: &mut [S], prefix: &Prefix) -> bool {
    let Ok(mut hole) = position(slots, prefix) else { return false };
    let mut j = hole;
    loop {
        j = next(j, slots);
        if slots[j].entry() == 0 || j == hole {
            break;
        }
        let home = home(&slots[j].prefix(), slots);
        // The slot at `j` may fill the hole when the hole lies on its probe path, i.e.
        // cyclically in [home, j).
        let on_path = if hole <= j { home <= hole || home > j } else { home <= hole && home > j };
        if on_path {
            slots[hole] = slots[j];
            hole = j;
        }
    }
    slots[hole] = S::default();
    true
}

/// The longest probe the table needs: over every prefix, the slots from its home to it.
pub fn longest_run<S: Slot>(slots: &[S]) -> u32 {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.entry() != 0)
        .map(|(i, s)| run(i, &s.prefix(), slots))
        .max()
        .unwrap_or(0)
}

/// Adds `entries` to a table. Returns the longest probe they need (an upper bound of the
/// table's longest run when they are the only changes since it was known), `None` when
/// they do not fit.
pub fn fill<'a, S: Slot>(
    slots: &mut [S],
    entries: impl IntoIterator<Item = (&'a Prefix, &'a PrefixRule)>,
) -> Option<u32> {
    entries
        .into_iter()
        .try_fold(0, |longest, (prefix, rule)| Some(longest.max(insert(slots, prefix, *rule)?)))
}

/// What a table holds.
pub fn read<S: Slot>(slots: &[S]) -> PrefixMap<PrefixRule> {
    slots.iter().filter(|s| s.entry() != 0).map(|s| (s.prefix(), Entry::rule(s.entry()))).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tailgate_abi::verdict;

    use super::*;

    fn v4(len: u32, addr: u32) -> Prefix {
        let mut a = [0u8; 16];
        let masked = if len == 0 { 0 } else { addr & !(u32::MAX.checked_shr(len).unwrap_or(0)) };
        a[..4].copy_from_slice(&masked.to_be_bytes());
        (false, len, a)
    }

    fn rule(id: u32) -> PrefixRule {
        PrefixRule { verdict: if id.is_multiple_of(2) { verdict::PASS } else { verdict::DROP }, rule_id: id }
    }

    /// The kernel's probe: at most `longest` slots from home, stopping at an empty slot.
    fn kernel_probe(slots: &[Slot4], prefix: &Prefix, longest: u32) -> Option<PrefixRule> {
        let (_, len, addr) = prefix;
        let masked = u32::from_be_bytes([addr[0], addr[1], addr[2], addr[3]]);
        let mut i = slot_index(key4(masked, *len as u8), bits(slots));
        for _ in 0..longest {
            let s = slots[i as usize];
            if s.entry == 0 {
                return None;
            }
            if s.addr == masked && u32::from(Entry::len(s.entry)) == *len {
                return Some(Entry::rule(s.entry));
            }
            i = next_slot(i, bits(slots));
        }
        None
    }

    proptest! {
        /// Any sequence of inserts and removals leaves a table whose every prefix the
        /// kernel's bounded probe finds, and which holds exactly what a map would.
        #[test]
        fn table_is_a_map(ops in prop::collection::vec((any::<bool>(), 8u32..=32, 0u32..4096, 0u32..1000), 1..400)) {
            let mut slots = vec![Slot4::default(); capacity_for(200) as usize];
            let mut want = PrefixMap::default();
            for (add, len, addr, id) in ops {
                // Few distinct addresses, so removals hit and runs form.
                let prefix = v4(len, 0x6440_0000 | (addr << 8));
                if add && want.len() < 200 {
                    prop_assert!(insert(&mut slots, &prefix, rule(id)).is_some());
                    want.insert(prefix, rule(id));
                } else {
                    prop_assert_eq!(remove(&mut slots, &prefix), want.remove(&prefix).is_some());
                }
            }
            prop_assert_eq!(read(&slots), want.clone());
            let longest = longest_run(&slots);
            for (prefix, r) in &want {
                prop_assert_eq!(kernel_probe(&slots, prefix, longest), Some(*r));
            }
            prop_assert_eq!(kernel_probe(&slots, &v4(32, 0x0a00_0001), longest), None);
        }
    }

    #[test]
    fn consecutive_prefixes_spread() {
        // 100,000 consecutive /28s, as a large exemption list has them.
        let entries: PrefixMap<PrefixRule> =
            (0..100_000u32).map(|i| (v4(28, 0x6440_0000 + (i << 4)), rule(i))).collect();
        let mut slots = vec![Slot4::default(); capacity_for(entries.len()) as usize];
        let longest = fill(&mut slots, &entries).unwrap();
        assert_eq!(longest, longest_run(&slots));
        assert!(longest <= tailgate_abi::cgnat::MAX_PROBE, "run {longest}");
        assert_eq!(read(&slots), entries);
    }

    #[test]
    fn sizes() {
        assert_eq!(capacity_for(0), MIN_SLOTS);
        assert_eq!(capacity_for(100_000), 262_144);
        assert!(suits(262_144, 100_000));
        assert!(!suits(262_144, 200_000));
        assert!(!suits(262_144, 1_000));
        assert!(suits(MIN_SLOTS, 0));
        assert_eq!(bits(&[Slot4::default(); 64]), 6);
    }
}
