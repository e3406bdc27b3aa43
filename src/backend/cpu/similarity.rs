//! Similarity: RetriKT's listwise KL over in-batch cosine-similarity distributions, and cosine top-k
//! retrieval over a key store.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::gemm::gemm_2d;
use super::simd::{dot, exp_shifted_sum, max, simd, Real};
use super::with_real;
use crate::backend::KlDirection;
use crate::tensor::Tensor;

/// Rows scaled to unit length, and each row's original norm.
fn normalized<T: Real>(x: &[T], cols: usize) -> (Vec<T>, Vec<T>) {
    let mut unit = x.to_vec();
    let norms = unit
        .par_chunks_mut(cols)
        .map(|row| {
            simd!({
                let norm = dot(row, row).sqrt().max(T::from_f64(1e-12));
                let inv = T::ONE / norm;
                row.iter_mut().for_each(|v| *v *= inv);
                norm
            })
        })
        .collect();
    (unit, norms)
}

/// In place over row `i` of a similarity matrix: `log softmax(row / τ)` over the entries `j ≠ i`
/// (the diagonal is left at 0 and must be ignored by the caller).
fn log_softmax_off_diagonal<T: Real>(row: &mut [T], i: usize, tau: T) {
    let inv_tau = T::ONE / tau;
    row.iter_mut().for_each(|v| *v *= inv_tau);
    // The diagonal takes the row's smallest value, so it neither sets the max nor (after the shift
    // below) counts in the sum, which is corrected for it.
    let lowest = row
        .iter()
        .copied()
        .fold(row[0], |a, b| if b < a { b } else { a });
    row[i] = lowest;
    let m = max(row);
    let mut shifted = row.to_vec();
    let total = exp_shifted_sum(&mut shifted, m) - shifted[i];
    let log_z = total.ln() + m;
    row.iter_mut().for_each(|v| *v = *v - log_z);
    row[i] = T::ZERO;
}

/// Checks a listwise call (every device's); returns the rows and the student's and teacher's widths.
pub(crate) fn check_listwise(
    student: &Tensor,
    teacher: &Tensor,
    tau_student: f32,
    tau_teacher: f32,
) -> Result<(usize, usize, usize)> {
    let (n, ds) = student.rows_cols();
    let (nt, dt) = teacher.rows_cols();
    ensure!(
        n == nt,
        "listwise KL: {n} student rows but {nt} teacher rows"
    );
    ensure!(
        n >= 2,
        "listwise KL needs at least 2 rows (each row is compared with the others)"
    );
    ensure!(
        tau_student > 0.0 && tau_teacher > 0.0,
        "listwise KL: temperatures must be positive"
    );
    ensure!(
        student.dtype() == teacher.dtype(),
        "listwise KL: student and teacher dtypes differ"
    );
    Ok((n, ds, dt))
}

