//! The benchmark's plots, SVG, in `docs/bench/` (or `$TAILGATE_BENCH_PLOTS`): the receive
//! cost per policy size, forwarding per direction, the control plane per policy size.

use std::{
    error::Error,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Result};
use plotters::{coord::Shift, prelude::*};

use super::{
    control,
    forwarding::Results as Forwarding,
    receive::{Row as Receive, Traffic, Way},
};
use tailgate_tests::forwarding::{median, Direction, Way as Forward};

/// A duration of a control-plane row, in seconds.
type Seconds = fn(&control::Row) -> f64;
type Plot = std::result::Result<(), Box<dyn Error>>;

const FONT: (&str, u32) = ("sans-serif", 15);

/// Where the plots go: `$TAILGATE_BENCH_PLOTS`; else `docs/bench/` for a full run, and a
/// directory under /tmp for a run at some sizes only (`TAILGATE_BENCH_PREFIXES`), which
/// must not replace the plots the README shows.
pub fn dir() -> PathBuf {
    match std::env::var_os("TAILGATE_BENCH_PLOTS") {
        Some(dir) => dir.into(),
        None if std::env::var_os("TAILGATE_BENCH_PREFIXES").is_some() => {
            std::env::temp_dir().join("tailgate-bench-plots")
        }
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench"),
    }
}

fn write(
    name: &str,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Plot,
) -> Result<PathBuf> {
    let dir = dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    let drawn: Plot = (|| {
        let root = SVGBackend::new(&path, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    })();
    drawn.map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    println!("plot: {}", path.display());
    Ok(path)
}

/// A logarithmic range around `values` (a factor of 2 of room on each side).
fn around(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi == 0.0 {
        return 1.0..10.0;
    }
    lo / 2.0..hi * 2.0
}

fn color(i: usize) -> RGBColor {
    [RGBColor(120, 120, 120), RGBColor(44, 160, 44), RGBColor(31, 119, 180), RGBColor(214, 39, 40)][i % 4]
}

/// ns/packet per policy size, a panel per traffic, a line per way.
pub fn receive(rows: &[Receive]) -> Result<PathBuf> {
    write("receive-cost.svg", (1500, 480), |root| {
        let range = around(rows.iter().flat_map(|r| [r.ns(Way::Floor), r.ns(Way::Iptables)]));
        for (panel, traffic) in root.split_evenly((1, 3)).iter().zip(Traffic::ALL) {
            let ways = [Way::None, Way::Floor, Way::Bpf, Way::Iptables];
            let lines: Vec<Line> = ways
                .into_iter()
                .enumerate()
                // For passed traffic the floor is "no filtering".
                .filter(|(_, way)| *way != Way::Floor || traffic == Traffic::Dropped)
                .map(|(i, way)| Line {
                    label: way.name().to_string(),
                    color: color(i),
                    width: 2,
                    marker: 4,
                    points: rows
                        .iter()
                        .filter(|r| r.traffic == traffic)
                        .map(|r| (r.prefixes as f64, r.ns(way)))
                        .collect(),
                })
                .collect();
            let axes = Axes {
                caption: traffic.name(),
                y: "receive CPU, ns per packet",
                decimals: 0,
                range: range.clone(),
            };
            by_prefixes(panel, &axes, &lines)?;
        }
        Ok(())
    })
}

/// One line of a plot over policy sizes.
struct Line {
    label: String,
    color: RGBColor,
    width: u32,
    marker: u32,
    points: Vec<(f64, f64)>,
}

struct Axes<'a> {
    caption: &'a str,
    y: &'a str,
    /// Decimals of the y labels.
    decimals: usize,
    range: std::ops::Range<f64>,
}

