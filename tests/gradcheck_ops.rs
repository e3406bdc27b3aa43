//! Every op's backward against central finite differences in f64, on random inputs, plus forward
//! checks against plain reference formulas and the f32 SIMD paths against f64.

mod common;

use common::{check_gradient, max_abs_diff, randn, randn_f32, weighted_sum};
use kdx::backend::{backend, AdamW, AttnShape, Backend, Dropout, Pooling, Transpose};
use kdx::model::params::Rng;
use kdx::{DType, Device, Tensor};

const RTOL: f64 = 1e-6;
const ATOL: f64 = 1e-8;

fn cpu() -> &'static dyn Backend {
    backend(Device::Cpu).unwrap()
}

fn matmul(a: &Tensor, b: &Tensor, t: Transpose) -> Tensor {
    let (ash, bsh) = (a.shape(), b.shape());
    let nd = ash.len();
    let m = if t.a { ash[nd - 1] } else { ash[nd - 2] };
    let n = if t.b {
        bsh[bsh.len() - 2]
    } else {
        bsh[bsh.len() - 1]
    };
    let mut shape = ash[..nd - 2].to_vec();
    shape.extend([m, n]);
    let mut out = Tensor::zeros(&shape, a.dtype());
    cpu().matmul(a, b, t, &mut out, false).unwrap();
    out
}

/// Plain triple loop, batched, as the reference for the packed gemm.
fn naive_matmul(
    a: &Tensor,
    b: &Tensor,
    t: Transpose,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let (ad, bd) = (a.to_vec_f64(), b.to_vec_f64());
    let b_batched = bd.len() == batch * k * n;
    let mut out = vec![0.0; batch * m * n];
    for z in 0..batch {
        let (ao, bo) = (z * m * k, if b_batched { z * k * n } else { 0 });
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let x = if t.a {
                        ad[ao + p * m + i]
                    } else {
                        ad[ao + i * k + p]
                    };
                    let y = if t.b {
                        bd[bo + j * k + p]
                    } else {
                        bd[bo + p * n + j]
                    };
                    s += x * y;
                }
                out[z * m * n + i * n + j] = s;
            }
        }
    }
    out
}

#[test]
fn matmul_forward_matches_naive_for_every_transpose_and_batching() {
    let mut rng = Rng::new(1);
    let (batch, m, k, n) = (3, 47, 31, 5);
    for t in [Transpose::NN, Transpose::NT, Transpose::TN, Transpose::TT] {
        let a = randn(&if t.a { [batch, k, m] } else { [batch, m, k] }, &mut rng);
        for b_shape in [
            if t.b {
                vec![batch, n, k]
            } else {
                vec![batch, k, n]
            },
            if t.b { vec![n, k] } else { vec![k, n] },
        ] {
            let b = randn(&b_shape, &mut rng);
            let got = matmul(&a, &b, t).to_vec_f64();
            let want = naive_matmul(&a, &b, t, batch, m, k, n);
            let err = got
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-12, "{t:?} b {b_shape:?}: max error {err}");
            // f32 path within f32 rounding of the same reference.
            let got32 = matmul(
                &a.to_dtype(DType::F32).unwrap(),
                &b.to_dtype(DType::F32).unwrap(),
                t,
            )
            .to_vec_f64();
            let err32 = got32
                .iter()
                .zip(&want)
                .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                .fold(0.0, f64::max);
            assert!(err32 < 1e-5, "{t:?} f32: max error {err32}");
        }
    }
}

#[test]
fn matmul_accumulates_when_asked() {
    let mut rng = Rng::new(2);
    let (a, b) = (randn(&[4, 6], &mut rng), randn(&[6, 3], &mut rng));
    let mut out = randn(&[4, 3], &mut rng);
    let before = out.to_vec_f64();
    cpu().matmul(&a, &b, Transpose::NN, &mut out, true).unwrap();
    let prod = naive_matmul(&a, &b, Transpose::NN, 1, 4, 6, 3);
    for ((g, b0), p) in out.to_vec_f64().iter().zip(before).zip(prod) {
        assert!((g - (b0 + p)).abs() < 1e-12);
    }
}

