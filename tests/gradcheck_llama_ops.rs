//! The Llama ops (RMSNorm, RoPE, SwiGLU): values against plain f64 formulas, backwards against
//! central finite differences in f64, the f32 SIMD paths against f64, and errors for bad input.

mod common;

use common::{check_gradient, max_abs_diff, randn, weighted_sum};
use kdx::backend::cpu::rope::rope_table;
use kdx::backend::{backend, Backend};
use kdx::model::params::Rng;
use kdx::{DType, Device, Tensor};

const RTOL: f64 = 1e-6;
const ATOL: f64 = 1e-8;

fn cpu() -> &'static dyn Backend {
    backend(Device::Cpu).unwrap()
}

fn to32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

/// Largest `|got − want| / (1 + |want|)`.
fn max_rel_diff(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    got.to_vec_f64()
        .iter()
        .zip(want.to_vec_f64())
        .map(|(g, w)| (g - w).abs() / (1.0 + w.abs()))
        .fold(0.0, f64::max)
}

fn error_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("bad input was accepted"),
        Err(e) => e.to_string(),
    }
}

// RMSNorm

const EPS: f32 = 1e-5;

fn rms_norm(x: &Tensor, w: &Tensor) -> Tensor {
    cpu().rms_norm(x, w, EPS).unwrap().0
}

#[test]
fn rms_norm_forward_matches_formula() {
    let mut rng = Rng::new(1);
    let (rows, cols) = (7, 37);
    let (x, w) = (randn(&[rows, cols], &mut rng), randn(&[cols], &mut rng));
    let (y, stats) = cpu().rms_norm(&x, &w, EPS).unwrap();
    assert_eq!(stats.rstd.shape(), [rows]);
    assert_eq!(stats.mean.numel(), 0);
    let (xd, wd, yd, rd) = (
        x.to_vec_f64(),
        w.to_vec_f64(),
        y.to_vec_f64(),
        stats.rstd.to_vec_f64(),
    );
    for r in 0..rows {
        let row = &xd[r * cols..][..cols];
        let rs = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / cols as f64 + EPS as f64).sqrt();
        assert!(
            (rd[r] - rs).abs() < 1e-14 * rs,
            "row {r}: 1/rms {} vs {rs}",
            rd[r]
        );
        for i in 0..cols {
            let want = row[i] * rs * wd[i];
            assert!((yd[r * cols + i] - want).abs() < 1e-14 * (1.0 + want.abs()));
        }
    }
}

#[test]
fn rms_norm_backward_dx_and_dweight() {
    let mut rng = Rng::new(2);
    let (x, w, dy) = (
        randn(&[5, 13], &mut rng),
        randn(&[13], &mut rng),
        randn(&[5, 13], &mut rng),
    );
    // A row far from unit scale checks the 1/rms factors of the gradient.
    let x = cpu()
        .add(
            &x,
            &Tensor::from_vec(
                (0..65)
                    .map(|i| if i < 13 { 20.0 } else { 0.0 })
                    .collect::<Vec<f64>>(),
                &[5, 13],
            )
            .unwrap(),
        )
        .unwrap();
    let (_, stats) = cpu().rms_norm(&x, &w, EPS).unwrap();
    // dweight accumulates onto what is there.
    let before = randn(&[13], &mut rng);
    let mut dw = before.clone();
    let dx = cpu()
        .rms_norm_backward(&dy, &x, &w, &stats, Some(&mut dw))
        .unwrap();
    let dw_step = cpu()
        .add(
            &dw,
            &Tensor::from_vec(before.to_vec_f64().iter().map(|v| -v).collect(), &[13]).unwrap(),
        )
        .unwrap();
    check_gradient(
        "rmsnorm dx",
        &x,
        &dx,
        |v| weighted_sum(&rms_norm(v, &w), &dy),
        1e-5,
        1e-7,
    );
    check_gradient(
        "rmsnorm dweight",
        &w,
        &dw_step,
        |v| weighted_sum(&rms_norm(&x, v), &dy),
        RTOL,
        ATOL,
    );
    // Frozen weights: the same dx, bit for bit.
    let dx_frozen = cpu().rms_norm_backward(&dy, &x, &w, &stats, None).unwrap();
    assert_eq!(dx_frozen.to_vec_f64(), dx.to_vec_f64());
}

