//! The pages of many runs together: an ablation (methods x seeds on one target) and the
//! multi-target suite. Each has its table, charts of it, and links to every run's own page.

use super::html::{esc, Page};
use super::plot::{bars, lines, series_color, Axes, Series};
use crate::ablation::Row;
use crate::error::Result;
use crate::suite::TargetResult;

/// A Markdown table as HTML.
fn markdown_html(md: &str) -> String {
    let parser = pulldown_cmark::Parser::new_ext(md, pulldown_cmark::Options::ENABLE_TABLES);
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, parser);
    html
}

fn links(runs: &[String]) -> String {
    let items: String = runs
        .iter()
        .map(|r| format!("<li><a href=\"{0}/report.html\">{0}</a></li>", esc(r)))
        .collect();
    format!("<ul>{items}</ul>")
}

/// A bar chart's top: the largest value with room for the legend.
fn top(v: impl Iterator<Item = f64>) -> f64 {
    let m = v.filter(|x| x.is_finite()).fold(0.0, f64::max);
    ((m * 1.25) / 10.0).ceil() * 10.0
}

/// The suite's page; `runs` are the run folders under the suite's output, each with a page.
pub fn suite_page(results: &[TargetResult], runs: &[String]) -> Result<Page> {
    let mut page = Page::new("segadapt: multi-target suite");
    page.section("Table", &markdown_html(&crate::suite::markdown(results)));
    let targets: Vec<String> = results.iter().map(|t| t.name.clone()).collect();
    let methods = crate::suite::methods(results);
    let groups: Vec<Series> = methods
        .iter()
        .enumerate()
        .map(|(i, m)| Series {
            name: m.clone(),
            color: series_color(i),
            points: results
                .iter()
                .enumerate()
                .filter_map(|(k, t)| Some((k as f64, t.cell(m)?.mean())))
                .collect(),
        })
        .collect();
    let peak = top(groups.iter().flat_map(|g| g.points.iter().map(|p| p.1)));
    let axes = Axes {
        title: "mIoU per target (mean over seeds)",
        x: "target",
        y: "mIoU",
    };
    page.section("Targets", &bars(&axes, &targets, &groups, peak)?);
    let mut curves = String::new();
    for t in results.iter().filter(|t| {
        t.cells
            .iter()
            .any(|c| c.points.first().is_some_and(|p| p.len() > 1))
    }) {
        let series: Vec<Series> = t
            .cells
            .iter()
            .enumerate()
            .map(|(i, c)| Series {
                name: c.method.clone(),
                color: series_color(methods.iter().position(|m| *m == c.method).unwrap_or(i)),
                points: mean_points(&c.points),
            })
            .collect();
        let title = format!("{}: mIoU at each scoring point", t.name);
        let axes = Axes {
            title: &title,
            x: "scoring point",
            y: "mIoU",
        };
        curves += &lines(&axes, &series, None)?;
    }
    if !curves.is_empty() {
        page.section("Over the drive", &curves);
    }
    page.section("Runs", &links(runs));
    Ok(page)
}

/// Each scoring point's mIoU averaged over the seeds that reached it.
fn mean_points(per_seed: &[Vec<f64>]) -> Vec<(f64, f64)> {
    let n = per_seed.iter().map(Vec::len).max().unwrap_or(0);
    (0..n)
        .map(|k| {
            let v: Vec<f64> = per_seed.iter().filter_map(|p| p.get(k).copied()).collect();
            (
                (k + 1) as f64,
                v.iter().sum::<f64>() / v.len().max(1) as f64,
            )
        })
        .collect()
}

/// The ablation's page.
pub fn ablation_page(rows: &[Row], runs: &[String]) -> Result<Page> {
    let mut page = Page::new("segadapt: ablation");
    page.section("Table", &markdown_html(&crate::ablation::markdown(rows)));
    let methods: Vec<String> = rows.iter().map(|r| r.method.clone()).collect();
    let mean = Series {
        name: "mIoU (mean over seeds)".into(),
        color: series_color(0),
        points: rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i as f64, r.mean()))
            .collect(),
    };
    let peak = top(rows.iter().map(Row::mean));
    let axes = Axes {
        title: "mIoU per method",
        x: "method",
        y: "mIoU",
    };
    let mut html = bars(&axes, &methods, &[mean], peak)?;
    let curves: Vec<Series> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| Series {
            name: r.method.clone(),
            color: series_color(i),
            points: mean_points(&r.curves),
        })
        .collect();
    if curves.iter().any(|c| c.points.len() > 1) {
        let axes = Axes {
            title: "mIoU after each pass",
            x: "pass",
            y: "mIoU",
        };
        html += &lines(&axes, &curves, None)?;
    }
    page.section("Methods", &html);
    page.section("Runs", &links(runs));
    Ok(page)
}

/// The folders under `out` that hold a run's page, sorted.
pub fn run_folders(out: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("report.html").is_file())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    v.sort();
    v
}