#[test]
fn matmul_backward_every_transpose() {
    let mut rng = Rng::new(3);
    let (batch, m, k, n) = (2, 5, 4, 3);
    for t in [Transpose::NN, Transpose::NT, Transpose::TN, Transpose::TT] {
        let a = randn(&if t.a { [batch, k, m] } else { [batch, m, k] }, &mut rng);
        let b = randn(&if t.b { [batch, n, k] } else { [batch, k, n] }, &mut rng);
        let w = randn(&[batch, m, n], &mut rng);
        let (da, db) = cpu().matmul_backward(&a, &b, t, &w).unwrap();
        check_gradient(
            &format!("matmul {t:?} da"),
            &a,
            &da,
            |x| weighted_sum(&matmul(x, &b, t), &w),
            RTOL,
            ATOL,
        );
        check_gradient(
            &format!("matmul {t:?} db"),
            &b,
            &db,
            |x| weighted_sum(&matmul(&a, x, t), &w),
            RTOL,
            ATOL,
        );
    }
}

#[test]
fn linear_with_bias_backward() {
    let mut rng = Rng::new(4);
    let (x, wt, bias) = (
        randn(&[2, 3, 7], &mut rng),
        randn(&[5, 7], &mut rng),
        randn(&[5], &mut rng),
    );
    let w = randn(&[2, 3, 5], &mut rng);
    let be = cpu();
    let f =
        |x: &Tensor, wt: &Tensor, b: &Tensor| weighted_sum(&be.linear(x, wt, Some(b)).unwrap(), &w);
    let (mut dwt, mut db) = (wt.zeros_like(), bias.zeros_like());
    let dx = be
        .linear_backward(&w, &x, &wt, &mut dwt, Some(&mut db))
        .unwrap();
    assert_eq!(dx.shape(), x.shape());
    check_gradient("linear dx", &x, &dx, |v| f(v, &wt, &bias), RTOL, ATOL);
    check_gradient("linear dw", &wt, &dwt, |v| f(&x, v, &bias), RTOL, ATOL);
    check_gradient("linear db", &bias, &db, |v| f(&x, &wt, v), RTOL, ATOL);
}

#[test]
fn embedding_backward_scatter_adds_repeated_ids() {
    let mut rng = Rng::new(5);
    let table = randn(&[6, 4], &mut rng);
    let ids = [3u32, 1, 3, 0, 5, 3];
    let w = randn(&[6, 4], &mut rng);
    let mut dtable = table.zeros_like();
    cpu().embedding_backward(&w, &ids, &mut dtable).unwrap();
    check_gradient(
        "embedding",
        &table,
        &dtable,
        |t| weighted_sum(&cpu().embedding(t, &ids).unwrap(), &w),
        RTOL,
        ATOL,
    );
    assert!(cpu()
        .embedding(&table, &[6])
        .unwrap_err()
        .to_string()
        .contains("out of range"));
}

#[test]
fn layer_norm_backward() {
    let mut rng = Rng::new(6);
    let x = randn(&[5, 13], &mut rng);
    // A large common offset checks the variance is computed stably.
    let x = cpu()
        .add(&x, &Tensor::from_vec(vec![30.0f64; 65], &[5, 13]).unwrap())
        .unwrap();
    let (g, b, w) = (
        randn(&[13], &mut rng),
        randn(&[13], &mut rng),
        randn(&[5, 13], &mut rng),
    );
    let f = |x: &Tensor, g: &Tensor, b: &Tensor| {
        weighted_sum(&cpu().layer_norm(x, g, b, 1e-5).unwrap().0, &w)
    };
    let (_, stats) = cpu().layer_norm(&x, &g, &b, 1e-5).unwrap();
    let (mut dg, mut db) = (g.zeros_like(), b.zeros_like());
    let dx = cpu()
        .layer_norm_backward(&w, &x, &g, &stats, &mut dg, &mut db)
        .unwrap();
    check_gradient("layernorm dx", &x, &dx, |v| f(v, &g, &b), 1e-5, 1e-7);
    check_gradient("layernorm dgamma", &g, &dg, |v| f(&x, v, &b), RTOL, ATOL);
    check_gradient("layernorm dbeta", &b, &db, |v| f(&x, &g, v), RTOL, ATOL);
}