#[test]
fn rms_norm_f32_matches_f64_at_awkward_shapes() {
    let mut rng = Rng::new(3);
    for (rows, cols) in [(3 * 47, 47), (1, 576), (65, 1), (130, 23)] {
        let (x, w, dy) = (
            randn(&[rows, cols], &mut rng),
            randn(&[cols], &mut rng),
            randn(&[rows, cols], &mut rng),
        );
        let (y, stats) = cpu().rms_norm(&x, &w, EPS).unwrap();
        let (y32, stats32) = cpu().rms_norm(&to32(&x), &to32(&w), EPS).unwrap();
        assert_eq!(y32.dtype(), DType::F32);
        assert!(max_rel_diff(&y32, &y) < 1e-5, "{rows}x{cols} y");
        let mut dw = w.zeros_like();
        let dx = cpu()
            .rms_norm_backward(&dy, &x, &w, &stats, Some(&mut dw))
            .unwrap();
        let mut dw32 = to32(&w).zeros_like();
        let dx32 = cpu()
            .rms_norm_backward(&to32(&dy), &to32(&x), &to32(&w), &stats32, Some(&mut dw32))
            .unwrap();
        assert!(max_rel_diff(&dx32, &dx) < 1e-5, "{rows}x{cols} dx");
        // dweight sums over rows, so its rounding grows with them.
        assert!(
            max_rel_diff(&dw32, &dw) < 1e-5 * (rows as f64).sqrt(),
            "{rows}x{cols} dweight"
        );
    }
}

#[test]
fn rms_norm_rejects_bad_input() {
    let mut rng = Rng::new(4);
    let (x, w) = (randn(&[4, 6], &mut rng), randn(&[6], &mut rng));
    let err = error_of(cpu().rms_norm(&x, &randn(&[5], &mut rng), EPS));
    assert!(err.contains("6 features") && err.contains("[5]"), "{err}");
    let err = error_of(cpu().rms_norm(&x, &to32(&w), EPS));
    assert!(err.contains("f64") && err.contains("f32"), "{err}");
    let (_, stats) = cpu().rms_norm(&x, &w, EPS).unwrap();
    let err = error_of(cpu().rms_norm_backward(&randn(&[4, 5], &mut rng), &x, &w, &stats, None));
    assert!(err.contains("dy vs x"), "{err}");
    let mut dw = randn(&[7], &mut rng);
    let err = error_of(cpu().rms_norm_backward(&x, &x, &w, &stats, Some(&mut dw)));
    assert!(err.contains("dweight") && err.contains("[7]"), "{err}");
    let (_, other) = cpu().rms_norm(&randn(&[3, 6], &mut rng), &w, EPS).unwrap();
    let err = error_of(cpu().rms_norm_backward(&x, &x, &w, &other, None));
    assert!(err.contains("1/rms") && err.contains("[4]"), "{err}");
}

// RoPE

fn rope(x: &Tensor, heads: usize, positions: &[u32], table: &Tensor, inverse: bool) -> Tensor {
    let mut y = x.clone();
    cpu()
        .rope(&mut y, heads, positions, table, inverse)
        .unwrap();
    y
}

/// The rotation written out in f64 with the angle computed directly.
fn rope_reference(x: &Tensor, heads: usize, positions: &[u32], theta: f64) -> Vec<f64> {
    let width = x.rows_cols().1;
    let (d, half) = (width / heads, width / heads / 2);
    let mut out = x.to_vec_f64();
    for (r, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = r * width + h * d;
            for i in 0..half {
                let angle = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                let (a, b) = (out[base + i], out[base + half + i]);
                out[base + i] = a * angle.cos() - b * angle.sin();
                out[base + half + i] = b * angle.cos() + a * angle.sin();
            }
        }
    }
    out
}

