//! How well each label-free signal of `segadapt::adapt::signals` ranks candidate weights on a
//! target, against the ranking the target's labels give: for every target, every model's mIoU
//! on all its frames and its signals on the first N frames (what a run sees after a shift);
//! then per signal, Spearman's rank correlation with mIoU and what choosing by it would cost
//! against the best candidate and against the first model (the source).
//!
//! ```sh
//! cargo run --release --example signal_rank -- benches/suites/dev.toml dusk,fog 8 \
//!     models/camvid-day runs/suite/dusk-profile-seed0 runs/suite/fog-profile-seed0
//! ```

use candle_core::Device;
use segadapt::adapt::config::Judge;
use segadapt::adapt::signals::{judge, Signals};
use segadapt::data::{image_to_tensor, LabelMap};
use segadapt::model::weights::load_model_dir;
use segadapt::model::Segformer;
use segadapt::suite::{SuiteFile, Target};
use std::path::Path;

/// Each judge, and agreement with the source (how far the weights moved, not a quality).
const SIGNALS: [(&str, Option<Judge>); 6] = [
    ("confidence", Some(Judge::Confidence)),
    ("certainty", Some(Judge::Certainty)),
    ("flip", Some(Judge::Flip)),
    ("consensus", Some(Judge::Consensus)),
    ("prior", Some(Judge::Prior)),
    ("source", None),
];

fn value(j: Option<Judge>, s: &Signals) -> f64 {
    j.map_or(s.source, |j| j.of(s))
}

fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    for (rank, &i) in idx.iter().enumerate() {
        r[i] = rank as f64;
    }
    r
}

fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let d2: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [suite, names, n, models @ ..] = args.as_slice() else {
        anyhow::bail!("usage: signal_rank SUITE.toml TARGET[,TARGET...] N SOURCE_MODEL MODEL...");
    };
    let n: usize = n.parse()?;
    let dev = Device::Cpu;
    let mut loaded = Vec::new();
    for m in models {
        let f = load_model_dir(Path::new(m), &dev)?;
        loaded.push((
            m.clone(),
            Segformer::new(&f.config, f.tensors)?,
            f.preprocess,
        ));
    }
    let pre = loaded[0].2.clone();
    let prior: Vec<f32> = segadapt::stats::SourceStats::load(Path::new(&models[0]), &dev)?
        .prior
        .to_vec1()?;
    let classes = loaded[0].1.cfg.class_names();
    let map = LabelMap::identity(&classes, loaded[0].1.cfg.ignore_label());
    let suite = SuiteFile::load(Path::new(suite))?;
    let mut totals = vec![(0.0, 0.0, 0.0); SIGNALS.len()];
    let mut targets = 0.0;
    for name in names.split(',') {
        let target = Target::open(
            suite.target(name)?,
            suite.fps,
            None,
            (&classes, map.ignore[0]),
        )?;
        let frames = &target.sets[0];
        let miou: Vec<f64> = loaded
            .iter()
            .map(|(_, m, _)| Ok(segadapt::eval::evaluate(m, &pre, frames, &map, &dev)?.miou))
            .collect::<anyhow::Result<_>>()?;
        let xs = frames
            .iter()
            .take(n)
            .map(|e| image_to_tensor(&e.image, &pre, &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let refs: Vec<&Segformer> = loaded.iter().map(|(_, m, _)| m).collect();
        let sig = judge(&refs, &xs, &prior)?;
        println!(
            "\n{name} ({} frames scored, signals on the first {})",
            frames.len(),
            xs.len()
        );
        println!(
            "{:<44} {:>7} {:>10} {:>9} {:>6} {:>9} {:>7} {:>6}",
            "model", "mIoU", "confidence", "certainty", "flip", "consensus", "prior", "source"
        );
        for ((m, _, _), (s, v)) in loaded.iter().zip(sig.iter().zip(&miou)) {
            println!(
                "{m:<44} {v:>7.2} {:>10.4} {:>9.4} {:>6.4} {:>9.4} {:>7.4} {:>6.4}",
                s.confidence, s.certainty, s.flip, s.consensus, s.prior, s.source
            );
        }
        let best = miou.iter().cloned().fold(f64::MIN, f64::max);
        targets += 1.0;
        for ((label, f), t) in SIGNALS.iter().zip(&mut totals) {
            let v: Vec<f64> = sig.iter().map(|s| value(*f, s)).collect();
            let pick = (0..v.len())
                .max_by(|&a, &b| v[a].total_cmp(&v[b]))
                .expect("models");
            let rho = spearman(&v, &miou);
            println!(
                "  {label:<10} spearman {rho:+.2}  picks {:<44} {:+.2} vs best, {:+.2} vs source",
                loaded[pick].0,
                miou[pick] - best,
                miou[pick] - miou[0]
            );
            *t = (
                t.0 + rho,
                t.1 + miou[pick] - best,
                t.2 + miou[pick] - miou[0],
            );
        }
    }
    println!("\nmeans over {targets} targets");
    for ((label, _), t) in SIGNALS.iter().zip(&totals) {
        println!(
            "  {label:<10} spearman {:+.2}  pick {:+.2} vs best, {:+.2} vs source",
            t.0 / targets,
            t.1 / targets,
            t.2 / targets
        );
    }
    Ok(())
}
