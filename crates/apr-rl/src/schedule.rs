//! Learning-rate schedules.

/// Linear warmup to `peak`, then cosine decay to `min` at `total` steps (the reference's
/// warmup-cosine, spec §4.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    /// Peak rate.
    pub peak: f64,
    /// Final rate.
    pub min: f64,
    /// Warmup steps.
    pub warmup: usize,
    /// Total steps.
    pub total: usize,
}

impl WarmupCosine {
    /// The rate of 0-based step `step`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        self.min + (self.peak - self.min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays_to_the_floor() {
        let s = WarmupCosine {
            peak: 5e-5,
            min: 5e-7,
            warmup: 10,
            total: 110,
        };
        assert!((s.lr(0) - 5e-6).abs() < 1e-12);
        assert!((s.lr(9) - 5e-5).abs() < 1e-12);
        assert!((s.lr(60) - (5e-7 + (5e-5 - 5e-7) * 0.5)).abs() < 1e-12);
        assert!((s.lr(110) - 5e-7).abs() < 1e-15);
        assert!(s.lr(30) > s.lr(31));
    }
}
