//! Losses fused with their gradient: cross-entropy against hard labels, and the general softmax-KL
//! distillation loss (soft targets at per-row temperatures and weights, either KL direction, teacher
//! logits or probabilities, the hard-label cross-entropy mixed in, ignored rows).

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::simd::{exp_shifted_sum, max, simd, sum_map, sum_map2, update_sum, Real};
use super::with_real;
use crate::backend::{check_same_shape, KlDirection, RowLosses, SoftmaxKl, Teacher, IGNORE_INDEX};
use crate::tensor::Tensor;

/// Mean over rows of `−log softmax(z)[label]`; the gradient is `(softmax(z) − onehot) / rows`.
/// Log-sum-exp with the row max subtracted, so any logit magnitude is safe.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<(f64, Tensor)> {
    let (rows, classes) = logits.rows_cols();
    ensure!(
        labels.len() == rows,
        "cross-entropy: {} labels for {rows} rows of logits",
        labels.len()
    );
    if let Some((i, &l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= classes)
    {
        bail!("cross-entropy: label {l} of row {i} is out of range for {classes} classes");
    }
    let mut grad = logits.zeros_like();
    let losses: Vec<f64> = with_real!(logits.dtype(), T => {
        let zd = logits.data::<T>()?;
        let inv_rows = T::from_f64(1.0 / rows as f64);
        grad.data_mut::<T>()?
            .par_chunks_mut(classes)
            .enumerate()
            .map(|(r, g)| {
                simd!({
                    let z = &zd[r * classes..(r + 1) * classes];
                    g.copy_from_slice(z);
                    let m = max(z);
                    let total = exp_shifted_sum(g, m);
                    let label = labels[r] as usize;
                    let loss = (total.ln() + m - z[label]).to_f64();
                    let scale = inv_rows / total;
                    g.iter_mut().for_each(|p| *p *= scale);
                    g[label] -= inv_rows;
                    loss
                })
            })
            .collect()
    });
    let mean = losses.iter().sum::<f64>() / rows as f64;
    Ok((mean, grad))
}

/// The fused softmax-KL loss ([`SoftmaxKl`]); `logits` holds the student logits on entry and their
/// gradient on return. Per row, in cache: a max pass, the log-normalisers, (for the reverse KL) the
/// KL sum, then one pass that overwrites the row with its gradient; only the first read and the final
/// write touch main memory for vocabulary-sized rows. Rows are independent, so short rows (C = 2) go
/// to threads in groups. With `student`, the logits are read from there instead (row by row, so the
/// copy stays in cache) and `logits` is only written.
pub fn softmax_kl_in_place(
    logits: &mut Tensor,
    student: Option<&Tensor>,
    spec: &SoftmaxKl,
) -> Result<RowLosses> {
    let counted = spec.validate(student.unwrap_or(logits))?;
    if let Some(s) = student {
        check_same_shape("softmax-KL (student vs gradient)", s, logits)?;
    }
    let (rows, classes) = logits.rows_cols();
    let (teacher, probs) = match spec.teacher {
        Teacher::Logits(t) => (t, false),
        Teacher::Probs(t) => (t, true),
    };
    let mut losses = vec![0f64; rows];
    if rows == 0 || classes == 0 {
        return Ok(RowLosses {
            mean: 0.0,
            rows: losses,
        });
    }
    let inv_counted = if counted == 0 {
        0.0
    } else {
        1.0 / counted as f64
    };
    let rows_per_task = (16384 / classes).max(1);
    with_real!(logits.dtype(), T => {
        let td = teacher.data::<T>()?;
        let source = student.map(|s| s.data::<T>()).transpose()?;
        logits.data_mut::<T>()?
            .par_chunks_mut(classes * rows_per_task)
            .zip(losses.par_chunks_mut(rows_per_task))
            .enumerate()
            .for_each(|(task, (g_rows, loss_rows))| {
                simd!({
                    for (i, (g, loss)) in g_rows.chunks_mut(classes).zip(loss_rows.iter_mut()).enumerate() {
                        let r = task * rows_per_task + i;
                        let label = spec.terms.labels.map(|l| l[r]);
                        if label == Some(IGNORE_INDEX) {
                            g.fill(T::ZERO);
                            continue;
                        }
                        if let Some(src) = source {
                            g.copy_from_slice(&src[r * classes..(r + 1) * classes]);
                        }
                        let tau = T::from_f64(spec.terms.temperature.get(r) as f64);
                        let row = RowSettings {
                            tau,
                            inv_tau: T::ONE / tau,
                            kl_weight: T::from_f64(spec.terms.kl_weight.get(r) as f64),
                            ce_weight: T::from_f64(spec.terms.ce_weight.get(r) as f64),
                            label: label.unwrap_or(0) as usize,
                            scale: T::from_f64(inv_counted),
                            direction: spec.terms.direction,
                        };
                        let t = &td[r * classes..(r + 1) * classes];
                        let hard = label.is_some() && row.ce_weight != T::ZERO;
                        let value = match (probs, hard) {
                            (false, h) => {
                                let log_z = log_normaliser(t, row.inv_tau);
                                let teacher = SoftenedLogits { inv_tau: row.inv_tau, log_z };
                                if h {
                                    row_loss::<T, _, true>(g, t, teacher, &row)
                                } else {
                                    row_loss::<T, _, false>(g, t, teacher, &row)
                                }
                            }
                            (true, true) => row_loss::<T, _, true>(g, t, GivenProbs, &row),
                            (true, false) => row_loss::<T, _, false>(g, t, GivenProbs, &row),
                        };
                        *loss = value.to_f64();
                    }
                })
            });
    });
    let mean = losses.iter().sum::<f64>() * inv_counted;
    Ok(RowLosses { mean, rows: losses })
}

