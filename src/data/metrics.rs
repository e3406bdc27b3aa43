//! Classification metrics: accuracy, Matthews correlation, F1 of the positive class, macro-F1.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Accuracy,
    /// Matthews correlation (Gorodkin's multi-class form; the usual MCC for two classes).
    Mcc,
    /// F1 of class 1, the positive class of binary tasks (MRPC, QQP); meaningless for more classes.
    F1,
    /// Unweighted mean of the per-class F1 over the classes present in the gold labels or the
    /// predictions: a class absent from both is left out (as scikit-learn's `f1_score(average="macro")`
    /// does), not counted as an F1 of 0.
    MacroF1,
}

impl Metric {
    pub const ALL: [Metric; 4] = [Metric::Accuracy, Metric::Mcc, Metric::F1, Metric::MacroF1];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Mcc => "mcc",
            Metric::F1 => "f1",
            Metric::MacroF1 => "macro_f1",
        }
    }

    pub fn compute(self, c: &Confusion) -> f64 {
        match self {
            Metric::Accuracy => c.accuracy(),
            Metric::Mcc => c.mcc(),
            Metric::F1 => c.f1(1),
            Metric::MacroF1 => {
                let seen: Vec<usize> = (0..c.classes)
                    .filter(|&k| c.gold_count(k) + c.predicted_count(k) > 0.0)
                    .collect();
                let sum: f64 = seen.iter().map(|&k| c.f1(k)).sum();
                ratio(sum, seen.len() as f64)
            }
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match Metric::ALL.into_iter().find(|m| m.name() == s) {
            Some(m) => Ok(m),
            None => bail!("unknown metric '{s}': expected accuracy, mcc, f1 or macro_f1"),
        }
    }
}

/// Counts of (gold, predicted) pairs.
#[derive(Clone, Debug, PartialEq)]
pub struct Confusion {
    classes: usize,
    /// `counts[gold * classes + predicted]`
    counts: Vec<u64>,
}

impl Confusion {
    pub fn new(gold: &[u32], predicted: &[u32], classes: usize) -> Result<Confusion> {
        ensure!(
            gold.len() == predicted.len(),
            "{} gold labels but {} predictions",
            gold.len(),
            predicted.len()
        );
        ensure!(
            classes >= 2,
            "metrics need at least 2 classes, got {classes}"
        );
        let mut counts = vec![0; classes * classes];
        for (&g, &p) in gold.iter().zip(predicted) {
            ensure!(
                (g as usize) < classes && (p as usize) < classes,
                "label {g} or prediction {p} is not below {classes}"
            );
            counts[g as usize * classes + p as usize] += 1;
        }
        Ok(Confusion { classes, counts })
    }

    fn total(&self) -> f64 {
        self.counts.iter().sum::<u64>() as f64
    }

    fn at(&self, gold: usize, predicted: usize) -> f64 {
        self.counts[gold * self.classes + predicted] as f64
    }

    fn gold_count(&self, k: usize) -> f64 {
        (0..self.classes).map(|p| self.at(k, p)).sum()
    }

    fn predicted_count(&self, k: usize) -> f64 {
        (0..self.classes).map(|g| self.at(g, k)).sum()
    }

    pub fn accuracy(&self) -> f64 {
        let correct: f64 = (0..self.classes).map(|k| self.at(k, k)).sum();
        ratio(correct, self.total())
    }

    /// F1 of class `k`; 0 when the class is neither present nor predicted.
    pub fn f1(&self, k: usize) -> f64 {
        let tp = self.at(k, k);
        ratio(2.0 * tp, self.gold_count(k) + self.predicted_count(k))
    }

    /// `(c·s − Σ p_k t_k) / √((s² − Σ p_k²)(s² − Σ t_k²))` with c correct, s samples, p_k predicted and
    /// t_k gold counts; 0 when a marginal is constant (as scikit-learn does).
    pub fn mcc(&self) -> f64 {
        let s = self.total();
        let c: f64 = (0..self.classes).map(|k| self.at(k, k)).sum();
        let (mut pt, mut pp, mut tt) = (0.0, 0.0, 0.0);
        for k in 0..self.classes {
            let (p, t) = (self.predicted_count(k), self.gold_count(k));
            pt += p * t;
            pp += p * p;
            tt += t * t;
        }
        let denom = ((s * s - pp) * (s * s - tt)).sqrt();
        ratio(c * s - pt, denom)
    }
}

fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// Every metric that means something for `classes` classes, by name, for reports: "f1" (of class 1)
/// only for two classes.
pub fn all_metrics(
    gold: &[u32],
    predicted: &[u32],
    classes: usize,
) -> Result<BTreeMap<String, f64>> {
    let c = Confusion::new(gold, predicted, classes)?;
    Ok(Metric::ALL
        .iter()
        .filter(|&&m| m != Metric::F1 || classes == 2)
        .map(|m| (m.name().to_string(), m.compute(&c)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn binary_case_by_hand() {
        // gold:      1 1 1 1 0 0 0 0 0 0
        // predicted: 1 1 1 0 1 0 0 0 0 0   → TP 3, FN 1, FP 1, TN 5
        let gold = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0];
        let pred = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0];
        let m = all_metrics(&gold, &pred, 2).unwrap();
        assert!(close(m["accuracy"], 0.8));
        assert!(close(m["f1"], 2.0 * 3.0 / (2.0 * 3.0 + 1.0 + 1.0)));
        // MCC = (TP·TN − FP·FN)/√((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (15 − 1)/√(4·4·6·6) = 14/24
        assert!(close(m["mcc"], 14.0 / 24.0));
        // class-0 F1 = 2·5/(2·5 + 1 + 1) = 10/12
        assert!(close(m["macro_f1"], (0.75 + 10.0 / 12.0) / 2.0));
    }

    #[test]
    fn three_classes_by_hand() {
        let gold = [0, 0, 1, 1, 2, 2];
        let pred = [0, 1, 1, 1, 2, 0];
        let c = Confusion::new(&gold, &pred, 3).unwrap();
        assert!(close(c.accuracy(), 4.0 / 6.0));
        // per-class F1: 0: 2·1/(2+2)=0.5, 1: 2·2/(2+3)=0.8, 2: 2·1/(2+1)=2/3
        assert!(close(
            Metric::MacroF1.compute(&c),
            (0.5 + 0.8 + 2.0 / 3.0) / 3.0
        ));
        // Gorodkin: c=4, s=6, p=(2,3,1), t=(2,2,2): (24 − 12)/√((36 − 14)(36 − 12))
        assert!(close(c.mcc(), 12.0 / (22.0f64 * 24.0).sqrt()));
        // F1 of class 1 says nothing about three classes: not reported.
        let m = all_metrics(&gold, &pred, 3).unwrap();
        let names: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(names, ["accuracy", "macro_f1", "mcc"]);
    }

    #[test]
    fn macro_f1_leaves_out_classes_never_seen() {
        // Class 2 is in neither gold nor predictions (a small dev split of a 3-class task):
        // scikit-learn's macro F1 averages over classes 0 and 1 only.
        let gold = [0, 0, 0, 1, 1];
        let pred = [0, 0, 1, 1, 1];
        let c = Confusion::new(&gold, &pred, 3).unwrap();
        // class 0: TP 2, 3 gold, 2 predicted: 4/5; class 1: TP 2, 2 gold, 3 predicted: 4/5.
        assert!(close(c.f1(0), 0.8) && close(c.f1(1), 0.8) && close(c.f1(2), 0.0));
        assert!(close(Metric::MacroF1.compute(&c), (0.8 + 0.8) / 2.0));
        // A class predicted but never gold counts (F1 0), as in scikit-learn.
        let c = Confusion::new(&gold, &[0, 0, 2, 1, 1], 3).unwrap();
        // class 0: 2·2/(3+2) = 0.8; class 1: 2·2/(2+2) = 1; class 2: 0.
        assert!(close(Metric::MacroF1.compute(&c), (0.8 + 1.0 + 0.0) / 3.0));
    }

    #[test]
    fn degenerate_cases_are_zero_not_nan() {
        let m = all_metrics(&[1, 1, 1], &[1, 1, 1], 2).unwrap();
        assert!(close(m["accuracy"], 1.0) && close(m["mcc"], 0.0) && close(m["f1"], 1.0));
        assert!(all_metrics(&[0, 2], &[0, 1], 2).is_err());
        assert!(all_metrics(&[0], &[0, 1], 2).is_err());
        assert_eq!("macro_f1".parse::<Metric>().unwrap(), Metric::MacroF1);
    }
}
