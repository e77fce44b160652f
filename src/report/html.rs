//! A self-contained HTML page: inline SVG charts and PNG frames, inline CSS, no network. A
//! few lines of script only mark the page once every chart and frame has loaded, so a headless
//! browser can check it.

use crate::error::{Error, Result};
use base64::Engine;
use image::RgbImage;
use std::fmt::Write;
use std::path::Path;

const STYLE: &str = "body{font-family:sans-serif;margin:24px auto;max-width:1100px;color:#222}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}\
.strip{display:flex;flex-wrap:wrap;gap:12px}.pair{display:flex;gap:4px}.pair figure{margin:0}\
figcaption{font-size:12px;color:#555}.legend span{display:inline-block;margin:2px 8px 2px 0;font-size:12px}\
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}\
.note{color:#555;font-size:13px}";

const CHECK: &str = "addEventListener('load',()=>{const i=[...document.images];\
const ok=i.every(x=>x.complete&&x.naturalWidth>0);\
document.body.dataset.ready=ok?'ok':'broken';\
document.body.dataset.charts=document.querySelectorAll('svg').length;\
document.body.dataset.frames=i.length;});";

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A PNG of `img` as a `data:` address.
pub fn png_uri(img: &RgbImage) -> Result<String> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Invalid(format!("report: encoding a frame: {e}")))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// A page of titled sections, written in one piece.
pub struct Page {
    title: String,
    body: String,
}

impl Page {
    pub fn new(title: &str) -> Self {
        Self {
            title: title.to_string(),
            body: String::new(),
        }
    }

    pub fn section(&mut self, heading: &str, html: &str) -> &mut Self {
        let _ = write!(self.body, "<h2>{}</h2>\n{html}\n", esc(heading));
        self
    }

    pub fn html(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\
             <style>{STYLE}</style></head>\n<body><h1>{t}</h1>\n{b}<script>{CHECK}</script></body></html>\n",
            t = esc(&self.title),
            b = self.body
        )
    }

    /// Writes the page to `path` through a temporary file, so a reader never sees half of it.
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("html.tmp");
        std::fs::write(&tmp, self.html()).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

/// A table with a header row; cells are escaped.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table>");
    if !header.is_empty() {
        s.push_str("<tr>");
        for h in header {
            let _ = write!(s, "<th>{}</th>", esc(h));
        }
        s.push_str("</tr>");
    }
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{}</td>", esc(c));
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

/// The class colours as a legend.
pub fn legend(classes: &[String], palette: &[[u8; 3]]) -> String {
    let mut s = String::from("<div class=\"legend\">");
    for (c, p) in classes.iter().zip(palette) {
        let _ = write!(
            s,
            "<span><i style=\"background:rgb({},{},{})\"></i>{}</span>",
            p[0],
            p[1],
            p[2],
            esc(c)
        );
    }
    s.push_str("</div>");
    s
}

/// Frames side by side: per entry a caption and (label, image) pairs.
pub fn strip(entries: &[(String, Vec<(&str, RgbImage)>)]) -> Result<String> {
    let mut s = String::from("<div class=\"strip\">");
    for (caption, views) in entries {
        s.push_str("<div><div class=\"pair\">");
        for (label, img) in views {
            let _ = write!(
                s,
                "<figure><img src=\"{}\" width=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>",
                png_uri(img)?,
                img.width(),
                esc(label),
                esc(label)
            );
        }
        let _ = write!(s, "</div><figcaption>{}</figcaption></div>", esc(caption));
    }
    s.push_str("</div>");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_escapes_its_text_and_embeds_frames() {
        let mut p = Page::new("run <1>");
        let img = RgbImage::new(4, 3);
        let st = strip(&[("frame & co".into(), vec![("source-only", img)])]).unwrap();
        p.section("Frames", &st);
        let h = p.html();
        assert!(h.contains("run &lt;1&gt;") && h.contains("frame &amp; co"));
        assert!(
            h.contains("src=\"data:image/png;base64,iVBOR"),
            "a PNG inline"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("report.html");
        p.write(&f).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), h);
    }
}
