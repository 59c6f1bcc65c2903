//! Prometheus text exposition, written by hand: a few counters, gauges and histograms behind one
//! mutex (updates are per request or per batch, far from contended).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds of the latency histograms, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Upper bounds of the batch-size histogram, outputs per model batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

#[derive(Clone, Debug, Default)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    /// (route, model kind, status).
    requests: BTreeMap<(String, String, u16), u64>,
    /// (route, model kind).
    latency: BTreeMap<(String, String), Histogram>,
    queue_depth: BTreeMap<String, i64>,
    batch_size: BTreeMap<String, Histogram>,
    batch_seconds: BTreeMap<String, Histogram>,
    generated: BTreeMap<String, u64>,
    dropped: BTreeMap<(String, &'static str), u64>,
}

/// The server's metrics. Label values are route templates and model kinds, never user input.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic elsewhere never leaves these maps half-updated in a way that matters.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// A response on `route`, which serves the model of kind `model` (`none`: the server's own).
    pub fn request(&self, route: &str, model: &str, status: u16, seconds: f64) {
        self.with(|m| {
            *m.requests
                .entry((route.to_string(), model.to_string(), status))
                .or_default() += 1;
            m.latency
                .entry((route.to_string(), model.to_string()))
                .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
                .observe(seconds);
        })
    }

    pub fn set_queue_depth(&self, model: &str, depth: usize) {
        self.with(|m| {
            m.queue_depth.insert(model.to_string(), depth as i64);
        })
    }

    pub fn batch(&self, model: &str, images: usize, seconds: f64) {
        self.with(|m| {
            m.batch_size
                .entry(model.to_string())
                .or_insert_with(|| Histogram::new(BATCH_BUCKETS))
                .observe(images as f64);
            m.batch_seconds
                .entry(model.to_string())
                .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
                .observe(seconds);
        })
    }

    /// Outputs (images, motions) a model made.
    pub fn generated(&self, model: &str, count: usize) {
        self.with(|m| *m.generated.entry(model.to_string()).or_default() += count as u64)
    }

    /// A job that never ran (`disconnected`, `deadline`) or was stopped mid-run (`cancelled`).
    pub fn dropped(&self, model: &str, reason: &'static str) {
        self.with(|m| *m.dropped.entry((model.to_string(), reason)).or_default() += 1)
    }

    pub fn render(&self) -> String {
        let model = |m: &String| format!("model=\"{m}\"");
        self.with(|m| {
            let mut out = String::new();
            let requests = m.requests.iter().map(|((route, kind, status), n)| {
                (
                    format!("route=\"{route}\",model=\"{kind}\",status=\"{status}\""),
                    n.to_string(),
                )
            });
            family(
                &mut out,
                "lcm_http_requests_total",
                "counter",
                "HTTP requests by route, model kind and status.",
                requests,
            );
            let latency = m
                .latency
                .iter()
                .map(|((route, kind), h)| (format!("route=\"{route}\",model=\"{kind}\""), h));
            histograms(
                &mut out,
                "lcm_http_request_duration_seconds",
                "Request latency by route and model kind.",
                latency,
            );
            let depth = m.queue_depth.iter().map(|(k, d)| (model(k), d.to_string()));
            family(
                &mut out,
                "lcm_queue_depth",
                "gauge",
                "Jobs waiting for the model.",
                depth,
            );
            let sizes = m.batch_size.iter().map(|(k, h)| (model(k), h));
            let what = "Outputs (images or motions) per model batch.";
            histograms(&mut out, "lcm_batch_size", what, sizes);
            let seconds = m.batch_seconds.iter().map(|(k, h)| (model(k), h));
            histograms(
                &mut out,
                "lcm_batch_duration_seconds",
                "Time to run one model batch.",
                seconds,
            );
            let made = m.generated.iter().map(|(k, n)| (model(k), n.to_string()));
            family(
                &mut out,
                "lcm_generated_total",
                "counter",
                "Outputs generated (images or motions, by model kind).",
                made,
            );
            let dropped = m.dropped.iter().map(|((k, reason), n)| {
                (format!("model=\"{k}\",reason=\"{reason}\""), n.to_string())
            });
            let why = "Jobs skipped (client gone, deadline passed) or stopped mid-run (cancelled).";
            family(&mut out, "lcm_jobs_dropped_total", "counter", why, dropped);
            out
        })
    }
}

/// A metric family's HELP and TYPE lines.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A counter or gauge family: one `name{labels} value` line per sample.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl Iterator<Item = (String, String)>,
) {
    header(out, name, kind, help);
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// A histogram family, one histogram per label set.
fn histograms<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl Iterator<Item = (String, &'a Histogram)>,
) {
    header(out, name, "histogram", help);
    for (labels, h) in samples {
        h.write(out, name, &labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.batch("image", 1, 0.1);
        m.batch("image", 3, 0.2);
        let text = m.render();
        assert!(text.contains("lcm_batch_size_bucket{model=\"image\",le=\"1\"} 1"));
        assert!(text.contains("lcm_batch_size_bucket{model=\"image\",le=\"4\"} 2"));
        assert!(text.contains("lcm_batch_size_bucket{model=\"image\",le=\"+Inf\"} 2"));
        assert!(text.contains("lcm_batch_size_sum{model=\"image\"} 4"));
    }
}
