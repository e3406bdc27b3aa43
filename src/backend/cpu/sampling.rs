//! Token sampling from logits: temperature, top-k, top-p (nucleus), greedy; seeded and reproducible.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::simd::{exp_shifted_sum, max, simd};
use crate::backend::{argmax, mix64, Sampling};
use crate::tensor::Tensor;

/// A uniform number in [0, 1) for `row` at generation `step`: a counter-based stream, so results do
/// not depend on threads or on how rows are batched.
fn uniform(seed: u64, step: u64, row: u64) -> f64 {
    let bits = mix64(seed ^ mix64(step.wrapping_add(0x9E37_79B9_7F4A_7C15) ^ mix64(row + 1)));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Checks the sampling settings against `logits [rows, vocab]`; returns `(rows, vocab)`.
pub(crate) fn check(logits: &Tensor, s: &Sampling) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.rows_cols();
    ensure!(vocab > 0, "sampling: empty vocabulary");
    ensure!(
        s.temperature >= 0.0,
        "sampling: temperature {} is negative",
        s.temperature
    );
    ensure!(
        s.top_p > 0.0 && s.top_p <= 1.0,
        "sampling: top-p {} is not in (0, 1]",
        s.top_p
    );
    Ok((rows, vocab))
}

/// One token per row of `logits [rows, vocab]`.
pub fn sample(logits: &Tensor, s: &Sampling, step: u64) -> Result<Vec<u32>> {
    let (_, vocab) = check(logits, s)?;
    let values = logits.to_vec_f32();
    Ok(values
        .par_chunks(vocab)
        .enumerate()
        .map(|(r, z)| {
            if s.temperature == 0.0 {
                return argmax(z);
            }
            // Probabilities at the temperature.
            let inv_t = 1.0 / s.temperature;
            let mut p: Vec<f32> = z.iter().map(|v| v * inv_t).collect();
            // Unnormalised: only ratios matter below.
            simd!({
                let m = max(&p);
                exp_shifted_sum(&mut p, m)
            });
            // Candidates by probability, ties to the lower id; top-k keeps the first k.
            let mut order: Vec<u32> = (0..vocab as u32).collect();
            let keep = if s.top_k > 0 {
                s.top_k.min(vocab)
            } else {
                vocab
            };
            let by_prob =
                |a: &u32, b: &u32| p[*b as usize].total_cmp(&p[*a as usize]).then(a.cmp(b));
            if keep < vocab {
                order.select_nth_unstable_by(keep - 1, by_prob);
                order.truncate(keep);
            }
            order.sort_unstable_by(by_prob);
            // The nucleus: the shortest prefix holding at least top_p of the (top-k) mass.
            let kept_mass: f64 = order.iter().map(|&i| p[i as usize] as f64).sum();
            let mut nucleus = 0;
            let mut mass = 0.0;
            for &i in &order {
                mass += p[i as usize] as f64;
                nucleus += 1;
                if mass >= s.top_p as f64 * kept_mass {
                    break;
                }
            }
            // Draw within the renormalised nucleus.
            let target = uniform(s.seed, step, r as u64) * mass;
            let mut acc = 0.0;
            for &i in &order[..nucleus] {
                acc += p[i as usize] as f64;
                if acc > target {
                    return i;
                }
            }
            order[nucleus - 1]
        })
        .collect())
}