#[test]
fn rope_matches_formula_at_small_and_large_positions() {
    let mut rng = Rng::new(5);
    let (heads, head_dim, theta) = (3, 10, 10_000.0);
    let positions = [0u32, 1, 2, 7, 100, 1000, 8191, 30_000, 65_535];
    let table = rope_table(65_536, head_dim, theta, DType::F64);
    let x = randn(&[positions.len(), heads * head_dim], &mut rng);
    let got = rope(&x, heads, &positions, &table, false).to_vec_f64();
    let want = rope_reference(&x, heads, &positions, theta);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // An f64 angle near 65535 is good to about 1e-11.
        assert!((g - w).abs() < 1e-10, "element {i}: {g} vs {w}");
    }
    // Position 0 is the identity.
    let row = heads * head_dim;
    assert_eq!(got[..row], x.to_vec_f64()[..row]);
}

#[test]
fn rope_backward_is_the_exact_inverse() {
    let mut rng = Rng::new(6);
    let (heads, head_dim) = (4, 8);
    let positions = [3u32, 0, 511, 17, 200];
    let table = rope_table(512, head_dim, 500_000.0, DType::F64);
    let x = randn(&[positions.len(), heads * head_dim], &mut rng);
    let back = rope(
        &rope(&x, heads, &positions, &table, false),
        heads,
        &positions,
        &table,
        true,
    );
    assert!(max_abs_diff(&back, &x) < 1e-15);
    let w = randn(x.shape(), &mut rng);
    let dx = rope(&w, heads, &positions, &table, true);
    check_gradient(
        "rope",
        &x,
        &dx,
        |v| weighted_sum(&rope(v, heads, &positions, &table, false), &w),
        RTOL,
        ATOL,
    );
    // The same in f32: the inverse undoes the rotation to rounding.
    let table32 = rope_table(512, head_dim, 500_000.0, DType::F32);
    let back32 = rope(
        &rope(&to32(&x), heads, &positions, &table32, false),
        heads,
        &positions,
        &table32,
        true,
    );
    assert!(max_abs_diff(&back32, &x) < 1e-5);
}

/// The angles of an f32 table as transformers computes them (f32 throughout), widened to f64.
fn transformers_angles(max_position: usize, head_dim: usize, theta: f64) -> Vec<f64> {
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    (0..max_position)
        .flat_map(|p| inv_freq.iter().map(move |&f| (p as f32 * f) as f64))
        .collect()
}

#[test]
fn rope_table_f32_against_f64() {
    let (max_position, head_dim, theta) = (8192, 64, 100_000.0);
    let half = head_dim / 2;
    let t32 = rope_table(max_position, head_dim, theta, DType::F32);
    let t64 = rope_table(max_position, head_dim, theta, DType::F64);
    assert_eq!((t32.dtype(), t64.dtype()), (DType::F32, DType::F64));
    assert_eq!(t32.shape(), [max_position, head_dim]);
    let (v32, v64) = (t32.to_vec_f64(), t64.to_vec_f64());
    let angles = transformers_angles(max_position, head_dim, theta);
    for p in 0..max_position {
        for i in 0..half {
            let (c, s) = (p * head_dim + i, p * head_dim + half + i);
            // The f64 table is the formula.
            let exact = p as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
            assert!((v64[c] - exact.cos()).abs() < 1e-12 && (v64[s] - exact.sin()).abs() < 1e-12);
            // The f32 table is the cos and sin of transformers' f32 angle, to f32 rounding...
            let angle = angles[p * half + i];
            assert!(
                (v32[c] - angle.cos()).abs() < 1e-6 && (v32[s] - angle.sin()).abs() < 1e-6,
                "position {p}, frequency {i}: f32 cos/sin off transformers' angle {angle}"
            );
            // ...and that angle is the exact one up to the f32 rounding of inv_freq and of p·inv_freq.
            let bound = 1e-6 + 2.0 * f32::EPSILON as f64 * exact.abs();
            assert!(
                (v32[c] - v64[c]).abs() < bound && (v32[s] - v64[s]).abs() < bound,
                "position {p}, frequency {i}: f32 {} {} vs f64 {} {}",
                v32[c],
                v32[s],
                v64[c],
                v64[s]
            );
        }
    }
}

