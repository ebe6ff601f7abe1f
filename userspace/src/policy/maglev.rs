//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights: a lookup table of a
//! prime size `M` whose slots name backends, so that a flow (hashed into a slot) keeps its
//! backend when others come or go, with few slots changing owner.
//!
//! Each backend walks its own permutation of the slots (`offset + j * skip mod M`, both from
//! hashes of its identity) and takes the next free slot on each of its turns. Turns are
//! dealt by smooth weighted round robin (each backend gains its weight, the one ahead takes
//! the turn and pays the total), which keeps every backend's count within one turn of its
//! exact share at every step — so within one slot of `M · weight / total` when the table is
//! full (Katran's `MaglevHashV2` credit scheme can end a slot further off). Backends are ordered by identity
//! first, so the table does not depend on the order they were listed in; the hashes are
//! fixed functions of the identity (FNV-1a then a SplitMix64 finaliser, two fixed seeds),
//! so every gateway with the same backends builds the same table.

/// The default table size: a prime (Cilium's default) ≥ 100 slots per backend for up to
/// 163 backends.
pub const DEFAULT_SIZE: u32 = 16_381;

/// A backend: its identity (stable across reloads and gateways, e.g. `192.0.2.11:8080`) and
/// its weight (> 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: String,
    pub weight: u32,
}

/// The table: slot → index into the `backends` it was built from. Empty without backends.
/// `size` must be prime (every `skip` in `1..size` then visits every slot).
pub fn table(backends: &[Backend], size: u32) -> Vec<u32> {
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    // Identity order, then each backend's permutation.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|&a, &b| backends[a].id.cmp(&backends[b].id));
    let walks: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let id = backends[i].id.as_bytes();
            let offset = hash(id, SEED_OFFSET) % m;
            let skip = hash(id, SEED_SKIP) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let weights: Vec<i64> = order.iter().map(|&i| i64::from(backends[i].weight.max(1))).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; order.len()];
    let mut next = vec![0u64; order.len()];
    let mut slots = vec![u32::MAX; size as usize];
    for _ in 0..size {
        // Smooth weighted round robin; ties go to the first in identity order.
        let mut turn = 0;
        for k in 0..order.len() {
            current[k] += weights[k];
            if current[k] > current[turn] {
                turn = k;
            }
        }
        current[turn] -= total;
        let (offset, skip) = walks[turn];
        let mut slot = (offset + next[turn] * skip) % m;
        while slots[slot as usize] != u32::MAX {
            next[turn] += 1;
            slot = (offset + next[turn] * skip) % m;
        }
        slots[slot as usize] = order[turn] as u32;
        next[turn] += 1;
    }
    slots
}

const SEED_OFFSET: u64 = 0x6d61_676c_6576_3031; // "maglev01"
const SEED_SKIP: u64 = 0x6d61_676c_6576_3032; // "maglev02"

/// FNV-1a over the bytes, started from `seed`, then SplitMix64's finaliser (FNV alone mixes
/// the last bytes poorly, and identities differ mostly there).
pub fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Whether `n` is prime (for validating a configured size).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n).map(|i| Backend { id: format!("192.0.2.{}:8080", 10 + i), weight: 1 }).collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u64> {
        let mut counts = vec![0u64; n];
        for &slot in table {
            counts[slot as usize] += 1;
        }
        counts
    }

    /// Slots whose backend (by identity) differs between two tables.
    fn moved(a: &[u32], a_backends: &[Backend], b: &[u32], b_backends: &[Backend]) -> usize {
        a.iter().zip(b).filter(|(x, y)| a_backends[**x as usize].id != b_backends[**y as usize].id).count()
    }

    #[test]
    fn the_default_size_is_prime() {
        assert!(is_prime(DEFAULT_SIZE));
        assert!(is_prime(65_537) && !is_prime(65_535) && !is_prime(1) && is_prime(2));
    }

    #[test]
    fn the_hash_is_a_fixed_function() {
        // Pinned: a change here changes every gateway's tables (gateways of different
        // versions would disagree on a flow's backend).
        assert_eq!(format!("{:016x}", hash(b"192.0.2.11:8080", SEED_OFFSET)), "819e61c3d9af681f");
        assert_eq!(format!("{:016x}", hash(b"192.0.2.11:8080", SEED_SKIP)), "2b37b3a385a14f73");
        let t = table(&backends(3), 13);
        assert_eq!(t, [0, 2, 0, 2, 1, 2, 0, 2, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn no_backends_no_table() {
        assert!(table(&[], DEFAULT_SIZE).is_empty());
        assert_eq!(table(&backends(1), 7), vec![0; 7]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Every backend within one slot of its share, whatever the weights.
        #[test]
        fn shares_follow_the_weights(weights in proptest::collection::vec(1u32..=10, 1..=20)) {
            let list: Vec<Backend> = weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Backend { id: format!("10.0.{}.{}:443", i / 250, i % 250), weight })
                .collect();
            let t = table(&list, DEFAULT_SIZE);
            prop_assert_eq!(t.len(), DEFAULT_SIZE as usize);
            let total: u32 = weights.iter().sum();
            for (i, count) in counts(&t, list.len()).into_iter().enumerate() {
                let share = f64::from(DEFAULT_SIZE) * f64::from(weights[i]) / f64::from(total);
                prop_assert!((count as f64 - share).abs() <= 1.0 + 1e-9, "backend {i}: {count} slots, share {share:.2}");
            }
        }

        /// The same table, by identity, for any order of the same backends.
        #[test]
        fn the_order_of_the_list_does_not_matter(n in 1usize..=30, seed in any::<u64>()) {
            let list = backends(n);
            let mut shuffled = list.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let a = table(&list, DEFAULT_SIZE);
            let b = table(&shuffled, DEFAULT_SIZE);
            prop_assert_eq!(moved(&a, &list, &b, &shuffled), 0);
        }

        /// Removing (or, read backwards, adding) one of N backends moves its own slots and at
        /// most 1 % of the others, at the default size (N ≤ 12: ≥ 1,300 slots per backend).
        #[test]
        fn one_backend_more_or_less_moves_little(n in 2usize..=12, gone in 0usize..12) {
            let gone = gone % n;
            let all = backends(n);
            let mut fewer = all.clone();
            fewer.remove(gone);
            let before = table(&all, DEFAULT_SIZE);
            let after = table(&fewer, DEFAULT_SIZE);
            let moved = moved(&before, &all, &after, &fewer) as f64 / f64::from(DEFAULT_SIZE);
            let bound = 1.0 / n as f64 + 0.01;
            prop_assert!(moved <= bound, "{n} backends, one removed: {:.2} % moved (bound {:.2} %)", moved * 100.0, bound * 100.0);
        }
    }
}
