//! `--plot FILE.svg`: two hand-written SVG panels, no plotting dependency.
//!
//! Left: the latency percentile plot (x: percentile on a log scale of 1/(1-q), so the
//! tail from p90 to p99.999 gets as much room as the body; y: microseconds, log scale),
//! one line for produce acks and one for end-to-end. Right: messages per second of each
//! side, one sample per second. Labels and legends make it readable without the table.

use std::fmt::Write;

use hdrhistogram::Histogram;

use super::report::Report;

const PANEL_WIDTH: f64 = 520.0;
const PANEL_HEIGHT: f64 = 340.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_BOTTOM: f64 = 50.0;
const MARGIN_TOP: f64 = 40.0;
const MARGIN_RIGHT: f64 = 20.0;
/// The percentile axis ends at 99.999%.
const NINES_MAX: f64 = 5.0;
const PRODUCE_COLOUR: &str = "#1f77b4";
const E2E_COLOUR: &str = "#d62728";

/// Points `(nines, latency_us)` where `nines = -log10(1 - q)`: 0 at p0, 1 at p90, 2 at
/// p99, and so on. Empty for an empty histogram.
pub fn percentile_points(histogram: &Histogram<u64>) -> Vec<(f64, f64)> {
    if histogram.is_empty() {
        return Vec::new();
    }
    let steps = 100;
    (0..=steps)
        .map(|step| {
            let nines = NINES_MAX * f64::from(step) / f64::from(steps);
            let quantile = 1.0 - 10f64.powf(-nines);
            let us = histogram.value_at_quantile(quantile) as f64 / 1_000.0;
            (nines, us)
        })
        .collect()
}

struct Panel {
    x0: f64,
    title: String,
}

impl Panel {
    fn left(&self) -> f64 {
        self.x0 + MARGIN_LEFT
    }
    fn right(&self) -> f64 {
        self.x0 + PANEL_WIDTH - MARGIN_RIGHT
    }
    fn top(&self) -> f64 {
        MARGIN_TOP
    }
    fn bottom(&self) -> f64 {
        PANEL_HEIGHT - MARGIN_BOTTOM
    }
    fn frame(&self, svg: &mut String, x_label: &str, y_label: &str) {
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#444"/>"##,
            self.left(),
            self.top(),
            self.right() - self.left(),
            self.bottom() - self.top()
        );
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="22" font-size="15" text-anchor="middle" font-weight="bold">{}</text>"##,
            (self.left() + self.right()) / 2.0,
            escape(&self.title)
        );
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"##,
            (self.left() + self.right()) / 2.0,
            PANEL_HEIGHT - 10.0,
            escape(x_label)
        );
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"##,
            self.x0 + 16.0,
            (self.top() + self.bottom()) / 2.0,
            self.x0 + 16.0,
            (self.top() + self.bottom()) / 2.0,
            escape(y_label)
        );
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn polyline(svg: &mut String, points: &[(f64, f64)], colour: &str) {
    if points.is_empty() {
        return;
    }
    let mut path = String::new();
    for (x, y) in points {
        let _ = write!(path, "{x:.1},{y:.1} ");
    }
    let _ = write!(
        svg,
        r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"##,
        path.trim_end()
    );
}

fn legend(svg: &mut String, x: f64, y: f64, entries: &[(&str, &str)]) {
    for (index, (name, colour)) in entries.iter().enumerate() {
        let line_y = y + 16.0 * index as f64;
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="{line_y:.1}" x2="{:.1}" y2="{line_y:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"##,
            x + 20.0,
            x + 26.0,
            line_y + 4.0,
            escape(name)
        );
    }
}

