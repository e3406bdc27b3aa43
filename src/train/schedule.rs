//! Learning-rate schedule: linear warm-up to the peak, then linear decay to zero.

/// transformers' `get_linear_schedule_with_warmup`: update `k` (counting from 1) uses the factor
/// the scheduler has after `k − 1` steps: `s/warmup` while `s < warmup`, then `(total − s)/(total − warmup)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearSchedule {
    pub peak: f32,
    pub warmup: u64,
    pub total: u64,
}

impl LinearSchedule {
    /// The schedule for `total` updates with the first `warmup_ratio` of them warming up.
    pub fn new(peak: f32, warmup_ratio: f32, total: u64) -> LinearSchedule {
        // ceil(ratio · total) as transformers computes it in f64; the f32 ratio (0.1 is 0.100000001…)
        // is nudged down so an exact product such as 0.1 · 10 is not rounded up to 2.
        let exact = warmup_ratio as f64 * total as f64;
        LinearSchedule {
            peak,
            warmup: (exact * (1.0 - 1e-6)).ceil() as u64,
            total,
        }
    }

    /// Learning rate of update `k` (1-based).
    pub fn lr(&self, k: u64) -> f32 {
        let s = k.saturating_sub(1);
        let factor = if s < self.warmup {
            s as f64 / self.warmup as f64
        } else {
            (self.total.saturating_sub(s)) as f64 / (self.total - self.warmup).max(1) as f64
        };
        (self.peak as f64 * factor.max(0.0)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_like_transformers() {
        // total 10, warm-up 10% → 1 step: factors 0/1, then (10−1)/9, (10−2)/9, … (10−9)/9.
        let s = LinearSchedule::new(1.0, 0.1, 10);
        assert_eq!(s.warmup, 1);
        let lrs: Vec<f32> = (1..=10).map(|k| s.lr(k)).collect();
        let want = [
            0.0,
            1.0,
            8.0 / 9.0,
            7.0 / 9.0,
            6.0 / 9.0,
            5.0 / 9.0,
            4.0 / 9.0,
            3.0 / 9.0,
            2.0 / 9.0,
            1.0 / 9.0,
        ];
        for (got, want) in lrs.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "{lrs:?}");
        }
        let s = LinearSchedule::new(2e-5, 0.25, 8);
        assert_eq!((s.lr(1), s.lr(2), s.lr(3)), (0.0, 1e-5, 2e-5));
        assert!((s.lr(8) - 2e-5 / 6.0).abs() < 1e-12);
        assert_eq!(LinearSchedule::new(1.0, 0.0, 4).lr(1), 1.0);
    }
}
