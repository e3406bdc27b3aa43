//! Causal grouped-query attention with a deep-prompt prefix: values against a naive f64 formula,
//! gradients (queries, keys, values, prefix) against central finite differences, decoding one
//! position against a cache equal to the same row of a full prefill, and bad shapes.

mod common;

use common::{check_gradient, max_abs_diff, randn, weighted_sum};
use kdx::backend::{backend, Backend, CausalShape, Prefix};
use kdx::model::params::Rng;
use kdx::{DType, Device, Tensor};

fn cpu() -> &'static dyn Backend {
    backend(Device::Cpu).unwrap()
}

/// The attention written out per (sequence, head, query) in f64.
fn naive(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefix: Option<(&Tensor, &Tensor)>,
    s: CausalShape,
    q_start: &[u32],
) -> Vec<f64> {
    let d = q.rows_cols().1 / s.heads;
    let (qd, kd, vd) = (q.to_vec_f64(), k.to_vec_f64(), v.to_vec_f64());
    let (pk, pv) = prefix.map_or((vec![], vec![]), |(a, b)| (a.to_vec_f64(), b.to_vec_f64()));
    let np = pk.len() / (s.kv_heads * d).max(1);
    let (qw, kvw) = (s.heads * d, s.kv_heads * d);
    let mut out = vec![0.0; qd.len()];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let g = h / (s.heads / s.kv_heads);
            for i in 0..s.q_len {
                let qrow = &qd[(b * s.q_len + i) * qw + h * d..][..d];
                // (score, value row) of every visible key: prefix first, then positions 0..=start+i.
                let mut keys: Vec<(f64, Vec<f64>)> = Vec::new();
                for j in 0..np {
                    let kr = &pk[j * kvw + g * d..][..d];
                    let dotp: f64 = qrow.iter().zip(kr).map(|(a, b)| a * b).sum();
                    keys.push((dotp, pv[j * kvw + g * d..][..d].to_vec()));
                }
                for j in 0..=(q_start[b] as usize + i) {
                    let kr = &kd[(b * s.kv_len + j) * kvw + g * d..][..d];
                    let dotp: f64 = qrow.iter().zip(kr).map(|(a, b)| a * b).sum();
                    keys.push((dotp, vd[(b * s.kv_len + j) * kvw + g * d..][..d].to_vec()));
                }
                let scale = 1.0 / (d as f64).sqrt();
                let m = keys.iter().map(|k| k.0 * scale).fold(f64::MIN, f64::max);
                let z: f64 = keys.iter().map(|k| (k.0 * scale - m).exp()).sum();
                for (score, val) in &keys {
                    let p = (score * scale - m).exp() / z;
                    for c in 0..d {
                        out[(b * s.q_len + i) * qw + h * d + c] += p * val[c];
                    }
                }
            }
        }
    }
    out
}

struct Case {
    s: CausalShape,
    q_start: Vec<u32>,
    head_dim: usize,
    prefix: usize,
}

fn inputs(c: &Case, rng: &mut Rng) -> [Tensor; 5] {
    let (s, d) = (c.s, c.head_dim);
    [
        randn(&[s.batch * s.q_len, s.heads * d], rng),
        randn(&[s.batch * s.kv_len, s.kv_heads * d], rng),
        randn(&[s.batch * s.kv_len, s.kv_heads * d], rng),
        randn(&[c.prefix, s.kv_heads * d], rng),
        randn(&[c.prefix, s.kv_heads * d], rng),
    ]
}

fn cases() -> Vec<Case> {
    let shape = |batch, q_len, kv_len, heads, kv_heads| CausalShape {
        batch,
        q_len,
        kv_len,
        heads,
        kv_heads,
    };
    vec![
        // Prefill with a prefix, 2 query heads per key/value head.
        Case {
            s: shape(2, 3, 3, 4, 2),
            q_start: vec![0, 0],
            head_dim: 3,
            prefix: 2,
        },
        // Prefill without a prefix, multi-query (every head shares one key/value head).
        Case {
            s: shape(2, 4, 4, 3, 1),
            q_start: vec![0, 0],
            head_dim: 2,
            prefix: 0,
        },
        // One decoding step per sequence against a cache, sequences at different positions.
        Case {
            s: shape(3, 1, 5, 2, 2),
            q_start: vec![0, 2, 4],
            head_dim: 3,
            prefix: 3,
        },
        // Two new tokens per sequence (speculative-style), offset.
        Case {
            s: shape(2, 2, 4, 2, 1),
            q_start: vec![1, 2],
            head_dim: 2,
            prefix: 1,
        },
    ]
}

