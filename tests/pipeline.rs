//! Backpressure: a slow consumer behind a fast camera drops the oldest frames, counts every drop,
//! serves in order, and memory stays flat. Its own test binary, so RSS is not shared with others.

use segadapt::runtime::{run, PipelineConfig};
use segadapt::source::{Frame, FrameSource, SourceError};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A camera at 1 kHz: frames far faster than a slow consumer can serve.
struct FastCamera {
    n: u64,
    total: u64,
}

impl FrameSource for FastCamera {
    fn spec(&self) -> &str {
        "test:fast"
    }
    fn next_frame(&mut self) -> Option<Result<Frame, SourceError>> {
        if self.n == self.total {
            return None;
        }
        self.n += 1;
        Some(Ok(Frame {
            seq: self.n - 1,
            timestamp_ns: (self.n - 1) * 1_000_000,
            image: image::RgbImage::new(320, 240),
            label: None,
            name: format!("f{}", self.n),
        }))
    }
}

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn slow_consumer_drops_the_oldest_and_memory_stays_flat() {
    let cfg = PipelineConfig {
        realtime: true,
        queue: 2,
        metrics: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut served = Vec::new();
    let mut early = 0;
    let s = run(
        Box::new(FastCamera { n: 0, total: 600 }),
        &cfg,
        stop,
        |item| -> Result<(), ()> {
            std::thread::sleep(std::time::Duration::from_millis(5));
            served.push(item.frame.seq);
            if served.len() == 10 {
                early = rss_kb();
            }
            Ok(())
        },
    )
    .unwrap();
    let grown_mb = (rss_kb().saturating_sub(early)) as f64 / 1024.0;
    assert_eq!(s.frames_in, 600);
    assert_eq!(s.frames_in, s.frames_served + s.frames_dropped, "{s:?}");
    assert!(
        s.frames_dropped > 300,
        "a 5 ms consumer on a 1 ms camera drops most frames: {s:?}"
    );
    assert!(served.windows(2).all(|w| w[0] < w[1]), "served in order");
    assert_eq!(*served.last().unwrap(), 599, "the newest frame is served");
    // 600 frames of 230 KB passed through; after the first ten, memory must not grow with them.
    assert!(grown_mb < 20.0, "RSS grew {grown_mb:.1} MB");

    // As fast as possible (replay): capture waits, nothing is dropped.
    let cfg = PipelineConfig {
        realtime: false,
        queue: 2,
        metrics: None,
    };
    let s = run(
        Box::new(FastCamera { n: 0, total: 50 }),
        &cfg,
        Arc::new(AtomicBool::new(false)),
        |_| -> Result<(), ()> {
            std::thread::sleep(std::time::Duration::from_millis(1));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!((s.frames_served, s.frames_dropped), (50, 0));
}

/// The value of an unlabelled sample in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

#[test]
fn the_metrics_file_and_endpoint_count_what_the_run_did() {
    use segadapt::runtime::metrics::{Export, Exporter, Metrics};
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("segadapt.prom");
    let m = Arc::new(Metrics::default());
    let export = Export {
        file: Some(file.clone()),
        port: Some(0),
        every: std::time::Duration::from_millis(100),
    };
    let exporter = Exporter::start(m.clone(), &export).unwrap();
    let cfg = PipelineConfig {
        realtime: true,
        queue: 2,
        metrics: Some(m.clone()),
    };
    let s = run(
        Box::new(FastCamera { n: 0, total: 200 }),
        &cfg,
        Arc::new(AtomicBool::new(false)),
        |_| -> Result<(), ()> {
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        },
    )
    .unwrap();
    // Scraped over HTTP while the exporter runs.
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", exporter.port.unwrap())).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    let body = reply.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(sample(body, "segadapt_frames_in_total"), 200.0);
    drop(exporter);
    // The file ends with the run's final figures, and no temp file is left beside it.
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(sample(&text, "segadapt_frames_in_total"), 200.0);
    assert_eq!(
        sample(&text, "segadapt_frames_served_total"),
        s.frames_served as f64
    );
    assert_eq!(
        sample(&text, "segadapt_frames_dropped_total"),
        s.frames_dropped as f64
    );
    assert!(
        s.frames_dropped > 0,
        "a 1 kHz camera outruns a 2 ms consumer"
    );
    assert!(sample(&text, "segadapt_heap_bytes") >= 0.0);
    assert!(
        text.contains("segadapt_latency_ms{quantile=\"0.99\"}"),
        "{text}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