#[test]
fn layer_norm_forward_matches_formula_and_f32() {
    let mut rng = Rng::new(7);
    let (x, g, b) = (
        randn(&[9, 384], &mut rng),
        randn(&[384], &mut rng),
        randn(&[384], &mut rng),
    );
    let (y, _) = cpu().layer_norm(&x, &g, &b, 1e-12).unwrap();
    let (xd, gd, bd, yd) = (
        x.to_vec_f64(),
        g.to_vec_f64(),
        b.to_vec_f64(),
        y.to_vec_f64(),
    );
    for r in 0..9 {
        let row = &xd[r * 384..(r + 1) * 384];
        let mean = row.iter().sum::<f64>() / 384.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 384.0;
        for i in 0..384 {
            let want = (row[i] - mean) / (var + 1e-12).sqrt() * gd[i] + bd[i];
            assert!((yd[r * 384 + i] - want).abs() < 1e-12);
        }
    }
    let to32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (y32, _) = cpu()
        .layer_norm(&to32(&x), &to32(&g), &to32(&b), 1e-12)
        .unwrap();
    assert!(max_abs_diff(&y32, &y) < 2e-5);
}

#[test]
fn gelu_backward_and_f32_accuracy() {
    let mut rng = Rng::new(8);
    let x = randn(&[3, 47], &mut rng);
    let w = randn(&[3, 47], &mut rng);
    let dx = cpu().gelu_backward(&x, &w).unwrap();
    check_gradient(
        "gelu",
        &x,
        &dx,
        |v| weighted_sum(&cpu().gelu(v).unwrap(), &w),
        RTOL,
        ATOL,
    );
    // Exact reference: x·Φ(x) with libm's erf, over a wide range, against the f32 SIMD path.
    let xs: Vec<f64> = (0..4001).map(|i| -10.0 + i as f64 * 0.005).collect();
    let x32 = Tensor::from_vec(
        xs.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
        &[xs.len()],
    )
    .unwrap();
    let y32 = cpu().gelu(&x32).unwrap().to_vec_f64();
    let g32 = cpu()
        .gelu_backward(
            &x32,
            &Tensor::from_vec(vec![1.0f32; xs.len()], &[xs.len()]).unwrap(),
        )
        .unwrap()
        .to_vec_f64();
    for (i, &v) in xs.iter().enumerate() {
        let v = v as f32 as f64;
        let want = 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()));
        assert!(
            (y32[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
            "gelu({v}) = {} vs {want}",
            y32[i]
        );
        let dwant = 0.5 * (1.0 + libm::erf(v / 2f64.sqrt()))
            + v * (-v * v / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        assert!(
            (g32[i] - dwant).abs() <= 1e-6 * (1.0 + dwant.abs()),
            "gelu'({v}) = {} vs {dwant}",
            g32[i]
        );
    }
}

/// Attention computed the obvious way in f64: per sequence and head, softmax over the real keys.
fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, s: AttnShape, lengths: &[u32]) -> Vec<f64> {
    let (qd, kd, vd) = (q.to_vec_f64(), k.to_vec_f64(), v.to_vec_f64());
    let width = q.shape()[1];
    let d = width / s.heads;
    let mut out = vec![0.0; qd.len()];
    for (b, &len) in lengths.iter().enumerate() {
        for h in 0..s.heads {
            let at = |t: usize, i: usize| (b * s.seq + t) * width + h * d + i;
            for i in 0..s.seq {
                let scores: Vec<f64> = (0..len as usize)
                    .map(|j| {
                        (0..d).map(|c| qd[at(i, c)] * kd[at(j, c)]).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    out[at(i, c)] = e
                        .iter()
                        .enumerate()
                        .map(|(j, p)| p / z * vd[at(j, c)])
                        .sum();
                }
            }
        }
    }
    out
}

#[test]
fn attention_forward_matches_naive_and_ignores_padding() {
    let mut rng = Rng::new(9);
    let s = AttnShape {
        batch: 3,
        seq: 7,
        heads: 2,
    };
    let lengths = [7u32, 3, 5];
    let (q, k, v) = (
        randn(&[21, 6], &mut rng),
        randn(&[21, 6], &mut rng),
        randn(&[21, 6], &mut rng),
    );
    let (out, probs) = cpu()
        .attention(&q, &k, &v, s, &lengths, Dropout::OFF)
        .unwrap();
    let want = naive_attention(&q, &k, &v, s, &lengths);
    let err = out
        .to_vec_f64()
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-12, "max error {err}");
    // Probabilities of padded keys are exactly zero.
    let p = probs.to_vec_f64();
    for (b, &len) in lengths.iter().enumerate() {
        for h in 0..2 {
            for i in 0..7 {
                for j in len as usize..7 {
                    assert_eq!(p[((b * 2 + h) * 7 + i) * 7 + j], 0.0);
                }
            }
        }
    }
    // Changing keys and values at padded positions changes no real position's output.
    let (mut k2, mut v2) = (k.to_vec_f64(), v.to_vec_f64());
    for t in 3..7 {
        for c in 0..6 {
            k2[(7 + t) * 6 + c] += 100.0;
            v2[(7 + t) * 6 + c] -= 50.0;
        }
    }
    let k2 = Tensor::from_vec(k2, &[21, 6]).unwrap();
    let v2 = Tensor::from_vec(v2, &[21, 6]).unwrap();
    let (out2, _) = cpu()
        .attention(&q, &k2, &v2, s, &lengths, Dropout::OFF)
        .unwrap();
    assert_eq!(
        out.to_vec_f64()[7 * 6..10 * 6],
        out2.to_vec_f64()[7 * 6..10 * 6]
    );
    // The f32 path agrees with f64.
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (out32, _) = cpu()
        .attention(&f(&q), &f(&k), &f(&v), s, &lengths, Dropout::OFF)
        .unwrap();
    assert!(max_abs_diff(&out32, &out) < 1e-5);
}