#[test]
fn rope_f32_matches_f64_at_awkward_shapes() {
    let mut rng = Rng::new(7);
    for (rows, heads, head_dim) in [(3 * 47, 3, 10), (5, 9, 64), (33, 1, 2), (2, 2, 46)] {
        let positions: Vec<u32> = (0..rows as u32).map(|r| (r * 37) % 300).collect();
        let x = randn(&[rows, heads * head_dim], &mut rng);
        let want = rope(
            &x,
            heads,
            &positions,
            &rope_table(300, head_dim, 1e4, DType::F64),
            false,
        );
        let table32 = rope_table(300, head_dim, 1e4, DType::F32);
        let got = rope(&to32(&x), heads, &positions, &table32, false);
        assert!(
            max_rel_diff(&got, &want) < 1e-5,
            "{rows} rows, {heads}x{head_dim}"
        );
    }
}

#[test]
fn rope_rejects_bad_input() {
    let mut rng = Rng::new(8);
    let table = rope_table(16, 4, 1e4, DType::F64);
    let mut x = randn(&[2, 12], &mut rng);
    let mut err = |heads: usize, positions: &[u32], table: &Tensor| {
        cpu()
            .rope(&mut x, heads, positions, table, false)
            .unwrap_err()
            .to_string()
    };
    let e = err(3, &[0, 16], &table);
    assert!(
        e.contains("position 16") && e.contains("16 positions"),
        "{e}"
    );
    let e = err(3, &[0], &table);
    assert!(e.contains("1 positions for 2 rows"), "{e}");
    let e = err(5, &[0, 1], &table);
    assert!(e.contains("12 features") && e.contains("5 heads"), "{e}");
    let e = err(4, &[0, 1], &table);
    assert!(e.contains("even"), "{e}");
    let e = err(0, &[0, 1], &table);
    assert!(e.contains("0 heads"), "{e}");
    let e = err(2, &[0, 1], &table);
    assert!(e.contains("[16, 4]") && e.contains("6"), "{e}");
    let e = err(3, &[0, 1], &rope_table(16, 4, 1e4, DType::F32));
    assert!(e.contains("f64") && e.contains("f32"), "{e}");
}

#[test]
#[should_panic(expected = "must be even")]
fn rope_table_rejects_odd_head_dim() {
    rope_table(4, 7, 1e4, DType::F32);
}

// SwiGLU

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

#[test]
fn swiglu_matches_formula_and_gradients() {
    let mut rng = Rng::new(9);
    let (gate, up, dy) = (
        randn(&[4, 19], &mut rng),
        randn(&[4, 19], &mut rng),
        randn(&[4, 19], &mut rng),
    );
    // Spread the gate over both tails.
    let gate = Tensor::from_vec(
        gate.to_vec_f64().iter().map(|v| 4.0 * v).collect(),
        &[4, 19],
    )
    .unwrap();
    let y = cpu().swiglu(&gate, &up).unwrap();
    for ((g, u), y) in gate
        .to_vec_f64()
        .iter()
        .zip(up.to_vec_f64())
        .zip(y.to_vec_f64())
    {
        let want = silu(*g) * u;
        assert!(
            (y - want).abs() < 1e-15 * (1.0 + want.abs()),
            "silu({g})·{u} = {y} vs {want}"
        );
    }
    let (dgate, dup) = cpu().swiglu_backward(&gate, &up, &dy).unwrap();
    let f = |g: &Tensor, u: &Tensor| weighted_sum(&cpu().swiglu(g, u).unwrap(), &dy);
    check_gradient("swiglu dgate", &gate, &dgate, |v| f(v, &up), RTOL, ATOL);
    check_gradient("swiglu dup", &up, &dup, |v| f(&gate, v), RTOL, ATOL);
}

