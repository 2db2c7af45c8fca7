//! Bit allocation across principal components (`allocation = "variance"`, docs/codec.md):
//! greedy marginal-return (reverse water-filling) over the Gaussian Lloyd–Max distortions.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::lloyd_max::{gaussian_distortion, MAX_TABLE_BITS};

/// A component's next bit: its distortion decrease `λ (D(b) − D(b + 1))`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    gain: f64,
    index: usize,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    /// Larger gain first; on equal gains the lower index first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.gain
            .total_cmp(&other.gain)
            .then_with(|| other.index.cmp(&self.index))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn gain(lambda: f64, bits: u8) -> f64 {
    lambda * (gaussian_distortion(bits) - gaussian_distortion(bits + 1))
}

/// Integer bits `b_i ∈ 0..=8` for components of variance `lambda` (finite, ≥ 0): start at 0
/// and give `budget` bits one at a time to the component whose distortion
/// `λ_i D(b_i)` drops most (lower index on ties). Components with `λ_i = 0` get no bits, so
/// fewer than `budget` bits are given when every other component already has 8.
pub fn allocate(lambda: &[f64], budget: usize) -> Vec<u8> {
    let mut bits = vec![0u8; lambda.len()];
    let mut heap: BinaryHeap<Candidate> = lambda
        .iter()
        .enumerate()
        .filter(|(_, &l)| l > 0.0)
        .map(|(index, &l)| Candidate {
            gain: gain(l, 0),
            index,
        })
        .collect();
    for _ in 0..budget {
        let Some(best) = heap.pop() else { break };
        let b = &mut bits[best.index];
        *b += 1;
        if *b < MAX_TABLE_BITS {
            heap.push(Candidate {
                gain: gain(lambda[best.index], *b),
                index: best.index,
            });
        }
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The literal rule: scan every component for the largest gain, each step.
    fn naive(lambda: &[f64], budget: usize) -> Vec<u8> {
        let mut bits = vec![0u8; lambda.len()];
        for _ in 0..budget {
            let mut best: Option<(usize, f64)> = None;
            for (i, &l) in lambda.iter().enumerate() {
                if l > 0.0 && bits[i] < MAX_TABLE_BITS {
                    let g = gain(l, bits[i]);
                    if best.is_none_or(|(_, bg)| g > bg) {
                        best = Some((i, g));
                    }
                }
            }
            match best {
                Some((i, _)) => bits[i] += 1,
                None => break,
            }
        }
        bits
    }

    #[test]
    fn known_allocations() {
        // Equal variances share the budget evenly, remainder to the lower indices.
        assert_eq!(allocate(&[1.0; 4], 10), vec![3, 3, 2, 2]);
        // A dominant component takes more bits; zero-variance components none.
        assert_eq!(allocate(&[16.0, 1.0, 0.0], 6), vec![4, 2, 0]);
        // 4× the variance is worth about one more bit (D(b) ≈ 4^-b at high rate).
        let b = allocate(&[64.0, 16.0, 4.0, 1.0], 16);
        assert_eq!(b.iter().map(|&v| usize::from(v)).sum::<usize>(), 16);
        assert!(
            b.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 2),
            "{b:?}"
        );
        // Budget beyond 8 bits per live component: stop at 8.
        assert_eq!(allocate(&[1.0, 0.0], 20), vec![8, 0]);
        assert_eq!(allocate(&[], 5), Vec::<u8>::new());
        assert_eq!(allocate(&[0.0, 0.0], 5), vec![0, 0]);
    }

    proptest! {
        #[test]
        fn allocation_properties(
            raw in proptest::collection::vec(prop_oneof![Just(0.0f64), 1e-6f64..1e4], 0..40),
            bits in 1usize..=4,
        ) {
            let budget = bits * raw.len();
            let b = allocate(&raw, budget);
            let live = raw.iter().filter(|&&l| l > 0.0).count();
            let spent: usize = b.iter().map(|&v| usize::from(v)).sum();
            // Sums to B whenever the live components can hold it.
            prop_assert_eq!(spent, budget.min(8 * live));
            for (i, (&li, &bi)) in raw.iter().zip(&b).enumerate() {
                prop_assert!(bi <= 8);
                if li == 0.0 {
                    prop_assert_eq!(bi, 0, "zero variance got bits at {}", i);
                }
                for (&lj, &bj) in raw.iter().zip(&b) {
                    // Monotone in λ.
                    if li > lj {
                        prop_assert!(bi >= bj, "λ {} > {} but bits {} < {}", li, lj, bi, bj);
                    }
                }
            }
            // Deterministic and equal to the literal scan.
            prop_assert_eq!(&allocate(&raw, budget), &b);
            prop_assert_eq!(naive(&raw, budget), b);
        }
    }
}
