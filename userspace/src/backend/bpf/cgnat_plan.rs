//! The lookup plan of the CGNAT prefix maps (see `tailgate_abi::cgnat`), computed from the
//! rules one family of one direction holds: the range every rule lies in, the rule of the
//! range itself, and the longer prefix lengths to probe, longest first. Pure code; `model`
//! is the kernel's lookup over it, for tests against `policy::resolve`.

use std::collections::BTreeSet;

use tailgate_abi::cgnat::{FamilyPlan, Inline, PrefixRule, MAX_INLINE};

use super::cgnat::{Prefix, PrefixMap};

/// The plan of one family's entries (all of the same family: `A` address bytes).
pub fn family<const A: usize, const L: usize>(entries: &PrefixMap<PrefixRule>) -> FamilyPlan<A, L> {
    let width = A as u32 * 8;
    let mut prefixes = entries.keys().map(|&(_, len, addr)| (len, bits::<A>(&addr)));
    let Some((first_len, first)) = prefixes.next() else { return FamilyPlan::EMPTY };
    // The longest prefix that covers every rule: the bits all addresses share, no longer
    // than the shortest rule.
    let range = prefixes
        .fold(first_len, |range, (len, addr)| range.min(len).min((addr ^ first).leading_zeros().min(width)));
    let net = first & mask(range);
    let mut plan = FamilyPlan::<A, L>::EMPTY;
    plan.active = 1;
    plan.net = bytes::<A>(net);
    plan.mask = bytes::<A>(mask(range));
    let mut range_addr = [0u8; 16];
    range_addr[..A].copy_from_slice(&plan.net);
    plan.fallback = entries.get(&(A == 16, range, range_addr)).copied().unwrap_or(PrefixRule::NONE);
    let longer: BTreeSet<u32> = entries.keys().map(|&(_, len, _)| len).filter(|&len| len > range).collect();
    for (slot, len) in plan.lengths.iter_mut().zip(longer.iter().rev()) {
        *slot = *len as u8;
    }
    plan.count = longer.len().min(L) as u32;
    // Few prefixes: carried in the plan, longest first (a later one can only be shorter or
    // disjoint, so the first match is the longest).
    let mut inner: Vec<(&Prefix, &PrefixRule)> =
        entries.iter().filter(|((_, len, _), _)| *len > range).collect();
    if inner.len() <= MAX_INLINE {
        inner.sort_by_key(|((_, len, addr), _)| (std::cmp::Reverse(*len), *addr));
        for (slot, ((_, len, addr), rule)) in plan.inline.iter_mut().zip(&inner) {
            *slot = Inline { net: bytes::<A>(bits::<A>(addr)), mask: bytes::<A>(mask(*len)), rule: **rule };
        }
        plan.inline_count = inner.len() as u32;
    }
    plan
}

/// What the kernel finds for `addr` (`A` bytes) with `plan` over `entries`: the same steps
/// as `lookup4`/`lookup6` in the eBPF crate.
pub fn model<const A: usize, const L: usize>(
    plan: &FamilyPlan<A, L>,
    entries: &PrefixMap<PrefixRule>,
    addr: &[u8; A],
) -> Option<PrefixRule> {
    let a = bits::<A>(&padded(addr));
    if plan.active == 0 || a & bits::<A>(&padded(&plan.mask)) != bits::<A>(&padded(&plan.net)) {
        return None;
    }
    if plan.inline_count > 0 {
        let hit = plan.inline[..plan.inline_count as usize]
            .iter()
            .find(|i| a & bits::<A>(&padded(&i.mask)) == bits::<A>(&padded(&i.net)));
        return hit.map(|i| i.rule).or((plan.fallback != PrefixRule::NONE).then_some(plan.fallback));
    }
    for &len in &plan.lengths[..plan.count as usize] {
        let key = (A == 16, u32::from(len), padded(&bytes::<A>(a & mask(u32::from(len)))));
        if let Some(rule) = entries.get(&key) {
            return Some(*rule);
        }
    }
    (plan.fallback != PrefixRule::NONE).then_some(plan.fallback)
}

