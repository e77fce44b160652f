//! The memory plan: every long-lived part's bytes against its share of the profile's budget,
//! with the training step's activation peak measured, and batch then crop shrunk until it fits.

use crate::adapt::AdaptConfig;
use crate::config::{Profile, SegformerConfig};
use crate::error::{Error, Result};
use serde::Serialize;

const MB: f64 = (1 << 20) as f64;

#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub name: &'static str,
    /// What the part holds, for the printed plan.
    pub holds: String,
    pub bytes: usize,
    /// The profile's share for this part.
    pub share: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub profile: String,
    pub parts: Vec<Part>,
    pub total: usize,
    pub budget: usize,
    /// The training batch and crop the plan settled on.
    pub batch: usize,
    pub crop: (usize, usize),
    /// What the planner changed to fit, in order.
    pub shrunk: Vec<String>,
}

/// What the planner needs measured: a training step's activation peak at (batch, crop), and
/// one serving forward's peak at the input size (bytes above what was live before).
pub trait Measure {
    fn step_peak(&mut self, batch: usize, crop: (usize, usize)) -> Result<usize>;
    fn serve_peak(&mut self) -> Result<usize>;
}

fn mb(b: usize) -> f64 {
    b as f64 / MB
}

fn share(v: f64) -> usize {
    (v * MB) as usize
}

/// The next smaller (batch, crop) to try: halve the batch, then shrink the crop by a quarter
/// (kept a multiple of 32, at least 64).
fn shrink(batch: usize, (w, h): (usize, usize)) -> Option<(usize, (usize, usize))> {
    if batch > 1 {
        return Some((batch / 2, (w, h)));
    }
    let f = |v: usize| ((v * 3 / 4) / 32 * 32).max(64);
    let next = (f(w), f(h));
    (next != (w, h)).then_some((1, next))
}

/// The plan for `model` (its source weights and statistics) adapting under `adapt`.
pub fn plan(
    profile: &Profile,
    model: &SegformerConfig,
    (source, stats): (&crate::model::TensorMap, &crate::stats::SourceStats),
    adapt: &AdaptConfig,
    measure: &mut dyn Measure,
) -> Result<Plan> {
    let mem = &profile.memory;
    let f32s = 4usize;
    let specs = crate::model::param_specs(model);
    let params: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let trainable: usize = specs
        .iter()
        .filter(|s| s.trainable && adapt.trains(&s.name))
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    let c = model.num_labels();
    let d = model.decoder_hidden_size;
    let copies = 3;

    // Activations: the largest (batch, crop) whose measured peak fits its share.
    let (mut batch, mut crop) = (
        profile.train.batch,
        (profile.train.crop_width, profile.train.crop_height),
    );
    let mut shrunk = Vec::new();
    let act_share = share(mem.activations_mb);
    let act = loop {
        let bytes = measure.step_peak(batch, crop)?;
        if bytes <= act_share {
            break bytes;
        }
        match shrink(batch, crop) {
            Some((b, cr)) => {
                shrunk.push(format!(
                    "batch {batch} crop {}x{} needs {:.0} MB of activations (share {:.0} MB): trying batch {b} crop {}x{}",
                    crop.0, crop.1, mb(bytes), mem.activations_mb, cr.0, cr.1
                ));
                (batch, crop) = (b, cr);
            }
            None => break bytes,
        }
    };

    let (iw, ih) = (profile.input.width, profile.input.height);
    let frame = iw * ih * 3;
    let serve = measure.serve_peak()?;
    let geo = crate::adapt::Geometry {
        classes: c,
        dim: d,
        crop,
        input: (iw, ih),
    };
    let mut state = 2 * c * d * f32s + 2 * c * d * f32s + 2 * c * f32s;
    let mut holds = vec!["source statistics".to_string()];
    let slots = match adapt.budget.on {
        true => adapt.budget.slots,
        false => 0,
    };
    if slots > 0 {
        let buffers: usize = specs
            .iter()
            .filter(|s| !s.trainable)
            .map(|s| s.shape.iter().product::<usize>())
            .sum();
        state += slots * (trainable + buffers) * f32s;
        holds.push(format!("weights of {slots} conditions"));
    }
    for comp in crate::adapt::components(adapt, model, stats, source)? {
        let (bytes, what) = comp.bytes(&geo);
        state += bytes;
        if !what.is_empty() {
            holds.push(what);
        }
    }
    let parts = vec![
        Part {
            name: "models",
            holds: format!("{copies} copies of {params} parameters (student, teacher, served)"),
            bytes: copies * params * f32s,
            share: share(mem.models_mb),
        },
        Part {
            name: "optimizer",
            holds: format!("gradients + AdamW moments of {trainable} parameters"),
            bytes: 3 * trainable * f32s,
            share: share(mem.optimizer_mb),
        },
        Part {
            name: "activations",
            holds: format!("measured step, batch {batch} crop {}x{}", crop.0, crop.1),
            bytes: act,
            share: act_share,
        },
        Part {
            name: "serving",
            holds: format!(
                "measured forward at {iw}x{ih}, ring of {} frames, queue of 2",
                profile.train.ring
            ),
            bytes: serve + (profile.train.ring + 2) * frame,
            share: share(mem.serving_mb),
        },
        Part {
            name: "state",
            holds: holds.join(", "),
            bytes: state,
            share: share(mem.state_mb),
        },
    ];
    let total = parts.iter().map(|p| p.bytes).sum();
    Ok(Plan {
        profile: profile.device.name.clone(),
        parts,
        total,
        budget: share(mem.total_mb),
        batch,
        crop,
        shrunk,
    })
}

impl Plan {
    /// Each part over its share and the total over the budget, as sentences.
    pub fn problems(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .parts
            .iter()
            .filter(|p| p.bytes > p.share)
            .map(|p| {
                format!(
                    "{} needs {:.1} MB ({}) but its share is {:.1} MB: over by {:.1} MB",
                    p.name,
                    mb(p.bytes),
                    p.holds,
                    mb(p.share),
                    mb(p.bytes - p.share)
                )
            })
            .collect();
        if self.total > self.budget {
            v.push(format!(
                "the total {:.1} MB is over the budget of {:.1} MB by {:.1} MB",
                mb(self.total),
                mb(self.budget),
                mb(self.total - self.budget)
            ));
        }
        v
    }

    pub fn check(&self) -> Result<()> {
        let p = self.problems();
        if p.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "profile {}: the memory plan does not fit: {}",
            self.profile,
            p.join("; ")
        )))
    }

    /// The plan as a table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "memory plan for {} (batch {}, crop {}x{})\n{:<12} {:>10} {:>10}  holds\n",
            self.profile, self.batch, self.crop.0, self.crop.1, "part", "MB", "share MB"
        );
        for p in &self.parts {
            s += &format!(
                "{:<12} {:>10.1} {:>10.1}  {}\n",
                p.name,
                mb(p.bytes),
                mb(p.share),
                p.holds
            );
        }
        s += &format!(
            "{:<12} {:>10.1} {:>10.1}  budget\n",
            "total",
            mb(self.total),
            mb(self.budget)
        );
        for line in &self.shrunk {
            s += &format!("shrunk: {line}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_halves_the_batch_first_then_the_crop() {
        assert_eq!(shrink(4, (512, 256)), Some((2, (512, 256))));
        assert_eq!(shrink(1, (512, 256)), Some((1, (384, 192))));
        assert_eq!(shrink(1, (64, 64)), None);
    }
}
