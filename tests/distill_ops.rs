//! Distillation and retrieval ops: values against plain reference formulas, gradients against
//! central finite differences in f64, and the f32 SIMD path against f64.

mod common;

use common::{check_gradient, max_abs_diff, randn};
use kdx::backend::{backend, Backend, KlDirection};
use kdx::model::params::Rng;
use kdx::{DType, Device, Tensor};

fn cpu() -> &'static dyn Backend {
    backend(Device::Cpu).unwrap()
}

/// RetriKT's listwise loss written out naively in f64.
fn naive_listwise(s: &Tensor, t: &Tensor, tau_s: f64, tau_t: f64, dir: KlDirection) -> f64 {
    let unit = |x: &Tensor| -> Vec<Vec<f64>> {
        let (n, d) = x.rows_cols();
        let v = x.to_vec_f64();
        (0..n)
            .map(|i| {
                let row = &v[i * d..(i + 1) * d];
                let norm = row.iter().map(|a| a * a).sum::<f64>().sqrt();
                row.iter().map(|a| a / norm).collect()
            })
            .collect()
    };
    let (su, tu) = (unit(s), unit(t));
    let n = su.len();
    let cos = |u: &Vec<Vec<f64>>, i: usize, j: usize| {
        u[i].iter().zip(&u[j]).map(|(a, b)| a * b).sum::<f64>()
    };
    let dist = |u: &Vec<Vec<f64>>, i: usize, tau: f64| -> Vec<f64> {
        let e: Vec<f64> = (0..n)
            .map(|j| {
                if j == i {
                    0.0
                } else {
                    (cos(u, i, j) / tau).exp()
                }
            })
            .collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    };
    (0..n)
        .map(|i| {
            let (p, q) = (dist(&su, i, tau_s), dist(&tu, i, tau_t));
            (0..n)
                .filter(|&j| j != i)
                .map(|j| match dir {
                    KlDirection::StudentTeacher => p[j] * (p[j] / q[j]).ln(),
                    KlDirection::TeacherStudent => q[j] * (q[j] / p[j]).ln(),
                })
                .sum::<f64>()
        })
        .sum()
}

#[test]
fn listwise_cos_kl_value_and_gradient() {
    let mut rng = Rng::new(1);
    // Awkward sizes, and teacher and student of different widths.
    let (s, t) = (randn(&[7, 5], &mut rng), randn(&[7, 9], &mut rng));
    for dir in [KlDirection::StudentTeacher, KlDirection::TeacherStudent] {
        let (loss, grad) = cpu().listwise_cos_kl(&s, &t, 0.125, 0.25, dir).unwrap();
        let want = naive_listwise(&s, &t, 0.125, 0.25, dir);
        assert!(
            (loss - want).abs() < 1e-10 * want.abs().max(1.0),
            "{dir:?}: {loss} vs {want}"
        );
        assert!(loss > 0.0);
        check_gradient(
            &format!("listwise {dir:?}"),
            &s,
            &grad,
            |v| cpu().listwise_cos_kl(v, &t, 0.125, 0.25, dir).unwrap().0,
            1e-5,
            1e-8,
        );
    }
    // Identical geometry and temperatures: zero loss, zero gradient.
    let (same, g) = cpu()
        .listwise_cos_kl(&s, &s, 0.3, 0.3, KlDirection::StudentTeacher)
        .unwrap();
    assert!(same.abs() < 1e-12 && g.to_vec_f64().iter().all(|v| v.abs() < 1e-10));
}

#[test]
fn listwise_cos_kl_f32_matches_f64() {
    let mut rng = Rng::new(2);
    let (s, t) = (randn(&[128, 384], &mut rng), randn(&[128, 256], &mut rng));
    let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
    let (l64, g64) = cpu()
        .listwise_cos_kl(&s, &t, 0.05, 0.1, KlDirection::StudentTeacher)
        .unwrap();
    let (l32, g32) = cpu()
        .listwise_cos_kl(&f(&s), &f(&t), 0.05, 0.1, KlDirection::StudentTeacher)
        .unwrap();
    assert!((l32 - l64).abs() < 1e-4 * l64.abs(), "{l32} vs {l64}");
    let scale = g64.to_vec_f64().iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&g32, &g64) < 1e-4 * scale);
    assert!(cpu()
        .listwise_cos_kl(
            &f(&s),
            &f(&randn(&[3, 4], &mut rng)),
            0.1,
            0.1,
            KlDirection::default()
        )
        .is_err());
}
