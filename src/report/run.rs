//! The page a run leaves in `OUT/report.html`: what it did, its memory plan, how the
//! adaptation steps went, what it predicted, how fast it served, and frames side by side.

use super::html::{esc, legend, strip, table, Page};
use super::plot::{bars, lines, series_color, stacked, Axes, Series};
use super::trace::{FrameStrip, RunTrace};
use crate::budget::Plan;
use crate::config::PreprocessConfig;
use crate::error::Result;
use crate::metrics::Scores;
use crate::model::Segformer;
use crate::runtime::session::Report;
use crate::runtime::Summary;
use image::RgbImage;

const MB: f64 = (1 << 20) as f64;

/// A frame of the strip: its caption and the overlays to show side by side.
pub struct StripFrame {
    pub caption: String,
    pub views: Vec<(&'static str, RgbImage)>,
}

/// The strip's frames as overlays of each model's prediction, side by side.
pub fn segment_strip(
    strip: &FrameStrip,
    pre: &PreprocessConfig,
    classes: usize,
    models: &[(&'static str, &Segformer)],
) -> Result<Vec<StripFrame>> {
    strip
        .frames
        .iter()
        .map(|(i, name, img)| {
            let views = models
                .iter()
                .map(|&(label, m)| {
                    let pred = crate::eval::predict_image(m, pre, img, m.device())?;
                    Ok((label, super::overlay(img, &pred, classes)))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(StripFrame {
                caption: format!("frame {i}: {name}"),
                views,
            })
        })
        .collect()
}

/// The page of an adaptation run (`adapt`, the demo, each cell of an ablation or suite).
pub fn adaptation_page(
    r: &Report,
    trace: &RunTrace,
    classes: &[String],
    frames: Vec<StripFrame>,
) -> Result<Page> {
    let mut page = Page::new(&format!(
        "segadapt: {} adaptation, seed {}",
        r.method, r.seed
    ));
    let mut facts = serving_facts(&r.summary);
    facts.splice(
        0..0,
        [
            ("method".into(), r.method.clone()),
            ("components".into(), r.components.join(", ")),
        ],
    );
    let s = &r.summary;
    facts.extend([
        ("training steps".into(), s.train_steps.to_string()),
        (
            "steps per second".into(),
            format!("{:.2}", s.train_steps_per_s),
        ),
        ("median step".into(), format!("{:.0} ms", s.step_ms_p50)),
        (
            "skipped / rollbacks / budget waits".into(),
            format!("{} / {} / {}", s.steps_skipped, s.rollbacks, s.budget_waits),
        ),
        ("heap peak".into(), format!("{:.0} MB", r.peak_heap_mb)),
        (
            "resident peak".into(),
            r.peak_rss_mb.map_or("n/a".into(), |v| format!("{v:.0} MB")),
        ),
    ]);
    page.section("Run", &facts_table(&facts));
    scores_section(&mut page, r, classes)?;
    page.section("Memory plan", &plan_table(&r.plan));
    steps_section(&mut page, trace)?;
    serving_sections(&mut page, trace, classes)?;
    frames_section(&mut page, classes, frames)?;
    Ok(page)
}

/// The page of a replay without adaptation.
pub fn replay_page(
    s: &Summary,
    trace: &RunTrace,
    classes: &[String],
    frames: Vec<StripFrame>,
) -> Result<Page> {
    let mut page = Page::new("segadapt: replay");
    let mut facts = serving_facts(s);
    if let Some(m) = s.miou {
        facts.push(("mIoU on the labelled frames".into(), format!("{m:.2}")));
    }
    page.section("Run", &facts_table(&facts));
    serving_sections(&mut page, trace, classes)?;
    frames_section(&mut page, classes, frames)?;
    Ok(page)
}

fn serving_facts(s: &Summary) -> Vec<(String, String)> {
    vec![
        (
            "frames in / served / dropped / bad".into(),
            format!(
                "{} / {} / {} / {}",
                s.frames_in, s.frames_served, s.frames_dropped, s.frame_errors
            ),
        ),
        (
            "latency p50 / p99 / max".into(),
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                s.latency_ms_p50, s.latency_ms_p99, s.latency_ms_max
            ),
        ),
        ("wall time".into(), format!("{:.1} s", s.wall_s)),
    ]
}

fn facts_table(facts: &[(String, String)]) -> String {
    let rows: Vec<Vec<String>> = facts
        .iter()
        .map(|(k, v)| vec![k.clone(), v.clone()])
        .collect();
    table(&[], &rows)
}

fn plan_table(p: &Plan) -> String {
    let mut rows: Vec<Vec<String>> = p
        .parts
        .iter()
        .map(|x| {
            vec![
                x.name.to_string(),
                format!("{:.1}", x.bytes as f64 / MB),
                format!("{:.1}", x.share as f64 / MB),
                x.holds.clone(),
            ]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        format!("{:.1}", p.total as f64 / MB),
        format!("{:.1}", p.budget as f64 / MB),
        "budget".into(),
    ]);
    let mut s = format!(
        "<p>{}: training batch {}, crop {}x{}.</p>",
        esc(&p.profile),
        p.batch,
        p.crop.0,
        p.crop.1
    );
    s += &table(&["part", "MB", "share MB", "holds"], &rows);
    for line in &p.shrunk {
        s += &format!("<p class=\"note\">shrunk: {}</p>", esc(line));
    }
    s
}

fn scores_section(page: &mut Page, r: &Report, classes: &[String]) -> Result<()> {
    let (Some(before), Some(after)) = (&r.source_only, &r.adapted) else {
        return Ok(());
    };
    let mut html = format!(
        "<p>mIoU source-only {:.2} &rarr; adapted {:.2} ({:+.2}).</p>",
        before.miou,
        after.miou,
        after.miou - before.miou
    );
    let sets = r.points.iter().map(|p| p.set).max().map_or(0, |m| m + 1);
    let by_frames: Vec<Series> = (0..sets)
        .map(|set| Series {
            name: format!("set {set}"),
            color: series_color(set + 1),
            points: r
                .points
                .iter()
                .filter(|p| p.set == set)
                .map(|p| (p.frames as f64, p.scores.miou))
                .collect(),
        })
        .collect();
    if !r.curve.is_empty() {
        let axes = Axes {
            title: "mIoU while adapting",
            x: r.curve_x,
            y: "mIoU",
        };
        let curve = Series {
            name: "held-out frames".into(),
            color: series_color(0),
            points: r.curve.iter().map(|&(s, m)| (s as f64, m)).collect(),
        };
        html += &lines(&axes, &[curve], None)?;
    }
    if !by_frames.is_empty() {
        let axes = Axes {
            title: "mIoU at the scoring points",
            x: "frames served",
            y: "mIoU",
        };
        html += &lines(&axes, &by_frames, None)?;
    }
    html += &class_bars(before, after, classes)?;
    page.section("Scores", &html);
    Ok(())
}

fn class_bars(before: &Scores, after: &Scores, classes: &[String]) -> Result<String> {
    let group = |name: &str, s: &Scores, i: usize| Series {
        name: name.into(),
        color: series_color(i),
        points: s
            .per_class
            .iter()
            .enumerate()
            .filter_map(|(k, (_, v))| v.map(|v| (k as f64, v)))
            .collect(),
    };
    let axes = Axes {
        title: "IoU per class",
        x: "class",
        y: "IoU",
    };
    bars(
        &axes,
        classes,
        &[group("source-only", before, 0), group("adapted", after, 1)],
        100.0,
    )
}

fn steps_section(page: &mut Page, trace: &RunTrace) -> Result<()> {
    let steps = trace.steps.points();
    if steps.is_empty() {
        page.section(
            "Adaptation steps",
            "<p class=\"note\">No training steps were taken.</p>",
        );
        return Ok(());
    }
    let mut names: Vec<&str> = Vec::new();
    for p in steps {
        for (n, _) in &p.terms {
            if !names.contains(n) {
                names.push(n);
            }
        }
    }
    let mut loss = vec![Series {
        name: "total".into(),
        color: [0, 0, 0],
        points: steps
            .iter()
            .map(|p| (p.step as f64, p.total as f64))
            .collect(),
    }];
    loss.extend(names.iter().enumerate().map(|(i, &n)| {
        Series {
            name: n.to_string(),
            color: series_color(i),
            points: steps
                .iter()
                .filter_map(|p| {
                    let v = p.terms.iter().find(|t| t.0 == n)?.1;
                    Some((p.step as f64, v as f64))
                })
                .collect(),
        }
    }));
    let share = vec![
        Series {
            name: "kept pixels".into(),
            color: series_color(0),
            points: steps
                .iter()
                .map(|p| (p.step as f64, p.kept as f64))
                .collect(),
        },
        Series {
            name: "teacher confidence".into(),
            color: series_color(1),
            points: steps
                .iter()
                .map(|p| (p.step as f64, p.confidence as f64))
                .collect(),
        },
    ];
    let shifts: Vec<String> = steps
        .iter()
        .filter(|p| p.shifted)
        .map(|p| p.step.to_string())
        .collect();
    let mut html = lines(
        &Axes {
            title: "Loss terms",
            x: "step",
            y: "loss",
        },
        &loss,
        None,
    )?;
    html += &lines(
        &Axes {
            title: "Pseudo labels",
            x: "step",
            y: "share",
        },
        &share,
        Some(0.0..1.0),
    )?;
    if !shifts.is_empty() {
        html += &format!(
            "<p class=\"note\">New conditions seen before steps {}.</p>",
            shifts.join(", ")
        );
    }
    page.section("Adaptation steps", &html);
    Ok(())
}

fn serving_sections(page: &mut Page, trace: &RunTrace, classes: &[String]) -> Result<()> {
    let served = trace.served.points();
    if served.is_empty() {
        return Ok(());
    }
    let x: Vec<f64> = served.iter().map(|p| p.frame as f64).collect();
    let palette = super::palette(classes.len());
    let layers: Vec<Series> = classes
        .iter()
        .enumerate()
        .map(|(k, c)| Series {
            name: c.clone(),
            color: palette[k],
            points: served
                .iter()
                .map(|p| {
                    (
                        p.frame as f64,
                        p.shares.get(k).copied().unwrap_or(0.0) as f64,
                    )
                })
                .collect(),
        })
        .collect();
    let shares = stacked(
        &Axes {
            title: "Predicted class shares",
            x: "frame",
            y: "share of pixels",
        },
        &x,
        &layers,
    )?;
    page.section("Predictions", &shares);
    let latency = lines(
        &Axes {
            title: "Serving latency",
            x: "frame",
            y: "ms",
        },
        &[Series {
            name: "latency".into(),
            color: series_color(0),
            points: served
                .iter()
                .map(|p| (p.frame as f64, p.latency_ms as f64))
                .collect(),
        }],
        None,
    )?;
    page.section("Latency", &latency);
    Ok(())
}

fn frames_section(page: &mut Page, classes: &[String], frames: Vec<StripFrame>) -> Result<()> {
    if frames.is_empty() {
        return Ok(());
    }
    let entries: Vec<(String, Vec<(&str, RgbImage)>)> =
        frames.into_iter().map(|f| (f.caption, f.views)).collect();
    let html = legend(classes, &super::palette(classes.len())) + &strip(&entries)?;
    page.section("Frames", &html);
    Ok(())
}