/// `Σ_i KL` between the student's and the teacher's distributions over the other rows of the batch,
/// `softmax_{j≠i}(cos(x_i, x_j)/τ)`, and the gradient with respect to the student embeddings.
/// Student and teacher may have different widths.
pub fn listwise_cos_kl(
    student: &Tensor,
    teacher: &Tensor,
    tau_student: f32,
    tau_teacher: f32,
    direction: KlDirection,
) -> Result<(f64, Tensor)> {
    let (n, ds, dt) = check_listwise(student, teacher, tau_student, tau_teacher)?;
    let mut grad = student.zeros_like();
    let loss = with_real!(student.dtype(), T => {
        let (s_unit, s_norm) = normalized(student.data::<T>()?, ds);
        let (t_unit, _) = normalized(teacher.data::<T>()?, dt);
        let mut log_p = vec![T::ZERO; n * n];
        let mut log_q = vec![T::ZERO; n * n];
        gemm_2d((n, n, ds), &s_unit, ds, false, &s_unit, ds, true, &mut log_p, false);
        gemm_2d((n, n, dt), &t_unit, dt, false, &t_unit, dt, true, &mut log_q, false);
        let (tau_s, tau_t) = (T::from_f64(tau_student as f64), T::from_f64(tau_teacher as f64));
        // Row i: log-probabilities of student (p) and teacher (q); then the loss and
        // g_ij = ∂L_i/∂sim_S(i,j), written over log_p.
        let losses: Vec<f64> = log_p
            .par_chunks_mut(n)
            .zip(log_q.par_chunks_mut(n))
            .enumerate()
            .map(|(i, (lp, lq))| {
                log_softmax_off_diagonal(lp, i, tau_s);
                log_softmax_off_diagonal(lq, i, tau_t);
                let mut loss = T::ZERO;
                for j in (0..n).filter(|&j| j != i) {
                    let (p, q) = (lp[j].exp(), lq[j].exp());
                    loss += match direction {
                        KlDirection::StudentTeacher => p * (lp[j] - lq[j]),
                        KlDirection::TeacherStudent => q * (lq[j] - lp[j]),
                    };
                }
                let inv_tau = T::ONE / tau_s;
                for j in 0..n {
                    lp[j] = if j == i {
                        T::ZERO
                    } else {
                        let p = lp[j].exp();
                        // ∂KL(p‖q)/∂z = p(log p − log q − KL); ∂KL(q‖p)/∂z = p − q; z = sim/τ.
                        let dz = match direction {
                            KlDirection::StudentTeacher => p * (lp[j] - lq[j] - loss),
                            KlDirection::TeacherStudent => p - lq[j].exp(),
                        };
                        dz * inv_tau
                    };
                }
                loss.to_f64()
            })
            .collect();
        // sim_S = Ŝ Ŝᵀ, so dŜ = (G + Gᵀ) Ŝ.
        let mut sym = vec![T::ZERO; n * n];
        for i in 0..n {
            for j in 0..n {
                sym[i * n + j] = log_p[i * n + j] + log_p[j * n + i];
            }
        }
        let mut d_unit = vec![T::ZERO; n * ds];
        gemm_2d((n, ds, n), &sym, n, false, &s_unit, ds, false, &mut d_unit, false);
        // Through the normalisation: dS_i = (dŜ_i − Ŝ_i (Ŝ_i · dŜ_i)) / ‖S_i‖.
        grad.data_mut::<T>()?.par_chunks_mut(ds).enumerate().for_each(|(i, g)| {
            let (u, du) = (&s_unit[i * ds..(i + 1) * ds], &d_unit[i * ds..(i + 1) * ds]);
            let c = dot(u, du);
            let inv = T::ONE / s_norm[i];
            for ((g, &uv), &dv) in g.iter_mut().zip(u).zip(du) {
                *g = (dv - uv * c) * inv;
            }
        });
        losses.iter().sum::<f64>()
    });
    Ok((loss, grad))
}

/// Checks a top-k update's operands: returns `(keys, features, queries)`. Key indices are `u32`, so
/// the chunk must end by key number 2^32.
pub(crate) fn check_topk(
    keys: &Tensor,
    offset: usize,
    queries: &Tensor,
    best: &TopK,
) -> Result<(usize, usize, usize)> {
    let (n, d) = keys.rows_cols();
    let (q, dq) = queries.rows_cols();
    ensure!(
        d == dq,
        "top-k: keys have {d} features but queries have {dq}"
    );
    ensure!(
        q == best.queries(),
        "top-k: {q} queries but the accumulator holds {}",
        best.queries()
    );
    ensure!(
        offset + n <= 1 << 32,
        "top-k: keys {offset}..{} are past the last index a u32 holds",
        offset + n
    );
    Ok((n, d, q))
}

