//! In-batch similarity losses: RetriKT's listwise KL over cosine-similarity distributions.

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
