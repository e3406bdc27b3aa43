//! Distillation and retrieval ops: values against plain reference formulas, gradients against
//! central finite differences in f64, and the f32 SIMD path against f64.

mod common;

use common::{check_gradient, max_abs_diff, randn};
use kdx::backend::head_kl::{head_kl, HeadInput};
use kdx::backend::{
    backend, Backend, KlDirection, KlTerms, PerRow, Sampling, SoftmaxKl, Teacher, IGNORE_INDEX,
};
use kdx::model::params::Rng;
use kdx::{DType, Device, Tensor};

fn cpu() -> &'static dyn Backend {
    backend(Device::Cpu).unwrap()
}

/// Row-wise log-softmax of `x/τ_r`, in f64.
fn log_softmax_rows(x: &[f64], classes: usize, tau: impl Fn(usize) -> f64) -> Vec<Vec<f64>> {
    x.chunks(classes)
        .enumerate()
        .map(|(r, row)| {
            let m = row.iter().cloned().fold(f64::MIN, f64::max) / tau(r);
            let z = row.iter().map(|v| (v / tau(r) - m).exp()).sum::<f64>().ln() + m;
            row.iter().map(|v| v / tau(r) - z).collect()
        })
        .collect()
}

/// The general softmax-KL loss written out naively in f64: per-row losses and their mean.
fn naive_softmax_kl(student: &Tensor, spec: &SoftmaxKl) -> (Vec<f64>, f64) {
    let (rows, classes) = student.rows_cols();
    let tau = |r: usize| spec.terms.temperature.get(r) as f64;
    let ls = log_softmax_rows(&student.to_vec_f64(), classes, tau);
    let l1 = log_softmax_rows(&student.to_vec_f64(), classes, |_| 1.0);
    let lt: Vec<Vec<f64>> = match spec.teacher {
        Teacher::Logits(t) => log_softmax_rows(&t.to_vec_f64(), classes, tau),
        Teacher::Probs(p) => p
            .to_vec_f64()
            .chunks(classes)
            .map(|row| row.iter().map(|v| v.ln()).collect())
            .collect(),
    };
    let mut losses = vec![0.0; rows];
    let mut counted = 0;
    for r in 0..rows {
        let label = spec.terms.labels.map(|l| l[r]);
        if label == Some(IGNORE_INDEX) {
            continue;
        }
        counted += 1;
        let kl: f64 = (0..classes)
            .map(|c| match spec.terms.direction {
                KlDirection::TeacherStudent if lt[r][c].is_finite() => {
                    lt[r][c].exp() * (lt[r][c] - ls[r][c])
                }
                KlDirection::TeacherStudent => 0.0,
                KlDirection::StudentTeacher => ls[r][c].exp() * (ls[r][c] - lt[r][c]),
            })
            .sum();
        let ce = label.map_or(0.0, |y| -l1[r][y as usize]);
        losses[r] = spec.terms.ce_weight.get(r) as f64 * ce
            + spec.terms.kl_weight.get(r) as f64 * tau(r) * tau(r) * kl;
    }
    let mean = losses.iter().sum::<f64>() / counted as f64;
    (losses, mean)
}

/// Rows of probabilities (softmax of random logits), some entries exactly zero.
fn random_probs(rows: usize, classes: usize, rng: &mut Rng) -> Tensor {
    let z = randn(&[rows, classes], rng).to_vec_f64();
    let mut p = Vec::with_capacity(z.len());
    for row in z.chunks(classes) {
        let e: Vec<f64> = row.iter().map(|v| (2.0 * v).exp()).collect();
        let total: f64 = e.iter().sum();
        p.extend(e.iter().map(|v| v / total));
    }
    Tensor::from_vec(p, &[rows, classes]).unwrap()
}