/// Scores `queries` (normalised here) against a chunk of unit-length keys whose first row is key
/// number `offset`, and merges every score into `best`. Keys may be f32, f16 or bf16 (converted
/// per chunk); scores are f32 dot products, i.e. cosines.
pub fn cosine_topk_update(
    keys: &Tensor,
    offset: usize,
    queries: &Tensor,
    best: &mut TopK,
) -> Result<()> {
    let (n, d, q) = check_topk(keys, offset, queries, best)?;
    let (unit, _) = normalized(&queries.to_vec_f32(), d);
    // Key blocks sized so the score block stays around 16 MB whatever the query count.
    let block = ((4 << 20) / q.max(1)).clamp(256, 65536);
    let converted;
    let kd = match keys.dtype() {
        crate::tensor::DType::F32 => keys.data::<f32>()?,
        _ => {
            converted = keys.to_dtype(crate::tensor::DType::F32)?;
            converted.data::<f32>()?
        }
    };
    let mut scores = vec![0.0f32; q * block.min(n.max(1))];
    for start in (0..n).step_by(block) {
        let rows = block.min(n - start);
        let scores = &mut scores[..q * rows];
        gemm_2d(
            (q, rows, d),
            &unit,
            d,
            false,
            &kd[start * d..(start + rows) * d],
            d,
            true,
            scores,
            false,
        );
        best.offer_rows(scores, rows, (offset + start) as u32);
    }
    Ok(())
}

/// The k best (highest score; on equal scores the lower index) of each query so far.
pub struct TopK {
    k: usize,
    heaps: Vec<Bounded>,
}

impl TopK {
    pub fn new(queries: usize, k: usize) -> TopK {
        TopK {
            k,
            heaps: (0..queries)
                .map(|_| Bounded {
                    k,
                    items: Vec::with_capacity(k.min(1 << 16)),
                })
                .collect(),
        }
    }

    pub fn queries(&self) -> usize {
        self.heaps.len()
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Offers key `index` with `score` to `query`'s list.
    pub(crate) fn offer(&mut self, query: usize, score: f32, index: u32) {
        self.heaps[query].offer(score, index);
    }

    /// Offers a block of scores `[queries, cols]` of keys `first_index..first_index + cols`, one
    /// thread per query.
    pub(crate) fn offer_rows(&mut self, scores: &[f32], cols: usize, first_index: u32) {
        self.heaps
            .par_iter_mut()
            .zip(scores.par_chunks(cols))
            .for_each(|(heap, row)| {
                for (j, &s) in row.iter().enumerate() {
                    heap.offer(s, first_index + j as u32);
                }
            });
    }

    /// `[queries, k']` indices and scores, best first (`k' = min(k, keys seen)`).
    pub fn into_sorted(self) -> (Vec<u32>, Vec<f32>) {
        let (mut indices, mut scores) = (Vec::new(), Vec::new());
        for heap in self.heaps {
            let mut items = heap.items;
            items.sort_by(|a, b| {
                if better(*a, *b) {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                }
            });
            indices.extend(items.iter().map(|&(_, i)| i));
            scores.extend(items.iter().map(|&(s, _)| s));
        }
        (indices, scores)
    }
}

/// `a` ranks above `b`: a higher score, or the same score and a lower index.
#[inline(always)]
fn better(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// A min-heap of at most `k` items whose root is the worst kept one.
struct Bounded {
    k: usize,
    items: Vec<(f32, u32)>,
}

impl Bounded {
    #[inline(always)]
    fn offer(&mut self, score: f32, index: u32) {
        let item = (score, index);
        if self.items.len() < self.k {
            self.items.push(item);
            self.sift_up(self.items.len() - 1);
        } else if self.k > 0 && better(item, self.items[0]) {
            self.items[0] = item;
            self.sift_down(0);
        }
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if better(self.items[parent], self.items[i]) {
                self.items.swap(parent, i);
                i = parent;
            } else {
                break;
            }
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.items.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut worst = i;
            if l < n && better(self.items[worst], self.items[l]) {
                worst = l;
            }
            if r < n && better(self.items[worst], self.items[r]) {
                worst = r;
            }
            if worst == i {
                break;
            }
            self.items.swap(i, worst);
            i = worst;
        }
    }
}