#[test]
fn attention_backward_with_padding_and_dropout() {
    let mut rng = Rng::new(10);
    let s = AttnShape {
        batch: 2,
        seq: 5,
        heads: 2,
    };
    let lengths = [5u32, 3];
    let (q, k, v) = (
        randn(&[10, 8], &mut rng),
        randn(&[10, 8], &mut rng),
        randn(&[10, 8], &mut rng),
    );
    let w = randn(&[10, 8], &mut rng);
    for dropout in [Dropout::OFF, Dropout { p: 0.3, seed: 77 }] {
        let be = cpu();
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
            weighted_sum(&be.attention(q, k, v, s, &lengths, dropout).unwrap().0, &w)
        };
        let (_, probs) = be.attention(&q, &k, &v, s, &lengths, dropout).unwrap();
        let (dq, dk, dv) = be
            .attention_backward(&w, &q, &k, &v, &probs, s, &lengths, dropout)
            .unwrap();
        check_gradient(
            &format!("attention dq {dropout:?}"),
            &q,
            &dq,
            |x| f(x, &k, &v),
            RTOL,
            ATOL,
        );
        check_gradient(
            &format!("attention dk {dropout:?}"),
            &k,
            &dk,
            |x| f(&q, x, &v),
            RTOL,
            ATOL,
        );
        check_gradient(
            &format!("attention dv {dropout:?}"),
            &v,
            &dv,
            |x| f(&q, &k, x),
            RTOL,
            ATOL,
        );
    }
}

#[test]
fn dropout_is_seeded_scaled_and_its_own_backward() {
    let mut rng = Rng::new(11);
    let n = 200_000;
    let ones = Tensor::from_vec(vec![1.0f32; n], &[n]).unwrap();
    let d = Dropout { p: 0.25, seed: 5 };
    let y = cpu().dropout(ones.clone(), d).unwrap().to_vec_f64();
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.005, "kept fraction {kept}");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6));
    assert_eq!(
        y,
        cpu().dropout(ones.clone(), d).unwrap().to_vec_f64(),
        "same seed, same mask"
    );
    assert_ne!(
        y,
        cpu()
            .dropout(ones.clone(), Dropout { p: 0.25, seed: 6 })
            .unwrap()
            .to_vec_f64()
    );
    assert_eq!(
        cpu()
            .dropout(ones.clone(), Dropout::OFF)
            .unwrap()
            .to_vec_f64(),
        vec![1.0; n]
    );

    let x = randn(&[4, 9], &mut rng);
    let w = randn(&[4, 9], &mut rng);
    let dx = cpu().dropout(w.clone(), d).unwrap();
    check_gradient(
        "dropout",
        &x,
        &dx,
        |v| weighted_sum(&cpu().dropout(v.clone(), d).unwrap(), &w),
        RTOL,
        ATOL,
    );
}

#[test]
fn residual_add_backward() {
    let mut rng = Rng::new(12);
    let (a, b, w) = (
        randn(&[3, 5], &mut rng),
        randn(&[3, 5], &mut rng),
        randn(&[3, 5], &mut rng),
    );
    check_gradient(
        "add",
        &a,
        &w,
        |v| weighted_sum(&cpu().add(v, &b).unwrap(), &w),
        RTOL,
        ATOL,
    );
}

