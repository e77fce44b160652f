//! CPSL's class-balanced Sinkhorn-Knopp: soft assignments of N pixel features to C prototypes
//! whose class marginals follow a prior r (the running target class distribution), not 1/C.

/// `scores`: [N, C] row-major similarities (cosine). Returns Q [N, C]: each row sums to 1, and
/// the columns sum towards N * prior[c] as iterations grow (CPSL runs 3, eps = 0.05).
pub fn balanced_assignment(
    scores: &[f32],
    n: usize,
    prior: &[f32],
    eps: f32,
    iters: usize,
) -> Vec<f32> {
    let c = prior.len();
    assert_eq!(scores.len(), n * c, "scores must be N x C");
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Q = exp(S / eps), normalised to sum 1 (the global max cancels out).
    let mut q: Vec<f64> = scores
        .iter()
        .map(|&s| (((s - max) / eps) as f64).exp())
        .collect();
    let total: f64 = q.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    q.iter_mut().for_each(|v| *v /= total);
    for _ in 0..iters {
        // Class rows: rescale so class k holds prior[k] of the mass.
        for k in 0..c {
            let s: f64 = (0..n).map(|i| q[i * c + k]).sum();
            let f = if s > 0.0 { prior[k] as f64 / s } else { 0.0 };
            (0..n).for_each(|i| q[i * c + k] *= f);
        }
        // Pixel columns: each pixel holds 1/N of the mass.
        for i in 0..n {
            let row = &mut q[i * c..(i + 1) * c];
            let s: f64 = row.iter().sum();
            let f = if s > 0.0 { 1.0 / (s * n as f64) } else { 0.0 };
            row.iter_mut().for_each(|v| *v *= f);
        }
    }
    q.into_iter().map(|v| (v * n as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(n: usize, c: usize) -> Vec<f32> {
        // Every pixel prefers class 0 a little: an unbalanced argmax.
        (0..n * c)
            .map(|i| {
                let (p, k) = (i / c, i % c);
                let wobble = ((p * 7 + k * 13) % 11) as f32 / 50.0;
                if k == 0 {
                    0.5 + wobble
                } else {
                    0.2 + wobble
                }
            })
            .collect()
    }

    #[test]
    fn class_marginals_match_the_prior() {
        let (n, prior) = (200, [0.5f32, 0.3, 0.15, 0.05]);
        let q = balanced_assignment(&scores(n, 4), n, &prior, 0.05, 200);
        for i in 0..n {
            let s: f32 = q[i * 4..(i + 1) * 4].iter().sum();
            assert!((s - 1.0).abs() < 1e-4, "pixel {i} sums to {s}");
        }
        for k in 0..4 {
            let col: f32 = (0..n).map(|i| q[i * 4 + k]).sum::<f32>() / n as f32;
            assert!(
                (col - prior[k]).abs() < 1e-3,
                "class {k}: {col} vs prior {}",
                prior[k]
            );
        }
    }

    #[test]
    fn three_iterations_move_the_marginals_towards_the_prior() {
        let (n, c) = (200, 4);
        let prior = [0.25f32; 4];
        let s = scores(n, c);
        let share0 = |q: &[f32]| (0..n).map(|i| q[i * c]).sum::<f32>() / n as f32;
        let plain = balanced_assignment(&s, n, &prior, 0.05, 0);
        let three = balanced_assignment(&s, n, &prior, 0.05, 3);
        assert!(
            share0(&plain) > 0.9,
            "softmax alone gives class 0 almost everything"
        );
        assert!((share0(&three) - 0.25).abs() < (share0(&plain) - 0.25).abs() / 2.0);
    }
}