/// Renders the whole SVG document.
pub fn render(
    report: &Report,
    produce_latency: &Histogram<u64>,
    e2e_latency: &Histogram<u64>,
) -> String {
    let mut svg = String::new();
    let width = 2.0 * PANEL_WIDTH;
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" viewBox="0 0 {width} {}" font-family="sans-serif">"##,
        PANEL_HEIGHT + 45.0,
        PANEL_HEIGHT + 45.0
    );
    let _ = write!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    // The queue workload's second series is receive-to-ack, not end-to-end.
    let second = if report.workload == "queue" {
        "receive to ack"
    } else {
        "end-to-end"
    };
    latency_panel(&mut svg, produce_latency, e2e_latency, second);
    throughput_panel(&mut svg, report);
    let caption = format!(
        "shardq bench {}: {} B x batch {}, acks {}, {} producer(s), {} consumer(s), {} partition(s)",
        report.workload,
        report.message_size,
        report.batch_size,
        report.acks,
        report.producers,
        report.consumers,
        report.partitions,
    );
    let placement = format!(
        "client cpus: {}; server: {}",
        report.client_cpus, report.server_cpus
    );
    let _ = write!(
        svg,
        r##"<text x="10" y="{:.1}" font-size="11" fill="#333">{}</text><text x="10" y="{:.1}" font-size="11" fill="#333">{}</text></svg>"##,
        PANEL_HEIGHT + 18.0,
        escape(&caption),
        PANEL_HEIGHT + 34.0,
        escape(&placement)
    );
    svg.push('\n');
    svg
}

fn latency_panel(
    svg: &mut String,
    produce: &Histogram<u64>,
    e2e: &Histogram<u64>,
    second: &'static str,
) {
    let panel = Panel {
        x0: 0.0,
        title: "Latency by percentile (log-log)".into(),
    };
    panel.frame(svg, "percentile", "latency (us, log scale)");
    let series = [
        ("produce ack", PRODUCE_COLOUR, percentile_points(produce)),
        (second, E2E_COLOUR, percentile_points(e2e)),
    ];
    let values = series
        .iter()
        .flat_map(|(_, _, points)| points.iter().map(|(_, us)| us.max(0.001)));
    let (low, high) = values.fold((f64::MAX, 0.0f64), |(low, high), us| {
        (low.min(us), high.max(us))
    });
    if high <= 0.0 {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">no latency recorded</text>"##,
            (panel.left() + panel.right()) / 2.0,
            (panel.top() + panel.bottom()) / 2.0
        );
        return;
    }
    let decade_low = low.log10().floor();
    let decade_high = high.log10().ceil().max(decade_low + 1.0);
    let x_of = |nines: f64| panel.left() + (panel.right() - panel.left()) * nines / NINES_MAX;
    let y_of = |us: f64| {
        let fraction = (us.max(0.001).log10() - decade_low) / (decade_high - decade_low);
        panel.bottom() - (panel.bottom() - panel.top()) * fraction
    };
    for (nines, label) in [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "99.999%"),
    ] {
        let x = x_of(nines);
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{label}</text>"##,
            panel.top(),
            panel.bottom(),
            panel.bottom() + 15.0
        );
    }
    let mut decade = decade_low;
    while decade <= decade_high {
        let us = 10f64.powf(decade);
        let y = y_of(us);
        let label = if us >= 1_000_000.0 {
            format!("{}s", us / 1_000_000.0)
        } else if us >= 1_000.0 {
            format!("{}ms", us / 1_000.0)
        } else {
            format!("{us}us")
        };
        let _ = write!(
            svg,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{label}</text>"##,
            panel.left(),
            panel.right(),
            panel.left() - 4.0,
            y + 4.0
        );
        decade += 1.0;
    }
    let mut entries = Vec::new();
    for (name, colour, points) in &series {
        let scaled: Vec<(f64, f64)> = points
            .iter()
            .map(|(nines, us)| (x_of(*nines), y_of(*us)))
            .collect();
        polyline(svg, &scaled, colour);
        if !points.is_empty() {
            entries.push((*name, *colour));
        }
    }
    legend(svg, panel.left() + 10.0, panel.top() + 14.0, &entries);
}