#[test]
fn pooling_backward_mean_and_cls() {
    let mut rng = Rng::new(13);
    let lengths = [4u32, 2, 3];
    let x = randn(&[12, 5], &mut rng);
    let w = randn(&[3, 5], &mut rng);
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let dx = cpu().pool_backward(&w, 4, &lengths, pooling).unwrap();
        check_gradient(
            &format!("{pooling:?} pool"),
            &x,
            &dx,
            |v| weighted_sum(&cpu().pool(v, 4, &lengths, pooling).unwrap(), &w),
            RTOL,
            ATOL,
        );
    }
    // Mean pooling averages only the real tokens.
    let pooled = cpu()
        .pool(&x, 4, &lengths, Pooling::Mean)
        .unwrap()
        .to_vec_f64();
    let xd = x.to_vec_f64();
    let want: f64 = (0..2).map(|t| xd[(4 + t) * 5]).sum::<f64>() / 2.0;
    assert!((pooled[5] - want).abs() < 1e-12);
}

#[test]
fn cross_entropy_loss_and_gradient() {
    let mut rng = Rng::new(14);
    let logits = randn(&[6, 31], &mut rng);
    let labels = [0u32, 30, 7, 7, 12, 3];
    let (loss, grad) = cpu().cross_entropy(&logits, &labels).unwrap();
    let z = logits.to_vec_f64();
    let want: f64 = (0..6)
        .map(|r| {
            let row = &z[r * 31..(r + 1) * 31];
            row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[labels[r] as usize]
        })
        .sum::<f64>()
        / 6.0;
    assert!((loss - want).abs() < 1e-12);
    check_gradient(
        "cross-entropy",
        &logits,
        &grad,
        |v| cpu().cross_entropy(v, &labels).unwrap().0,
        RTOL,
        ATOL,
    );
    // Huge logits stay finite.
    let big = Tensor::from_vec(vec![1e30f32, -1e30, 3e29, 0.0], &[2, 2]).unwrap();
    let (l, g) = cpu().cross_entropy(&big, &[1, 0]).unwrap();
    assert!(l.is_finite() && g.to_vec_f64().iter().all(|v| v.is_finite()));
    assert!(cpu()
        .cross_entropy(&logits, &[0, 1, 2, 3, 4, 31])
        .unwrap_err()
        .to_string()
        .contains("out of range"));
}

#[test]
fn adamw_matches_pytorch_formula() {
    let mut rng = Rng::new(15);
    let hp = AdamW {
        lr: 0.01,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let mut p = randn(&[37], &mut rng);
    let (mut m, mut v) = (p.zeros_like(), p.zeros_like());
    let (mut rp, mut rm, mut rv) = (p.to_vec_f64(), vec![0.0; 37], vec![0.0; 37]);
    for step in 1..=4u64 {
        let g = randn(&[37], &mut rng);
        cpu().adamw(&mut p, &g, &mut m, &mut v, &hp, step).unwrap();
        let (lr, b1, b2, eps, wd) = (
            0.01f32 as f64,
            0.8f32 as f64,
            0.95f32 as f64,
            1e-6f32 as f64,
            0.1f32 as f64,
        );
        for (i, gi) in g.to_vec_f64().into_iter().enumerate() {
            // torch.optim.AdamW, written out.
            rp[i] *= 1.0 - lr * wd;
            rm[i] = b1 * rm[i] + (1.0 - b1) * gi;
            rv[i] = b2 * rv[i] + (1.0 - b2) * gi * gi;
            let (bc1, bc2) = (1.0 - b1.powi(step as i32), 1.0 - b2.powi(step as i32));
            rp[i] -= lr / bc1 * rm[i] / (rv[i].sqrt() / bc2.sqrt() + eps);
        }
    }
    let err = p
        .to_vec_f64()
        .iter()
        .zip(&rp)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-12, "max error {err}");
}

#[test]
fn cpu_rejects_storage_only_dtypes_clearly() {
    let mut rng = Rng::new(16);
    let x = randn_f32(&[2, 3], &mut rng).to_dtype(DType::BF16).unwrap();
    let err = cpu().gelu(&x).unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
}

