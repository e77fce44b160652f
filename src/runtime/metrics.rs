//! Live figures of a running `adapt` or `replay` in Prometheus' text format, for a fleet's
//! monitoring: written to a file every few seconds (atomically: a temp file renamed over it, as
//! node_exporter's textfile collector expects) and, optionally, served on `GET /metrics` from a
//! loopback port.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Latencies kept for the quantiles: the last this many served frames.
const LATENCY_WINDOW: usize = 1024;

/// Counters and gauges shared by capture, serving and training.
#[derive(Debug, Default)]
pub struct Metrics {
    pub frames_in: AtomicU64,
    pub frames_served: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub frame_errors: AtomicU64,
    /// Frames without content (uniform: a covered lens, a black frame), served but never
    /// trained on.
    pub frames_blank: AtomicU64,
    pub train_steps: AtomicU64,
    pub steps_skipped: AtomicU64,
    pub rollbacks: AtomicU64,
    pub budget_waits: AtomicU64,
    /// Checkpoints that could not be written (disk full, read-only folder).
    pub checkpoint_failures: AtomicU64,
    /// f32 bits: the last step's share of pixels kept as pseudo labels.
    kept: AtomicU32,
    /// f32 bits: the last step's mean teacher confidence.
    confidence: AtomicU32,
    latencies: Mutex<VecDeque<f64>>,
}

impl Metrics {
    pub fn served(&self, latency_ms: f64) {
        self.frames_served.fetch_add(1, Ordering::Relaxed);
        let mut l = self.latencies.lock().expect("latencies");
        if l.len() == LATENCY_WINDOW {
            l.pop_front();
        }
        l.push_back(latency_ms);
    }

    /// Records a training step's pseudo-label share and teacher confidence.
    pub fn stepped(&self, kept: f32, confidence: f32) {
        self.train_steps.fetch_add(1, Ordering::Relaxed);
        self.kept.store(kept.to_bits(), Ordering::Relaxed);
        self.confidence
            .store(confidence.to_bits(), Ordering::Relaxed);
    }

    /// The text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, value: f64| {
            out.push_str(&format!(
                "# HELP segadapt_{name} {help}\n# TYPE segadapt_{name} {kind}\nsegadapt_{name} {value}\n"
            ));
        };
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let f = |a: &AtomicU32| f32::from_bits(a.load(Ordering::Relaxed)) as f64;
        put(
            "frames_in_total",
            "counter",
            "Frames the source delivered.",
            n(&self.frames_in),
        );
        put(
            "frames_served_total",
            "counter",
            "Frames predicted.",
            n(&self.frames_served),
        );
        put(
            "frames_dropped_total",
            "counter",
            "Frames dropped because serving lagged (real time).",
            n(&self.frames_dropped),
        );
        put(
            "frame_errors_total",
            "counter",
            "Frames the source could not decode.",
            n(&self.frame_errors),
        );
        put(
            "frames_blank_total",
            "counter",
            "Frames without content (uniform), served but not trained on.",
            n(&self.frames_blank),
        );
        put(
            "train_steps_total",
            "counter",
            "Adaptation steps taken.",
            n(&self.train_steps),
        );
        put(
            "steps_skipped_total",
            "counter",
            "Steps skipped for a non-finite loss or gradient.",
            n(&self.steps_skipped),
        );
        put(
            "rollbacks_total",
            "counter",
            "Collapses rolled back.",
            n(&self.rollbacks),
        );
        put(
            "budget_waits_total",
            "counter",
            "Steps that waited for memory.",
            n(&self.budget_waits),
        );
        put(
            "checkpoint_failures_total",
            "counter",
            "Checkpoints that could not be written; the newest written one is kept.",
            n(&self.checkpoint_failures),
        );
        put(
            "pseudo_label_kept_ratio",
            "gauge",
            "Share of pixels kept as pseudo labels by the last step.",
            f(&self.kept),
        );
        put(
            "teacher_confidence",
            "gauge",
            "Mean teacher confidence in the last step.",
            f(&self.confidence),
        );
        let heap = crate::budget::current_bytes() as f64;
        put("heap_bytes", "gauge", "Live heap bytes.", heap);
        if let Some(rss) = crate::budget::rss_bytes() {
            put("resident_bytes", "gauge", "Resident set size.", rss as f64);
        }
        let mut l: Vec<f64> = self
            .latencies
            .lock()
            .expect("latencies")
            .iter()
            .copied()
            .collect();
        l.sort_by(|a, b| a.total_cmp(b));
        out.push_str(
            "# HELP segadapt_latency_ms Arrival-to-prediction latency over the last served frames.\n# TYPE segadapt_latency_ms summary\n",
        );
        for q in [0.5, 0.9, 0.99] {
            let v = super::percentile(&l, q);
            out.push_str(&format!("segadapt_latency_ms{{quantile=\"{q}\"}} {v}\n"));
        }
        out.push_str(&format!(
            "segadapt_latency_ms_sum {}\nsegadapt_latency_ms_count {}\n",
            l.iter().sum::<f64>(),
            l.len()
        ));
        out
    }

    /// Writes [`Metrics::render`] to `path` through a temp file renamed over it.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, path)
    }
}

/// Where the figures go while a run lasts.
#[derive(Debug, Clone, Default)]
pub struct Export {
    /// Rewritten every `every`.
    pub file: Option<PathBuf>,
    /// A loopback port answering `GET /metrics` (0: any free one).
    pub port: Option<u16>,
    pub every: Duration,
}

/// Runs the file writer and the HTTP endpoint until dropped; the file is written once more
/// when it stops, so it ends with the run's final figures.
pub struct Exporter {
    /// The endpoint's port (the one bound when `port` was 0).
    pub port: Option<u16>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    metrics: Arc<Metrics>,
    file: Option<PathBuf>,
}

impl Exporter {
    pub fn start(metrics: Arc<Metrics>, export: &Export) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        if let Some(path) = export.file.clone() {
            metrics.write(&path)?;
            let (m, st, every) = (metrics.clone(), stop.clone(), export.every);
            threads.push(std::thread::spawn(move || {
                while !sleep_unless(&st, every) {
                    if let Err(e) = m.write(&path) {
                        log::warn!("metrics file {}: {e}", path.display());
                    }
                }
            }));
        }
        let mut bound = None;
        if let Some(port) = export.port {
            let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
            bound = Some(listener.local_addr()?.port());
            listener.set_nonblocking(true)?;
            let (m, st) = (metrics.clone(), stop.clone());
            threads.push(std::thread::spawn(move || serve_http(&listener, &m, &st)));
        }
        Ok(Self {
            port: bound,
            stop,
            threads,
            metrics,
            file: export.file.clone(),
        })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(path) = &self.file {
            if let Err(e) = self.metrics.write(path) {
                log::warn!("metrics file {}: {e}", path.display());
            }
        }
    }
}

/// Sleeps `d` in short naps; true once `stop` is raised.
fn sleep_unless(stop: &AtomicBool, d: Duration) -> bool {
    let nap = Duration::from_millis(50);
    let mut left = d;
    while !left.is_zero() {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        let t = left.min(nap);
        std::thread::sleep(t);
        left -= t;
    }
    stop.load(Ordering::Relaxed)
}

fn serve_http(listener: &std::net::TcpListener, m: &Metrics, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 1024];
                let n = conn.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let reply = match req.starts_with("GET /metrics") {
                    true => {
                        let body = m.render();
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    }
                    false => {
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    }
                };
                let _ = conn.write_all(reply.as_bytes());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                log::warn!("metrics endpoint: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}
