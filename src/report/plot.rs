//! The report's charts, drawn by `plotters` into SVG text. Colours of class series are the
//! overlays' palette, so a chart and a frame read the same.

use crate::error::{Error, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

type Draw = std::result::Result<(), Box<dyn std::error::Error>>;

const SIZE: (u32, u32) = (760, 300);

/// A chart's title and axis names.
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// A named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub color: [u8; 3],
    pub points: Vec<(f64, f64)>,
}

/// A distinct colour for the `i`-th series of a chart.
pub fn series_color(i: usize) -> [u8; 3] {
    let c = Palette99::pick(i).to_rgba();
    [c.0, c.1, c.2]
}

fn rgb(c: [u8; 3]) -> RGBColor {
    RGBColor(c[0], c[1], c[2])
}

fn render(
    title: &str,
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Draw,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let drawn = root
            .fill(&WHITE)
            .map_err(|e| e.into())
            .and_then(|_| draw(&root))
            .and_then(|_| root.present().map_err(|e| e.into()));
        drawn.map_err(|e| Error::Plot {
            chart: title.to_string(),
            msg: e.to_string(),
        })?;
    }
    Ok(svg)
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A captioned chart over `xs` x `ys` with room for axis labels.
fn chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    xs: std::ops::Range<f64>,
    ys: std::ops::Range<f64>,
) -> std::result::Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    Ok(ChartBuilder::on(root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(xs, ys)?)
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> Draw {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The range of `v` with a little room, never empty.
fn span(v: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

/// Lines, one per series, with a legend; `y` spans the data unless given.
pub fn lines(axes: &Axes, series: &[Series], y: Option<std::ops::Range<f64>>) -> Result<String> {
    let xs = span(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    let ys = y.unwrap_or_else(|| span(series.iter().flat_map(|s| s.points.iter().map(|p| p.1))));
    render(axes.title, |root| {
        let mut chart = chart(root, axes.title, xs, ys)?;
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for s in series {
            let color = rgb(s.color);
            let style = ShapeStyle::from(color).stroke_width(2);
            let points = s.points.iter().copied().filter(|p| p.1.is_finite());
            chart
                .draw_series(LineSeries::new(points, style))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        legend(&mut chart)?;
        Ok(())
    })
}

/// Shares stacked to 1 over `x`, one band per layer (the first at the bottom).
pub fn stacked(axes: &Axes, x: &[f64], layers: &[Series]) -> Result<String> {
    let xs = span(x.iter().copied());
    render(axes.title, |root| {
        let mut chart = chart(root, axes.title, xs, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .draw()?;
        // Top band first: each later band covers the part of the one before it below its top.
        let mut tops: Vec<Vec<f64>> = Vec::with_capacity(layers.len());
        let mut acc = vec![0f64; x.len()];
        for l in layers {
            for (a, p) in acc.iter_mut().zip(&l.points) {
                *a += p.1;
            }
            tops.push(acc.clone());
        }
        for (l, top) in layers.iter().zip(&tops).rev() {
            let color = rgb(l.color);
            let pts: Vec<(f64, f64)> = x.iter().copied().zip(top.iter().copied()).collect();
            chart
                .draw_series(AreaSeries::new(pts, 0.0, color.filled()))?
                .label(l.name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        legend(&mut chart)?;
        Ok(())
    })
}

/// Grouped bars: per category one bar per group (None: no bar), values on 0..`top`.
pub fn bars(axes: &Axes, categories: &[String], groups: &[Series], top: f64) -> Result<String> {
    let n = categories.len().max(1);
    render(axes.title, |root| {
        let mut chart = chart(root, axes.title, 0f64..n as f64, 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .x_label_formatter(&|_| String::new())
            .y_desc(axes.y)
            .draw()?;
        let width = 0.8 / groups.len().max(1) as f64;
        for (g, s) in groups.iter().enumerate() {
            let color = rgb(s.color);
            let rects = s.points.iter().map(move |&(i, v)| {
                let x0 = i + 0.1 + g as f64 * width;
                Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, v.clamp(0.0, top))],
                    color.filled(),
                )
            });
            chart
                .draw_series(rects)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        legend(&mut chart)?;
        let font = ("sans-serif", 11).into_font();
        for (i, c) in categories.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            let w = (c.len() as i32) * 3;
            root.draw(&Text::new(c.clone(), (px - w, py + 8), font.clone()))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axes() -> Axes<'static> {
        Axes {
            title: "t",
            x: "x",
            y: "y",
        }
    }

    #[test]
    fn charts_are_svg_with_their_series_named() {
        let s = vec![Series {
            name: "loss".into(),
            color: series_color(0),
            points: vec![(0.0, 1.0), (1.0, 0.5), (2.0, f64::NAN)],
        }];
        let svg = lines(&axes(), &s, None).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("loss") && svg.contains("<polyline"));
        let b = bars(&axes(), &["road".into(), "sky".into()], &s, 100.0).unwrap();
        assert!(b.contains("road") && b.contains("<rect"));
        let st = stacked(&axes(), &[0.0, 1.0], &s[..1]).unwrap();
        assert!(st.contains("<polygon") || st.contains("<path"), "{st}");
    }

    #[test]
    fn empty_series_still_draw() {
        let svg = lines(&axes(), &[], None).unwrap();
        assert!(svg.starts_with("<svg"));
    }
}