#[test]
fn tanh_backward() {
    let mut rng = Rng::new(17);
    let x = randn(&[4, 13], &mut rng);
    let w = randn(&[4, 13], &mut rng);
    let y = cpu().tanh(&x).unwrap();
    for (a, b) in y.to_vec_f64().iter().zip(x.to_vec_f64()) {
        assert!((a - b.tanh()).abs() < 1e-15);
    }
    let dx = cpu().tanh_backward(&y, &w).unwrap();
    check_gradient(
        "tanh",
        &x,
        &dx,
        |v| weighted_sum(&cpu().tanh(v).unwrap(), &w),
        RTOL,
        ATOL,
    );
    let big = Tensor::from_vec(vec![-100.0f32, 100.0, 0.3], &[3]).unwrap();
    let y = cpu().tanh(&big).unwrap().to_vec_f64();
    assert_eq!((y[0], y[1]), (-1.0, 1.0));
    assert!((y[2] - 0.3f64.tanh()).abs() < 1e-6);
}

#[test]
fn distillation_loss_value_and_gradient() {
    let mut rng = Rng::new(18);
    let (s, t) = (randn(&[5, 7], &mut rng), randn(&[5, 7], &mut rng));
    let labels = [0u32, 6, 3, 3, 1];
    let (alpha, tau) = (0.7f32, 2.5f32);
    let (loss, grad) = cpu().distill_loss(&s, &t, &labels, alpha, tau).unwrap();
    // Reference: the formula written out in f64.
    let (sd, td) = (s.to_vec_f64(), t.to_vec_f64());
    let (a, tau64) = (alpha as f64, tau as f64);
    let log_softmax = |row: &[f64], temp: f64| {
        let z: f64 = row.iter().map(|v| (v / temp).exp()).sum::<f64>().ln();
        row.iter().map(|v| v / temp - z).collect::<Vec<f64>>()
    };
    let mut want = 0.0;
    for r in 0..5 {
        let (sr, tr) = (&sd[r * 7..(r + 1) * 7], &td[r * 7..(r + 1) * 7]);
        let ce = -log_softmax(sr, 1.0)[labels[r] as usize];
        let (ls, lt) = (log_softmax(sr, tau64), log_softmax(tr, tau64));
        let kl: f64 = lt.iter().zip(&ls).map(|(p, q)| p.exp() * (p - q)).sum();
        want += (1.0 - a) * ce + a * tau64 * tau64 * kl;
    }
    assert!(
        (loss - want / 5.0).abs() < 1e-12,
        "{loss} vs {}",
        want / 5.0
    );
    check_gradient(
        "distill",
        &s,
        &grad,
        |v| cpu().distill_loss(v, &t, &labels, alpha, tau).unwrap().0,
        RTOL,
        ATOL,
    );
    // α = 0 is plain cross-entropy.
    let (ce, ce_grad) = cpu().cross_entropy(&s, &labels).unwrap();
    let (l0, g0) = cpu().distill_loss(&s, &t, &labels, 0.0, tau).unwrap();
    assert!((ce - l0).abs() < 1e-12 && max_abs_diff(&ce_grad, &g0) < 1e-15);
}

#[test]
fn sum_squares_and_scale() {
    let mut rng = Rng::new(19);
    let mut x = randn_f32(&[70_001], &mut rng);
    let want: f64 = x.to_vec_f64().iter().map(|v| v * v).sum();
    let got = cpu().sum_squares(&x).unwrap();
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    let before = x.to_vec_f64();
    cpu().scale(&mut x, -0.5).unwrap();
    assert!(x
        .to_vec_f64()
        .iter()
        .zip(before)
        .all(|(a, b)| *a == -0.5 * b));
}

#[test]
fn linear_with_few_rows_matches_the_formula() {
    // Up to 16 rows take the streaming path, more the packed gemm: both against a plain sum.
    let mut rng = Rng::new(40);
    for rows in [1, 3, 16, 17, 40] {
        let (inp, outp) = (37, 131);
        let x = randn_f32(&[rows, inp], &mut rng);
        let w = randn_f32(&[outp, inp], &mut rng);
        let b = randn_f32(&[outp], &mut rng);
        let y = cpu().linear(&x, &w, Some(&b)).unwrap().to_vec_f64();
        let (xd, wd, bd) = (x.to_vec_f64(), w.to_vec_f64(), b.to_vec_f64());
        for r in 0..rows {
            for n in 0..outp {
                let want: f64 = bd[n]
                    + (0..inp)
                        .map(|k| xd[r * inp + k] * wd[n * inp + k])
                        .sum::<f64>();
                assert!(
                    (y[r * outp + n] - want).abs() < 1e-4,
                    "rows {rows}: ({r}, {n})"
                );
            }
        }
    }
}
