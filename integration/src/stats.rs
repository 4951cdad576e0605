//! Order statistics for benchmark figures.

/// The `q`-quantile (0.0..=1.0) of `samples` by nearest rank; `None` when empty.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

/// Median (nearest rank, lower middle for even counts).
pub fn median(samples: &[f64]) -> Option<f64> {
    quantile(samples, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let s = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&s), Some(3.0));
        assert_eq!(quantile(&s, 0.9), Some(5.0));
        assert_eq!(quantile(&s, 0.0), Some(1.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(median(&ten), Some(5.0));
        assert_eq!(quantile(&ten, 0.9), Some(9.0));
        assert_eq!(median(&[]), None);
    }
}