#[test]
fn softmax_kl_every_variant_matches_the_formula_and_finite_differences() {
    let mut rng = Rng::new(61);
    let (rows, classes) = (6, 13);
    let s = randn(&[rows, classes], &mut rng);
    let t_logits = randn(&[rows, classes], &mut rng);
    let t_probs = random_probs(rows, classes, &mut rng);
    let labels = [3u32, IGNORE_INDEX, 0, 12, 7, 7];
    let taus = [0.5f32, 1.0, 2.0, 3.5, 1.7, 0.9];
    let weights = [0.3f32, 0.9, 0.0, 1.0, 0.55, 2.0];
    let ce_weights = [0.7f32, 0.1, 1.0, 0.0, 0.45, 0.25];
    for direction in [KlDirection::TeacherStudent, KlDirection::StudentTeacher] {
        for (teacher, name) in [
            (Teacher::Logits(&t_logits), "logits"),
            (Teacher::Probs(&t_probs), "probs"),
        ] {
            for with_labels in [true, false] {
                let spec = SoftmaxKl {
                    teacher,
                    terms: KlTerms {
                        temperature: PerRow::Each(&taus),
                        kl_weight: PerRow::Each(&weights),
                        direction,
                        labels: with_labels.then_some(&labels[..]),
                        ce_weight: if with_labels {
                            PerRow::Each(&ce_weights)
                        } else {
                            PerRow::Same(0.0)
                        },
                    },
                };
                let what = format!("{direction:?}, teacher {name}, labels {with_labels}");
                let (loss, grad) = cpu().softmax_kl(&s, &spec).unwrap();
                let (want_rows, want_mean) = naive_softmax_kl(&s, &spec);
                assert!(
                    (loss.mean - want_mean).abs() < 1e-12,
                    "{what}: {} vs {want_mean}",
                    loss.mean
                );
                for (got, want) in loss.rows.iter().zip(&want_rows) {
                    assert!(
                        (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                        "{what}: row {got} vs {want}"
                    );
                }
                check_gradient(
                    &what,
                    &s,
                    &grad,
                    |v| cpu().softmax_kl(v, &spec).unwrap().0.mean,
                    1e-6,
                    1e-9,
                );
                if with_labels {
                    // An ignored row neither gets a gradient nor a loss.
                    let g = grad.to_vec_f64();
                    assert!(
                        g[classes..2 * classes].iter().all(|&v| v == 0.0) && loss.rows[1] == 0.0
                    );
                }
            }
        }
    }
}

#[test]
fn softmax_kl_teacher_probs_equal_softened_teacher_logits() {
    let mut rng = Rng::new(62);
    let (rows, classes) = (9, 40);
    let s = randn(&[rows, classes], &mut rng);
    let t = randn(&[rows, classes], &mut rng);
    let tau = 2.0;
    let probs: Vec<f64> = log_softmax_rows(&t.to_vec_f64(), classes, |_| tau as f64)
        .into_iter()
        .flatten()
        .map(f64::exp)
        .collect();
    let probs = Tensor::from_vec(probs, &[rows, classes]).unwrap();
    for direction in [KlDirection::TeacherStudent, KlDirection::StudentTeacher] {
        let spec = |teacher| SoftmaxKl {
            teacher,
            terms: KlTerms {
                temperature: PerRow::Same(tau),
                kl_weight: PerRow::Same(1.0),
                direction,
                labels: None,
                ce_weight: PerRow::Same(0.0),
            },
        };
        let (a, ga) = cpu().softmax_kl(&s, &spec(Teacher::Logits(&t))).unwrap();
        let (b, gb) = cpu().softmax_kl(&s, &spec(Teacher::Probs(&probs))).unwrap();
        assert!(
            (a.mean - b.mean).abs() < 1e-12 && max_abs_diff(&ga, &gb) < 1e-14,
            "{direction:?}"
        );
    }
}

#[test]
fn softmax_kl_f32_matches_f64_at_awkward_and_vocabulary_shapes() {
    let mut rng = Rng::new(63);
    for (rows, classes) in [(3 * 47, 31), (256, 2), (141, 3), (5, 49152), (2, 128256)] {
        let s = randn(&[rows, classes], &mut rng)
            .to_dtype(DType::F32)
            .unwrap();
        let t = randn(&[rows, classes], &mut rng)
            .to_dtype(DType::F32)
            .unwrap();
        let labels: Vec<u32> = (0..rows)
            .map(|r| {
                if r % 5 == 4 {
                    IGNORE_INDEX
                } else {
                    (r * 7919 % classes) as u32
                }
            })
            .collect();
        let taus: Vec<f32> = (0..rows).map(|r| 0.5 + (r % 7) as f32 * 0.4).collect();
        for direction in [KlDirection::TeacherStudent, KlDirection::StudentTeacher] {
            let spec = |t_| SoftmaxKl {
                teacher: Teacher::Logits(t_),
                terms: KlTerms {
                    temperature: PerRow::Each(&taus),
                    kl_weight: PerRow::Same(0.8),
                    direction,
                    labels: Some(&labels),
                    ce_weight: PerRow::Same(0.2),
                },
            };
            let (l32, g32) = cpu().softmax_kl(&s, &spec(&t)).unwrap();
            let (s64, t64) = (
                s.to_dtype(DType::F64).unwrap(),
                t.to_dtype(DType::F64).unwrap(),
            );
            let (_, want) = naive_softmax_kl(&s64, &spec(&t64));
            let (_, g64) = cpu().softmax_kl(&s64, &spec(&t64)).unwrap();
            let what = format!("{rows}x{classes} {direction:?}");
            assert!(
                (l32.mean - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{what}: {} vs {want}",
                l32.mean
            );
            // Gradients are O(1/rows); compare against the largest.
            let scale = g64.to_vec_f64().iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&g32.to_dtype(DType::F64).unwrap(), &g64);
            assert!(
                diff <= 2e-5 * scale,
                "{what}: gradient differs by {diff:e} (scale {scale:e})"
            );
        }
    }
}

#[test]
fn softmax_kl_is_safe_for_logits_of_any_magnitude() {
    let mut rng = Rng::new(64);
    let (rows, classes) = (4, 50);
    let base = randn(&[rows, classes], &mut rng).to_vec_f64();
    let t = randn(&[rows, classes], &mut rng).to_vec_f64();
    for magnitude in [1e-3, 1.0, 1e3, 1e5] {
        let big = |v: &[f64]| {
            Tensor::from_vec(
                v.iter().map(|x| x * magnitude).collect::<Vec<f64>>(),
                &[rows, classes],
            )
            .unwrap()
        };
        let (s64, t64) = (big(&base), big(&t));
        let (s32, t32) = (
            s64.to_dtype(DType::F32).unwrap(),
            t64.to_dtype(DType::F32).unwrap(),
        );
        let spec = |t_| SoftmaxKl {
            teacher: Teacher::Logits(t_),
            terms: KlTerms {
                temperature: PerRow::Same(2.0),
                kl_weight: PerRow::Same(0.5),
                direction: KlDirection::TeacherStudent,
                labels: Some(&[1, 2, 3, 4]),
                ce_weight: PerRow::Same(0.5),
            },
        };
        let (_, want) = naive_softmax_kl(&s64, &spec(&t64));
        let (got, grad) = cpu().softmax_kl(&s32, &spec(&t32)).unwrap();
        assert!(
            got.mean.is_finite() && grad.to_vec_f64().iter().all(|g| g.is_finite()),
            "magnitude {magnitude}"
        );
        assert!(
            (got.mean - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "magnitude {magnitude}: {} vs {want}",
            got.mean
        );
    }
}

#[test]
fn softmax_kl_rejects_bad_settings() {
    let mut rng = Rng::new(65);
    let s = randn(&[3, 4], &mut rng);
    let t = randn(&[3, 4], &mut rng);
    let ok = SoftmaxKl {
        teacher: Teacher::Logits(&t),
        terms: KlTerms {
            temperature: PerRow::Same(1.0),
            kl_weight: PerRow::Same(1.0),
            direction: KlDirection::TeacherStudent,
            labels: Some(&[0, 1, 2]),
            ce_weight: PerRow::Same(0.5),
        },
    };
    let err = |change: &dyn Fn(&mut KlTerms)| {
        let mut spec = ok;
        change(&mut spec.terms);
        cpu().softmax_kl(&s, &spec).unwrap_err().to_string()
    };
    assert!(err(&|t| t.temperature = PerRow::Same(0.0)).contains("temperature"));
    assert!(err(&|t| t.temperature = PerRow::Each(&[1.0, 2.0]))
        .contains("2 temperature values for 3 rows"));
    assert!(err(&|t| t.kl_weight = PerRow::Each(&[1.0, f32::NAN, 1.0])).contains("row 1"));
    assert!(err(&|t| t.labels = Some(&[0, 4, 1])).contains("label 4 of row 1"));
    assert!(err(&|t| t.labels = None).contains("needs labels"));
    let wide = randn(&[3, 5], &mut rng);
    let wrong_teacher = SoftmaxKl {
        teacher: Teacher::Logits(&wide),
        ..ok
    };
    let message = cpu()
        .softmax_kl(&s, &wrong_teacher)
        .unwrap_err()
        .to_string();
    assert!(message.contains("shapes differ"), "{message}");
    // Every row ignored: a zero loss and gradient, not a NaN.
    let mut all_ignored = ok;
    all_ignored.terms.labels = Some(&[IGNORE_INDEX; 3]);
    let (loss, grad) = cpu().softmax_kl(&s, &all_ignored).unwrap();
    assert!(loss.mean == 0.0 && grad.to_vec_f64().iter().all(|&g| g == 0.0));
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

/// Exact top-k by a full sort (score descending, then index ascending).
fn sorted_topk(keys: &[f32], queries: &[f32], d: usize, k: usize) -> Vec<Vec<(u32, f32)>> {
    queries
        .chunks(d)
        .map(|q| {
            let norm = q.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() as f32;
            let mut all: Vec<(u32, f32)> = keys
                .chunks(d)
                .enumerate()
                .map(|(i, key)| {
                    (
                        i as u32,
                        key.iter().zip(q).map(|(a, b)| a * b / norm).sum::<f32>(),
                    )
                })
                .collect();
            all.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
            all.truncate(k);
            all
        })
        .collect()
}

fn unit_rows(n: usize, d: usize, rng: &mut Rng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
    for row in v.chunks_mut(d) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

#[test]
fn cosine_topk_matches_a_full_sort_with_ties_and_chunks() {
    let mut rng = Rng::new(3);
    let (n, d, q) = (3001, 31, 5);
    let mut keys = unit_rows(n, d, &mut rng);
    // Exact duplicates make ties: key 2900 equals key 17, key 2000 equals key 5.
    keys.copy_within(17 * d..18 * d, 2900 * d);
    keys.copy_within(5 * d..6 * d, 2000 * d);
    let mut queries: Vec<f32> = (0..q * d).map(|_| rng.normal()).collect();
    queries[..d].copy_from_slice(&keys[17 * d..18 * d]); // query 0 ties keys 17 and 2900 at the top
    let kt = Tensor::from_vec(keys.clone(), &[n, d]).unwrap();
    let qt = Tensor::from_vec(queries.clone(), &[q, d]).unwrap();
    for k in [1, 16, 1024, 2000] {
        let (idx, scores) = cpu().cosine_topk(&kt, &qt, k).unwrap();
        let want = sorted_topk(&keys, &queries, d, k);
        for (qi, w) in want.iter().enumerate() {
            let got_idx = &idx[qi * k..(qi + 1) * k];
            // Scores agree to f32 rounding; the order is the exact one except among near-equal scores.
            for (r, &(wi, ws)) in w.iter().enumerate() {
                assert!(
                    (scores[qi * k + r] - ws).abs() < 1e-5,
                    "k={k} q={qi} rank {r}"
                );
                if r + 1 < w.len()
                    && (w[r + 1].1 - ws).abs() > 1e-5
                    && (r == 0 || (w[r - 1].1 - ws).abs() > 1e-5)
                {
                    assert_eq!(got_idx[r], wi, "k={k} q={qi} rank {r}");
                }
            }
        }
        // The exact tie at the top goes to the lower index.
        assert_eq!(&idx[..2.min(k)], &[17, 2900][..2.min(k)]);
    }
    // Streaming the keys in chunks gives the same answer.
    let mut best = kdx::backend::TopK::new(q, 16);
    for (c, chunk) in keys.chunks(700 * d).enumerate() {
        let t = Tensor::from_vec(chunk.to_vec(), &[chunk.len() / d, d]).unwrap();
        cpu()
            .cosine_topk_update(&t, c * 700, &qt, &mut best)
            .unwrap();
    }
    assert_eq!(best.into_sorted(), cpu().cosine_topk(&kt, &qt, 16).unwrap());
    assert!(cpu().cosine_topk(&kt, &qt, n + 1).is_err());
}

#[test]
fn cosine_topk_reads_half_precision_keys() {
    let mut rng = Rng::new(4);
    let (n, d) = (500, 64);
    let keys = Tensor::from_vec(unit_rows(n, d, &mut rng), &[n, d]).unwrap();
    let queries = Tensor::from_vec(unit_rows(3, d, &mut rng), &[3, d]).unwrap();
    let (want, _) = cpu().cosine_topk(&keys, &queries, 8).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let (got, scores) = cpu()
            .cosine_topk(&keys.to_dtype(dtype).unwrap(), &queries, 8)
            .unwrap();
        // Rounding the keys may swap near-equal neighbours, never the best key.
        assert_eq!(
            got.chunks(8).map(|c| c[0]).collect::<Vec<_>>(),
            want.chunks(8).map(|c| c[0]).collect::<Vec<_>>()
        );
        assert!(scores
            .windows(2)
            .enumerate()
            .all(|(i, w)| (i + 1) % 8 == 0 || w[0] >= w[1]));
    }
}

/// The exact nucleus distribution of one row of logits (methods: temperature, top-k, top-p).
fn nucleus(z: &[f32], temperature: f64, top_k: usize, top_p: f64) -> Vec<f64> {
    let e: Vec<f64> = z.iter().map(|&v| (v as f64 / temperature).exp()).collect();
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| e[b].partial_cmp(&e[a]).unwrap().then(a.cmp(&b)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let kept: f64 = order.iter().map(|&i| e[i]).sum();
    let (mut mass, mut n) = (0.0, 0);
    for &i in &order {
        mass += e[i];
        n += 1;
        if mass >= top_p * kept {
            break;
        }
    }
    let mut p = vec![0.0; z.len()];
    for &i in &order[..n] {
        p[i] = e[i] / mass;
    }
    p
}

#[test]
fn nucleus_sampling_draws_the_exact_distribution() {
    let mut rng = Rng::new(5);
    let vocab = 12;
    let z: Vec<f32> = (0..vocab).map(|_| 1.5 * rng.normal()).collect();
    let draws = 40_000;
    let logits = Tensor::from_vec(
        z.iter()
            .copied()
            .cycle()
            .take(draws * vocab)
            .collect::<Vec<f32>>(),
        &[draws, vocab],
    )
    .unwrap();
    for (temperature, top_k, top_p) in [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 5, 0.95), (1.0, 3, 1.0)]
    {
        let s = Sampling {
            temperature,
            top_k,
            top_p,
            seed: 11,
        };
        let tokens = cpu().sample(&logits, &s, 0).unwrap();
        let mut counts = vec![0usize; vocab];
        tokens.iter().for_each(|&t| counts[t as usize] += 1);
        let p = nucleus(&z, temperature as f64, top_k, top_p as f64);
        // Tokens outside the nucleus never appear; inside, a chi-square test at the 0.1% level.
        let mut chi2 = 0.0;
        let mut df = 0;
        for (c, &pi) in counts.iter().zip(&p) {
            if pi == 0.0 {
                assert_eq!(*c, 0, "{s:?}: a token outside the nucleus was drawn");
            } else {
                let expected = pi * draws as f64;
                chi2 += (*c as f64 - expected).powi(2) / expected;
                df += 1;
            }
        }
        // 0.999 quantiles of chi-square with df − 1 degrees of freedom (df ≤ 12).
        let critical = [
            0.0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59, 31.26,
        ][df - 1];
        assert!(
            df == 1 || chi2 < critical,
            "{s:?}: chi-square {chi2:.1} with {} df",
            df - 1
        );
        // Seeded: the same step repeats, another step differs.
        assert_eq!(tokens, cpu().sample(&logits, &s, 0).unwrap());
        if df > 1 {
            assert_ne!(tokens, cpu().sample(&logits, &s, 1).unwrap());
        }
    }
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    let best = z
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.partial_cmp(b.1).unwrap())
        .unwrap()
        .0 as u32;
    assert!(cpu()
        .sample(&logits, &greedy, 3)
        .unwrap()
        .iter()
        .all(|&t| t == best));
    assert!(cpu()
        .sample(
            &logits,
            &Sampling {
                top_p: 0.0,
                ..greedy
            },
            0
        )
        .is_err());
}

#[test]
fn fused_head_kl_matches_the_unfused_loss_at_every_chunk_size() {
    let mut rng = Rng::new(66);
    let (rows, width, teacher_width, vocab) = (7, 5, 6, 11);
    let hidden = randn(&[rows, width], &mut rng);
    let weight = randn(&[vocab, width], &mut rng);
    let t_hidden = randn(&[rows, teacher_width], &mut rng);
    let t_weight = randn(&[vocab, teacher_width], &mut rng);
    let labels = [3u32, IGNORE_INDEX, 0, 10, 7, IGNORE_INDEX, 1];
    let taus = [0.5f32, 1.0, 2.0, 3.5, 1.7, 0.9, 1.2];
    let terms = KlTerms {
        temperature: PerRow::Each(&taus),
        kl_weight: PerRow::Same(0.8),
        direction: KlDirection::TeacherStudent,
        labels: Some(&labels),
        ce_weight: PerRow::Same(0.3),
    };
    let student = HeadInput {
        hidden: &hidden,
        weight: &weight,
    };
    let teacher = HeadInput {
        hidden: &t_hidden,
        weight: &t_weight,
    };
    // Unfused reference: whole logits, the loss, then the head's backward.
    let logits = cpu().linear(&hidden, &weight, None).unwrap();
    let t_logits = cpu().linear(&t_hidden, &t_weight, None).unwrap();
    let spec = SoftmaxKl {
        teacher: Teacher::Logits(&t_logits),
        terms,
    };
    let (want, d_logits) = cpu().softmax_kl(&logits, &spec).unwrap();
    let mut want_dw = weight.zeros_like();
    let want_dh = cpu()
        .linear_backward(&d_logits, &hidden, &weight, &mut want_dw, None)
        .unwrap();
    // Chunks are reweighted by an f32 factor (the backends' `scale`): equal to about 1e-8.
    for chunk in [1, 3, 4, 7, 100] {
        let mut dw = weight.zeros_like();
        let (got, dh) = head_kl(cpu(), student, teacher, &terms, chunk, Some(&mut dw)).unwrap();
        assert!(
            (got.mean - want.mean).abs() < 1e-12,
            "chunk {chunk}: {} vs {}",
            got.mean,
            want.mean
        );
        assert_eq!(got.rows.len(), rows);
        assert!(got
            .rows
            .iter()
            .zip(&want.rows)
            .all(|(a, b)| (a - b).abs() < 1e-12));
        assert!(
            max_abs_diff(&dh, &want_dh) < 1e-7,
            "chunk {chunk}: hidden gradient"
        );
        assert!(
            max_abs_diff(&dw, &want_dw) < 1e-7,
            "chunk {chunk}: head gradient"
        );
    }
    // And against finite differences, through the fused path itself; a frozen head is skipped.
    let loss_of = |h: &Tensor, w: &Tensor| {
        let s = HeadInput {
            hidden: h,
            weight: w,
        };
        head_kl(cpu(), s, teacher, &terms, 3, None).unwrap().0.mean
    };
    let (_, dh) = head_kl(cpu(), student, teacher, &terms, 3, None).unwrap();
    check_gradient(
        "fused head: hidden",
        &hidden,
        &dh,
        |h| loss_of(h, &weight),
        1e-6,
        1e-9,
    );
    let mut dw = weight.zeros_like();
    head_kl(cpu(), student, teacher, &terms, 3, Some(&mut dw)).unwrap();
    check_gradient(
        "fused head: weight",
        &weight,
        &dw,
        |w| loss_of(&hidden, w),
        1e-6,
        1e-9,
    );
}