/// One row's settings, resolved from the per-row arrays.
struct RowSettings<T> {
    tau: T,
    inv_tau: T,
    kl_weight: T,
    ce_weight: T,
    label: usize,
    /// 1 / (rows counted in the mean): the gradient is of the mean.
    scale: T,
    direction: KlDirection,
}

/// How a row of teacher values becomes log-probabilities and probabilities.
trait TeacherRow<T: Real>: Copy {
    fn log_p(self, t: T) -> T;
    /// The probability, given `log_p(t)` already computed.
    fn p(self, t: T, log_p: T) -> T;
}

/// Teacher logits at the row's temperature, with their log-normaliser.
#[derive(Clone, Copy)]
struct SoftenedLogits<T> {
    inv_tau: T,
    log_z: T,
}

impl<T: Real> TeacherRow<T> for SoftenedLogits<T> {
    #[inline(always)]
    fn log_p(self, t: T) -> T {
        t * self.inv_tau - self.log_z
    }
    #[inline(always)]
    fn p(self, _t: T, log_p: T) -> T {
        log_p.exp()
    }
}

/// Teacher probabilities used as given (no temperature). A zero probability has log ≈ −87.3 (the
/// f32 floor), so the reverse KL against it is large but finite, and the forward KL term is 0.
#[derive(Clone, Copy)]
struct GivenProbs;

impl<T: Real> TeacherRow<T> for GivenProbs {
    #[inline(always)]
    fn log_p(self, t: T) -> T {
        t.ln_fast()
    }
    #[inline(always)]
    fn p(self, t: T, _log_p: T) -> T {
        t
    }
}

/// `log Σ exp(x·inv_tau)`, shifted by the max so any magnitude is safe. Generic (not inside
/// `with_real!`, where `.exp()` on an f32 would be the scalar libm call).
#[inline(always)]
fn log_normaliser<T: Real>(x: &[T], inv_tau: T) -> T {
    let m = max(x);
    m * inv_tau
        + sum_map(
            x,
            #[inline(always)]
            |v| ((v - m) * inv_tau).exp(),
        )
        .ln()
}

/// The cross-entropy part of a logit's gradient, `w·softmax(s)_c` (the one-hot part is added apart).
#[inline(always)]
fn hard_part<T: Real, const HARD: bool>(x: T, ce_weight: T, log_z1: T) -> T {
    if HARD {
        ce_weight * (x - log_z1).exp()
    } else {
        T::ZERO
    }
}

/// Loss of one row (before the mean); `g` holds the row's logits `s` on entry and its gradient on
/// return. `HARD` mixes in the cross-entropy against `row.label`. With `ls = log softmax(s/τ)` and
/// `lt` the teacher's log-probs: forward `∂/∂s = τ·(p_s − p_t)`, reverse `∂/∂s = τ·p_s·(ls − lt − KL)`
/// (times the KL weight; the τ² of the loss cancels one 1/τ of the softmax).
#[inline(always)]
fn row_loss<T: Real, K: TeacherRow<T>, const HARD: bool>(
    g: &mut [T],
    t: &[T],
    teacher: K,
    row: &RowSettings<T>,
) -> T {
    let inv_tau = row.inv_tau;
    let log_zs = log_normaliser(g, inv_tau);
    // Log-normaliser of softmax(s) at temperature 1, for the cross-entropy.
    let log_z1 = if !HARD {
        T::ZERO
    } else if row.tau == T::ONE {
        log_zs
    } else {
        log_normaliser(g, T::ONE)
    };
    let label_logit = g[row.label];
    let (scale, soft) = (row.scale, row.kl_weight * row.tau);
    let ce_weight = row.ce_weight;
    let kl = match row.direction {
        KlDirection::TeacherStudent => update_sum(
            g,
            t,
            #[inline(always)]
            |x, y| {
                let (ls, lt) = (x * inv_tau - log_zs, teacher.log_p(y));
                let (ps, pt) = (ls.exp(), teacher.p(y, lt));
                (
                    (soft * (ps - pt) + hard_part::<T, HARD>(x, ce_weight, log_z1)) * scale,
                    pt * (lt - ls),
                )
            },
        ),
        KlDirection::StudentTeacher => {
            let kl = sum_map2(
                g,
                t,
                #[inline(always)]
                |x, y| {
                    let ls = x * inv_tau - log_zs;
                    ls.exp() * (ls - teacher.log_p(y))
                },
            );
            update_sum(
                g,
                t,
                #[inline(always)]
                |x, y| {
                    let (ls, lt) = (x * inv_tau - log_zs, teacher.log_p(y));
                    (
                        (soft * ls.exp() * (ls - lt - kl)
                            + hard_part::<T, HARD>(x, ce_weight, log_z1))
                            * scale,
                        T::ZERO,
                    )
                },
            );
            kl
        }
    };
    let mut loss = row.kl_weight * row.tau * row.tau * kl;
    if HARD {
        g[row.label] = g[row.label] - row.ce_weight * scale;
        loss += row.ce_weight * (log_z1 - label_logit);
    }
    loss
}