/// `lines` over user prefixes (1 to 100,000), both axes logarithmic, with a legend.
fn by_prefixes(area: &DrawingArea<SVGBackend, Shift>, axes: &Axes, lines: &[Line]) -> Plot {
    let mut chart = ChartBuilder::on(area)
        .caption(axes.caption, FONT)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.5f64..200_000f64).log_scale(), axes.range.clone().log_scale())?;
    let decimals = axes.decimals;
    chart
        .configure_mesh()
        .x_desc("user prefixes")
        .y_desc(axes.y)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.decimals$}"))
        .draw()?;
    for line in lines {
        let style = line.color.stroke_width(line.width);
        chart
            .draw_series(LineSeries::new(line.points.clone(), style))?
            .label(&line.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(line.points.iter().map(|p| Circle::new(*p, line.marker, line.color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// CPU ns/packet per way, a panel per direction.
pub fn forwarding(results: &Forwarding) -> Result<PathBuf> {
    write("forwarding.svg", (1000, 440), |root| {
        let top = results.samples.values().flatten().map(|s| s.ns_per_packet).fold(0.0, f64::max) * 1.2;
        for (panel, direction) in
            root.split_evenly((1, 2)).iter().zip([Direction::TunnelToLan, Direction::LanToTunnel])
        {
            let caption = match direction {
                Direction::TunnelToLan => "tunnel → LAN (mark, MSS check, masquerade)",
                Direction::LanToTunnel => "LAN → tunnel (answers translated back)",
            };
            let mut chart = ChartBuilder::on(panel)
                .caption(caption, FONT)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((0u32..2u32).into_segmented(), 0f64..top)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .y_desc("gateway CPU, ns per packet")
                .x_labels(3)
                .y_label_formatter(&|y| format!("{y:.0}"))
                .x_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) => ["kernel alone", "tailgate BPF", "tailgate iptables"]
                        .get(*i as usize)
                        .unwrap_or(&"")
                        .to_string(),
                    _ => String::new(),
                })
                .draw()?;
            let ways = [Forward::Plain, Forward::Bpf, Forward::Iptables];
            let bars: Vec<(u32, f64)> = ways
                .iter()
                .enumerate()
                .map(|(i, &way)| (i as u32, median(results.of(direction, way), |s| s.ns_per_packet)))
                .collect();
            chart.draw_series(bars.iter().map(|&(i, ns)| {
                let mut bar = Rectangle::new(
                    [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), ns)],
                    color([0, 2, 3][i as usize]).filled(),
                );
                bar.set_margin(0, 0, 25, 25);
                bar
            }))?;
        }
        Ok(())
    })
}

/// Start, full reload and stop times, and memory, per policy size, a line per backend.
pub fn control(rows: &[control::Row]) -> Result<PathBuf> {
    write("control-plane.svg", (1200, 460), |root| {
        let prefixes: Vec<&control::Row> = rows.iter().filter(|r| r.policy.ends_with("prefixes")).collect();
        let line = |backend: &str, b: usize, name: &str, k: usize, f: &dyn Fn(&control::Row) -> f64| Line {
            label: format!("{backend} {name}"),
            color: color([2, 3][b]),
            width: if k == 0 { 3 } else { 1 },
            marker: 3 + k as u32,
            points: prefixes.iter().filter(|r| r.backend == backend).map(|r| (r.size as f64, f(r))).collect(),
        };
        let what: [(&str, Seconds); 3] = [
            ("start", |r| r.start.as_secs_f64()),
            ("reload", |r| r.reload_all.as_secs_f64()),
            ("stop", |r| r.stop.as_secs_f64()),
        ];
        let mut times = Vec::new();
        let mut memory = Vec::new();
        for (b, backend) in ["bpf", "iptables"].into_iter().enumerate() {
            for (k, (name, f)) in what.iter().enumerate() {
                times.push(line(backend, b, name, k, f));
            }
            memory.push(line(backend, b, "resident", 0, &|r| r.rss_kib as f64 / 1024.0));
            memory.push(line(backend, b, "peak", 1, &|r| r.peak_kib as f64 / 1024.0));
        }
        let panels = root.split_evenly((1, 2));
        let range = |lines: &[Line]| around(lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
        let axes = Axes {
            caption: "start, reload (every prefix replaced), stop",
            y: "seconds",
            decimals: 3,
            range: range(&times),
        };
        by_prefixes(&panels[0], &axes, &times)?;
        let axes = Axes {
            caption: "daemon memory (resident after start, peak)",
            y: "MiB",
            decimals: 0,
            range: range(&memory),
        };
        by_prefixes(&panels[1], &axes, &memory)
    })
}