fn throughput_panel(svg: &mut String, report: &Report) {
    let panel = Panel {
        x0: PANEL_WIDTH,
        title: "Throughput per second".into(),
    };
    panel.frame(
        svg,
        "seconds since start (warm-up included)",
        "messages per second",
    );
    let timeline = &report.timeline;
    let seconds = timeline
        .produce_per_s
        .len()
        .max(timeline.consume_per_s.len())
        .max(1);
    let peak = timeline
        .produce_per_s
        .iter()
        .chain(&timeline.consume_per_s)
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    // A round top for the y axis: 1, 2 or 5 times a power of ten.
    let magnitude = 10f64.powf(peak.log10().floor());
    let top = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|step| step * magnitude)
        .find(|candidate| *candidate >= peak)
        .unwrap_or(10.0 * magnitude);
    let x_of = |second: f64| {
        panel.left() + (panel.right() - panel.left()) * second / (seconds as f64).max(1.0)
    };
    let y_of = |rate: f64| panel.bottom() - (panel.bottom() - panel.top()) * rate / top;
    for tick in 0..=4 {
        let rate = top * f64::from(tick) / 4.0;
        let y = y_of(rate);
        let label = if rate >= 1_000_000.0 {
            format!("{:.2}M", rate / 1_000_000.0)
        } else if rate >= 1_000.0 {
            // 1.5k, not a second "2k".
            let thousands = format!("{:.1}", rate / 1_000.0);
            format!("{}k", thousands.trim_end_matches(".0"))
        } else {
            format!("{rate:.0}")
        };
        let _ = write!(
            svg,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{label}</text>"##,
            panel.left(),
            panel.right(),
            panel.left() - 4.0,
            y + 4.0
        );
    }
    let x_step = (seconds / 10).max(1);
    for second in (0..=seconds).step_by(x_step) {
        let x = x_of(second as f64);
        let _ = write!(
            svg,
            r##"<text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{second}</text>"##,
            panel.bottom() + 15.0
        );
    }
    let mut entries = Vec::new();
    for (name, colour, samples) in [
        ("produced", PRODUCE_COLOUR, &timeline.produce_per_s),
        ("consumed", E2E_COLOUR, &timeline.consume_per_s),
    ] {
        if samples.iter().all(|sample| *sample == 0) {
            continue;
        }
        // Each sample covers second i..i+1; plot it at the middle of that second.
        let points: Vec<(f64, f64)> = samples
            .iter()
            .enumerate()
            .map(|(second, rate)| (x_of(second as f64 + 0.5), y_of(*rate as f64)))
            .collect();
        polyline(svg, &points, colour);
        entries.push((name, colour));
    }
    legend(svg, panel.left() + 10.0, panel.top() + 14.0, &entries);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{latency_histogram, Timeline};

    #[test]
    fn plot_percentile_points_span_p0_to_five_nines() {
        let mut histogram = latency_histogram();
        for us in 1..=100_000u64 {
            histogram.record(us * 1_000).unwrap();
        }
        let points = percentile_points(&histogram);
        assert_eq!(points.first().unwrap().0, 0.0);
        assert_eq!(points.last().unwrap().0, NINES_MAX);
        assert!(points.windows(2).all(|pair| pair[0].1 <= pair[1].1));
        assert!(percentile_points(&latency_histogram()).is_empty());
    }

    #[test]
    fn plot_is_one_svg_with_both_panels() {
        let mut histogram = latency_histogram();
        histogram.record(150_000).unwrap();
        let report = Report {
            workload: "e2e".into(),
            timeline: Timeline {
                produce_per_s: vec![10, 20, 30],
                consume_per_s: vec![9, 21, 30],
            },
            ..Report::default()
        };
        let svg = render(&report, &histogram, &latency_histogram());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Latency by percentile") && svg.contains("Throughput per second"));
        assert_eq!(svg.matches("<polyline").count(), 3);
    }
}