#[test]
fn swiglu_stays_finite_for_large_gates() {
    let gates = [
        -1e30, -1e4, -1000.0, -100.0, -30.0, 30.0, 100.0, 1000.0, 1e4, 1e30,
    ];
    let n = gates.len();
    for dtype in [DType::F32, DType::F64] {
        let gate = Tensor::from_vec(gates.to_vec(), &[n])
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let ones = Tensor::from_vec(vec![1.0f64; n], &[n])
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let y = cpu().swiglu(&gate, &ones).unwrap().to_vec_f64();
        let (dgate, dup) = cpu().swiglu_backward(&gate, &ones, &ones).unwrap();
        let (dgate, dup) = (dgate.to_vec_f64(), dup.to_vec_f64());
        for (i, &g) in gates.iter().enumerate() {
            assert!(
                y[i].is_finite() && dgate[i].is_finite() && dup[i].is_finite(),
                "{dtype}: gate {g}"
            );
            // silu(g) → g above, → 0 below (at most |g|·e^g); silu′ → 1 above, → 0 below.
            let (want, dwant) = if g > 0.0 { (g, 1.0) } else { (0.0, 0.0) };
            assert!(
                (y[i] - want).abs() <= 1e-6 * want.abs() + 1e-9,
                "{dtype}: silu({g}) = {}",
                y[i]
            );
            assert_eq!(dup[i], y[i], "{dtype}: dup at gate {g}");
            assert!(
                (dgate[i] - dwant).abs() < 1e-9,
                "{dtype}: silu'({g}) = {}",
                dgate[i]
            );
        }
    }
}

#[test]
fn swiglu_f32_matches_f64_at_awkward_shapes() {
    let mut rng = Rng::new(10);
    for shape in [[3, 47], [1, 1], [17, 33], [2, 1536]] {
        let (gate, up, dy) = (
            randn(&shape, &mut rng),
            randn(&shape, &mut rng),
            randn(&shape, &mut rng),
        );
        let gate =
            Tensor::from_vec(gate.to_vec_f64().iter().map(|v| 5.0 * v).collect(), &shape).unwrap();
        let y = cpu().swiglu(&gate, &up).unwrap();
        let y32 = cpu().swiglu(&to32(&gate), &to32(&up)).unwrap();
        assert!(max_rel_diff(&y32, &y) < 1e-6, "{shape:?} y");
        let (dg, du) = cpu().swiglu_backward(&gate, &up, &dy).unwrap();
        let (dg32, du32) = cpu()
            .swiglu_backward(&to32(&gate), &to32(&up), &to32(&dy))
            .unwrap();
        assert!(max_rel_diff(&dg32, &dg) < 1e-6, "{shape:?} dgate");
        assert!(max_rel_diff(&du32, &du) < 1e-6, "{shape:?} dup");
    }
}

#[test]
fn swiglu_rejects_bad_input() {
    let mut rng = Rng::new(11);
    let (gate, up) = (randn(&[3, 4], &mut rng), randn(&[3, 5], &mut rng));
    let err = error_of(cpu().swiglu(&gate, &up));
    assert!(
        err.contains("gate vs up") && err.contains("[3, 5]"),
        "{err}"
    );
    let err = error_of(cpu().swiglu(&gate, &to32(&gate)));
    assert!(err.contains("dtypes differ"), "{err}");
    let err = error_of(cpu().swiglu_backward(&gate, &gate, &up));
    assert!(err.contains("gate vs dy"), "{err}");
    let err = error_of(cpu().swiglu(
        &gate.to_dtype(DType::BF16).unwrap(),
        &gate.to_dtype(DType::BF16).unwrap(),
    ));
    assert!(err.contains("bf16"), "{err}");
}