#[test]
fn forward_matches_the_naive_formula() {
    let mut rng = Rng::new(71);
    for (n, c) in cases().iter().enumerate() {
        let [q, k, v, pk, pv] = inputs(c, &mut rng);
        let prefix = (c.prefix > 0).then_some(Prefix {
            keys: &pk,
            values: &pv,
        });
        let (out, probs) = cpu()
            .causal_attention(&q, &k, &v, prefix, c.s, &c.q_start)
            .unwrap();
        let want = naive(
            &q,
            &k,
            &v,
            (c.prefix > 0).then_some((&pk, &pv)),
            c.s,
            &c.q_start,
        );
        let err = out
            .to_vec_f64()
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "case {n}: max error {err}");
        // Every probability row sums to one over what it may see, and is zero beyond.
        let row = c.prefix + c.s.kv_len;
        for (r, p) in probs.to_vec_f64().chunks(row).enumerate() {
            let (b, i) = (r / (c.s.heads * c.s.q_len), r % c.s.q_len);
            let seen = c.prefix + c.q_start[b] as usize + i + 1;
            assert!(
                (p[..seen].iter().sum::<f64>() - 1.0).abs() < 1e-12,
                "case {n} row {r}"
            );
            assert!(
                p[seen..].iter().all(|&x| x == 0.0),
                "case {n} row {r}: masked keys"
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(72);
    for (n, c) in cases().iter().enumerate() {
        let [q, k, v, pk, pv] = inputs(c, &mut rng);
        let w = randn(q.shape(), &mut rng);
        let has_prefix = c.prefix > 0;
        let loss = |q: &Tensor, k: &Tensor, v: &Tensor, pk: &Tensor, pv: &Tensor| {
            let prefix = has_prefix.then_some(Prefix {
                keys: pk,
                values: pv,
            });
            weighted_sum(
                &cpu()
                    .causal_attention(q, k, v, prefix, c.s, &c.q_start)
                    .unwrap()
                    .0,
                &w,
            )
        };
        let prefix = has_prefix.then_some(Prefix {
            keys: &pk,
            values: &pv,
        });
        let (_, probs) = cpu()
            .causal_attention(&q, &k, &v, prefix, c.s, &c.q_start)
            .unwrap();
        let g = cpu()
            .causal_attention_backward(&w, &q, &k, &v, prefix, &probs, c.s, &c.q_start)
            .unwrap();
        let (rtol, atol) = (1e-6, 1e-9);
        check_gradient(
            &format!("case {n}: dq"),
            &q,
            &g.dq,
            |x| loss(x, &k, &v, &pk, &pv),
            rtol,
            atol,
        );
        check_gradient(
            &format!("case {n}: dk"),
            &k,
            &g.dk,
            |x| loss(&q, x, &v, &pk, &pv),
            rtol,
            atol,
        );
        check_gradient(
            &format!("case {n}: dv"),
            &v,
            &g.dv,
            |x| loss(&q, &k, x, &pk, &pv),
            rtol,
            atol,
        );
        match g.dprefix {
            Some((dpk, dpv)) => {
                assert!(has_prefix);
                check_gradient(
                    &format!("case {n}: dprefix k"),
                    &pk,
                    &dpk,
                    |x| loss(&q, &k, &v, x, &pv),
                    rtol,
                    atol,
                );
                check_gradient(
                    &format!("case {n}: dprefix v"),
                    &pv,
                    &dpv,
                    |x| loss(&q, &k, &v, &pk, x),
                    rtol,
                    atol,
                );
            }
            None => assert!(!has_prefix, "case {n}: prefix gradients missing"),
        }
    }
}

#[test]
fn decoding_against_a_cache_equals_the_prefill_row() {
    let mut rng = Rng::new(73);
    let (t, heads, kv_heads, d, np) = (6, 4, 2, 8, 3);
    let prefill = CausalShape {
        batch: 1,
        q_len: t,
        kv_len: t,
        heads,
        kv_heads,
    };
    let c = Case {
        s: prefill,
        q_start: vec![0],
        head_dim: d,
        prefix: np,
    };
    let [q, k, v, pk, pv] = inputs(&c, &mut rng);
    let prefix = Some(Prefix {
        keys: &pk,
        values: &pv,
    });
    let (full, _) = cpu()
        .causal_attention(&q, &k, &v, prefix, prefill, &[0])
        .unwrap();
    // Query row 4 alone, against the same keys (the cache holds all 6; positions 5.. are not seen).
    let qw = heads * d;
    let q4 = Tensor::from_vec(q.to_vec_f64()[4 * qw..5 * qw].to_vec(), &[1, qw]).unwrap();
    let step = CausalShape {
        q_len: 1,
        ..prefill
    };
    let (one, _) = cpu()
        .causal_attention(&q4, &k, &v, prefix, step, &[4])
        .unwrap();
    let want = &full.to_vec_f64()[4 * qw..5 * qw];
    assert!(one
        .to_vec_f64()
        .iter()
        .zip(want)
        .all(|(a, b)| (a - b).abs() < 1e-13));
}

#[test]
fn f32_matches_f64_at_awkward_shapes() {
    let mut rng = Rng::new(74);
    let s = CausalShape {
        batch: 3,
        q_len: 47,
        kv_len: 47,
        heads: 9,
        kv_heads: 3,
    };
    let c = Case {
        s,
        q_start: vec![0; 3],
        head_dim: 31,
        prefix: 5,
    };
    let [q, k, v, pk, pv] = inputs(&c, &mut rng);
    let w = randn(q.shape(), &mut rng);
    let run = |dtype: DType| {
        let to = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (q, k, v, pk, pv, w) = (to(&q), to(&k), to(&v), to(&pk), to(&pv), to(&w));
        let prefix = Some(Prefix {
            keys: &pk,
            values: &pv,
        });
        let (out, probs) = cpu()
            .causal_attention(&q, &k, &v, prefix, s, &c.q_start)
            .unwrap();
        let g = cpu()
            .causal_attention_backward(&w, &q, &k, &v, prefix, &probs, s, &c.q_start)
            .unwrap();
        let (dpk, dpv) = g.dprefix.unwrap();
        [out, g.dq, g.dk, g.dv, dpk, dpv].map(|t| t.to_dtype(DType::F64).unwrap())
    };
    let (lo, hi) = (run(DType::F32), run(DType::F64));
    for (name, (a, b)) in ["out", "dq", "dk", "dv", "dprefix k", "dprefix v"]
        .iter()
        .zip(lo.iter().zip(&hi))
    {
        let scale = b.to_vec_f64().iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(a, b);
        assert!(diff <= 1e-5 * scale, "{name}: {diff:e} vs scale {scale:e}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let mut rng = Rng::new(75);
    let s = CausalShape {
        batch: 1,
        q_len: 2,
        kv_len: 2,
        heads: 3,
        kv_heads: 2,
    };
    let q = randn(&[2, 6], &mut rng);
    let k = randn(&[2, 4], &mut rng);
    let err = cpu()
        .causal_attention(&q, &k, &k, None, s, &[0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot share"), "{err}");
    let s = CausalShape { heads: 2, ..s };
    let q = randn(&[2, 4], &mut rng);
    let k = randn(&[2, 4], &mut rng);
    let err = cpu()
        .causal_attention(&q, &k, &k, None, s, &[1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("reach position 2 but only 2 keys"), "{err}");
    let bad = randn(&[3, 5], &mut rng);
    let err = cpu()
        .causal_attention(
            &q,
            &k,
            &k,
            Some(Prefix {
                keys: &bad,
                values: &bad,
            }),
            s,
            &[0],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefix keys"), "{err}");
}