/// The address as a number whose top bit is the address's first bit.
fn bits<const A: usize>(addr: &[u8; 16]) -> u128 {
    let mut full = [0u8; 16];
    full[..A].copy_from_slice(&addr[..A]);
    u128::from_be_bytes(full)
}

fn bytes<const A: usize>(bits: u128) -> [u8; A] {
    bits.to_be_bytes()[..A].try_into().expect("A <= 16")
}

fn padded<const A: usize>(addr: &[u8; A]) -> [u8; 16] {
    let mut full = [0u8; 16];
    full[..A].copy_from_slice(addr);
    full
}

/// The mask of a prefix length, top-aligned.
fn mask(len: u32) -> u128 {
    match len {
        0 => 0,
        1..=127 => !(u128::MAX >> len),
        _ => u128::MAX,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
    };

    use ipnet::{IpNet, Ipv4Net, Ipv6Net};
    use proptest::prelude::*;
    use tailgate_abi::{
        cgnat::{Plan4, Plan6},
        verdict,
    };

    use super::*;
    use crate::{
        backend::bpf::cgnat::entries,
        config::Field,
        policy::{resolve, Origin, Rule, Verdict},
    };

    /// The map contents of `rules` (rule ids: the rule's index).
    fn map(rules: &[Rule], v6: bool) -> PrefixMap<PrefixRule> {
        let ids: HashMap<IpNet, u32> = rules.iter().enumerate().map(|(i, r)| (r.prefix, i as u32)).collect();
        entries(rules, v6)
            .map(|(prefix @ (_, len, addr), verdict)| {
                let net = if v6 {
                    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(addr), len as u8).unwrap())
                } else {
                    IpNet::V4(
                        Ipv4Net::new(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]), len as u8).unwrap(),
                    )
                };
                (prefix, PrefixRule { verdict, rule_id: ids[&net] })
            })
            .collect()
    }

    fn model_verdict(rules: &[Rule], addr: IpAddr) -> Option<u32> {
        match addr {
            IpAddr::V4(a) => {
                let m = map(rules, false);
                model(&family::<4, 32>(&m), &m, &a.octets()).map(|r| r.verdict)
            }
            IpAddr::V6(a) => {
                let m = map(rules, true);
                model(&family::<16, 128>(&m), &m, &a.octets()).map(|r| r.verdict)
            }
        }
    }

    fn reference(rules: &[Rule], addr: IpAddr) -> Option<u32> {
        resolve(rules, addr).map(|r| if r.verdict == Verdict::Drop { verdict::DROP } else { verdict::PASS })
    }

    fn rule(prefix: &str, verdict: Verdict) -> Rule {
        Rule {
            prefix: prefix.parse().unwrap(),
            verdict,
            origin: Origin::Config(Field { list: "test", index: 0 }),
        }
    }

    #[test]
    fn default_policy_plan() {
        let rules = [
            rule("100.64.0.0/10", Verdict::Drop),
            rule("100.115.92.0/23", Verdict::Pass),
            rule("fd7a:115c:a1e0::/48", Verdict::Drop),
        ];
        let m = map(&rules, false);
        let plan: Plan4 = family(&m);
        assert_eq!((plan.active, plan.net, plan.mask), (1, [100, 64, 0, 0], [255, 192, 0, 0]));
        assert_eq!(plan.fallback.verdict, verdict::DROP, "the /10 itself is the fallback, no probe");
        assert_eq!(&plan.lengths[..plan.count as usize], &[23]);
        let m6 = map(&rules, true);
        let plan6: Plan6 = family(&m6);
        assert_eq!(plan6.count, 0, "only the /48: the range check and its rule decide");
        assert_eq!(plan6.fallback.verdict, verdict::DROP);
        let empty: Plan4 = family(&PrefixMap::default());
        assert_eq!(empty.active, 0);
    }

    #[test]
    fn range_without_a_rule_of_its_own() {
        // Two exemptions only: the range is their common /9... of bits, with no fallback.
        let rules = [rule("100.100.0.0/16", Verdict::Pass), rule("100.101.7.0/24", Verdict::Drop)];
        let m = map(&rules, false);
        let plan: Plan4 = family(&m);
        assert_eq!(plan.fallback, PrefixRule::NONE);
        assert_eq!(&plan.lengths[..plan.count as usize], &[24, 16]);
        for addr in ["100.100.1.1", "100.101.7.9", "100.101.8.1", "100.64.0.1", "8.8.8.8"] {
            let addr: IpAddr = addr.parse().unwrap();
            assert_eq!(model_verdict(&rules, addr), reference(&rules, addr), "{addr}");
        }
    }

    fn v4_rule() -> impl Strategy<Value = Rule> {
        // Lengths cluster so prefixes nest; addresses from a small space so they overlap.
        (any::<u32>(), prop_oneof![Just(0u8), 1u8..=8, 8u8..=16, 16u8..=32], any::<bool>()).prop_map(
            |(a, len, pass)| {
                let a = a & 0xff0f_f0ff | 0x6440_0000;
                let net = Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc();
                Rule {
                    prefix: IpNet::V4(net),
                    verdict: if pass { Verdict::Pass } else { Verdict::Drop },
                    origin: Origin::Config(Field { list: "p", index: 0 }),
                }
            },
        )
    }

    fn v6_rule() -> impl Strategy<Value = Rule> {
        (any::<u128>(), 0u8..=128, any::<bool>()).prop_map(|(a, len, pass)| {
            let a = a & 0xffff_0000_0000_00ff_0000_0000_0000_ffff | 0xfd7a_115c_a1e0 << 80;
            let net = Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc();
            Rule {
                prefix: IpNet::V6(net),
                verdict: if pass { Verdict::Pass } else { Verdict::Drop },
                origin: Origin::Config(Field { list: "p", index: 0 }),
            }
        })
    }

    proptest! {
        /// The plan and probes give exactly the longest-prefix rule, for any rule set.
        #[test]
        fn lookup_is_longest_prefix_match(
            v4 in prop::collection::vec(v4_rule(), 0..24),
            v6 in prop::collection::vec(v6_rule(), 0..12),
            probes4 in prop::collection::vec(any::<u32>(), 32),
            probes6 in prop::collection::vec(any::<u128>(), 16),
        ) {
            let mut rules: Vec<Rule> = Vec::new();
            for r in v4.into_iter().chain(v6) {
                if !rules.iter().any(|o| o.prefix == r.prefix) {
                    rules.push(r);
                }
            }
            // Probe at, just inside and next to every prefix, and at random.
            let mut addrs: Vec<IpAddr> = Vec::new();
            for r in &rules {
                addrs.extend([r.prefix.network(), r.prefix.broadcast()]);
                if let IpNet::V4(n) = r.prefix {
                    addrs.push(Ipv4Addr::from(u32::from(n.broadcast()).wrapping_add(1)).into());
                }
            }
            addrs.extend(probes4.iter().map(|&a| IpAddr::from(Ipv4Addr::from(a & 0xff0f_f0ff | 0x6440_0000))));
            addrs.extend(probes4.iter().map(|&a| IpAddr::from(Ipv4Addr::from(a))));
            addrs.extend(probes6.iter().map(|&a| {
                IpAddr::from(Ipv6Addr::from(a & 0xffff_0000_0000_00ff_0000_0000_0000_ffff | 0xfd7a_115c_a1e0 << 80))
            }));
            for addr in addrs {
                prop_assert_eq!(model_verdict(&rules, addr), reference(&rules, addr), "{}", addr);
            }
        }
    }
}
