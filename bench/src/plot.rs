//! SVG plots, one per metric against the number of Services, one line per
//! mode: the median of the runs with a bar from min to max. plotters'
//! SVG backend writes text as `<text>` elements, so no font is needed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::point::{Line, Run};
use crate::report::Sweep;
use crate::stats::Spread;

/// One line of a plot.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, Spread)>,
    /// Services counts where the line hit the cap (drawn at the cap).
    pub capped: Vec<f64>,
}

struct Chart {
    file: &'static str,
    title: &'static str,
    y: &'static str,
    log_y: bool,
    /// Sync charts: capped points drawn at the cap (seconds).
    capped: bool,
    series: fn(&Sweep) -> Vec<Series>,
}

/// The same colour for a line in every chart, by its label.
fn colour(label: &str) -> RGBColor {
    const TABLE: [(&str, RGBColor); 9] = [
        ("ebpf (TC", RGBColor(0x6b, 0xae, 0xd6)),
        ("ebpf BPF", RGBColor(0x6b, 0xae, 0xd6)),
        ("ebpf", RGBColor(0x1f, 0x77, 0xb4)),
        ("iptables-legacy", RGBColor(0xff, 0x7f, 0x0e)),
        ("iptables-nft", RGBColor(0xd6, 0x27, 0x28)),
        ("nftables", RGBColor(0x2c, 0xa0, 0x2c)),
        ("floor: nft -f", RGBColor(0x2c, 0xa0, 0x2c)),
        ("floor: iptables-legacy", RGBColor(0xc4, 0x9c, 0x94)),
        ("floor: iptables-nft", RGBColor(0xe3, 0x77, 0xc2)),
    ];
    TABLE
        .iter()
        .find(|(prefix, _)| label.starts_with(prefix))
        .map(|(_, c)| *c)
        .unwrap_or(RGBColor(0x33, 0x33, 0x33))
}

fn line_series(s: &Sweep, line: Line, label: &str, f: impl Fn(&Run) -> Option<f64>) -> Series {
    Series {
        label: label.to_string(),
        points: s
            .services
            .iter()
            .filter_map(|&n| Some((n as f64, s.spread(n, line, &f)?)))
            .collect(),
        capped: s
            .services
            .iter()
            .filter(|&&n| s.capped(n, line))
            .map(|&n| n as f64)
            .collect(),
    }
}

fn floor_series(s: &Sweep, tool: &str, label: &str) -> Series {
    Series {
        label: label.to_string(),
        points: s
            .services
            .iter()
            .filter_map(|&n| Some((n as f64, s.floor(n, tool)?)))
            .collect(),
        capped: s
            .floors
            .iter()
            .filter(|f| f.tool == tool && f.capped)
            .map(|f| f.services as f64)
            .collect(),
    }
}

fn kproxy_lines(s: &Sweep, f: impl Fn(&Run) -> Option<f64> + Copy) -> Vec<Series> {
    [Line::Ebpf, Line::Legacy, Line::Nft]
        .into_iter()
        .filter(|l| s.lines.contains(l))
        .map(|l| line_series(s, l, l.name(), f))
        .collect()
}

/// The datapath lines: each mode from the hooked pod through the Service,
/// ebpf also from outside the cgroup (the TC path), and direct.
fn datapath_lines(s: &Sweep, f: impl Fn(&Run, &str, &str) -> Option<f64> + Copy) -> Vec<Series> {
    let mut out = Vec::new();
    for l in [Line::Ebpf, Line::Legacy, Line::Nft, Line::Nftables] {
        if !s.lines.contains(&l) {
            continue;
        }
        let label = if l == Line::Ebpf {
            "ebpf (socket hooks)"
        } else {
            l.name()
        };
        out.push(line_series(s, l, label, move |r| f(r, "hooked", "service")));
        if l == Line::Ebpf {
            out.push(line_series(s, l, "ebpf (TC path)", move |r| {
                f(r, "outside", "service")
            }));
        }
    }
    if s.lines.contains(&Line::Direct) {
        out.push(line_series(s, Line::Direct, "direct", move |r| {
            f(r, "hooked", "direct")
        }));
    }
    out
}

fn charts() -> Vec<Chart> {
    vec![
        Chart {
            file: "full-sync.svg",
            title: "Full sync against the number of Services",
            y: "seconds",
            log_y: true,
            capped: true,
            series: |s| {
                let mut v = kproxy_lines(s, |r| r.sync.full_sync_s);
                if s.lines.contains(&Line::Nftables) {
                    v.push(line_series(
                        s,
                        Line::Nftables,
                        "floor: nft -f (kube-proxy nftables shape)",
                        |r| r.sync.full_sync_s,
                    ));
                }
                v.push(floor_series(
                    s,
                    "iptables-legacy-restore",
                    "floor: iptables-legacy-restore",
                ));
                v.push(floor_series(
                    s,
                    "iptables-nft-restore",
                    "floor: iptables-nft-restore",
                ));
                v.retain(|s| !s.points.is_empty() || !s.capped.is_empty());
                v
            },
        },
        Chart {
            file: "start-to-healthy.svg",
            title: "kproxy start to healthy",
            y: "seconds",
            log_y: true,
            capped: true,
            series: |s| kproxy_lines(s, |r| r.sync.start_to_healthy_s),
        },
        Chart {
            file: "endpoint-change-p50.svg",
            title: "Endpoint change to traffic, p50",
            y: "ms",
            log_y: true,
            capped: false,
            series: |s| kproxy_lines(s, |r| r.changes.as_ref().map(|c| c.percentiles.p50)),
        },
        Chart {
            file: "endpoint-change-p99.svg",
            title: "Endpoint change to traffic, p99",
            y: "ms",
            log_y: true,
            capped: false,
            series: |s| kproxy_lines(s, |r| r.changes.as_ref().map(|c| c.percentiles.p99)),
        },
        Chart {
            file: "connect-p50.svg",
            title: "First-packet (connect) latency, p50",
            y: "µs",
            log_y: true,
            capped: false,
            series: |s| datapath_lines(s, |r, from, to| r.connect(from, to).map(|p| p.p50)),
        },
        Chart {
            file: "connect-p99.svg",
            title: "First-packet (connect) latency, p99",
            y: "µs",
            log_y: true,
            capped: false,
            series: |s| datapath_lines(s, |r, from, to| r.connect(from, to).map(|p| p.p99)),
        },
        Chart {
            file: "connect-p999.svg",
            title: "First-packet (connect) latency, p99.9",
            y: "µs",
            log_y: true,
            capped: false,
            series: |s| datapath_lines(s, |r, from, to| r.connect(from, to).map(|p| p.p999)),
        },
        Chart {
            file: "connections-per-second.svg",
            title: "New connections per second",
            y: "connections/s",
            log_y: false,
            capped: false,
            series: |s| datapath_lines(s, |r, from, to| r.flood(from, to).map(|f| f.conns_per_s)),
        },
        Chart {
            file: "cpu-per-1000-connections.svg",
            title: "Node CPU per 1,000 new connections",
            y: "CPU ms",
            log_y: false,
            capped: false,
            series: |s| datapath_lines(s, |r, from, to| r.flood(from, to).map(|f| f.cpu_ms_per_1k)),
        },
        Chart {
            file: "memory.svg",
            title: "kproxy memory after the first sync",
            y: "MiB",
            log_y: true,
            capped: false,
            series: |s| {
                let mut v = kproxy_lines(s, |r| r.sync.rss_kib.map(|k| k as f64 / 1024.0));
                for v in &mut v {
                    v.label = format!("{} RSS", v.label);
                }
                if s.lines.contains(&Line::Ebpf) {
                    v.push(line_series(s, Line::Ebpf, "ebpf BPF maps (memlock)", |r| {
                        r.sync.bpf_memlock_bytes.map(|b| b as f64 / 1024.0 / 1024.0)
                    }));
                }
                v
            },
        },
    ]
}

/// The directory of this sweep's plots, relative to `out`.
pub fn plot_dir(sweep: &Sweep) -> PathBuf {
    PathBuf::from(sweep.stem())
}

/// Plots already on disk for this sweep: (title, path relative to `out`).
pub fn existing(sweep: &Sweep, out: &Path) -> Vec<(String, PathBuf)> {
    charts()
        .into_iter()
        .map(|c| (c.title.to_string(), plot_dir(sweep).join(c.file)))
        .filter(|(_, p)| out.join(p).is_file())
        .collect()
}

/// Draws every chart that has data; returns (title, path relative to `out`).
pub fn draw_all(sweep: &Sweep, out: &Path) -> Result<Vec<(String, PathBuf)>> {
    let dir = out.join(plot_dir(sweep));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut drawn = Vec::new();
    for chart in charts() {
        let series = (chart.series)(sweep);
        if series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        let cap = sweep.plan.nft_cap_s;
        let path = dir.join(chart.file);
        draw(&path, &chart, &series, cap).with_context(|| format!("drawing {}", path.display()))?;
        drawn.push((chart.title.to_string(), plot_dir(sweep).join(chart.file)));
    }
    // The Markdown report links the plots now that they exist.
    sweep.write(out)?;
    Ok(drawn)
}

/// An axis label: integers from 100 up, else up to 4 significant digits.
fn tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    if v.abs() >= 100.0 {
        return format!("{v:.0}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 8) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Axis range with some room, positive for log axes.
fn range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    if log {
        lo /= 1.6;
        hi *= 1.6;
    } else {
        lo = 0.0;
        hi *= 1.15;
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    (lo, hi)
}

fn draw(path: &Path, chart: &Chart, series: &[Series], cap: f64) -> Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Capped points only count where they are drawn (sync charts).
    let capped = |s: &Series| -> Vec<f64> {
        if chart.capped {
            s.capped.clone()
        } else {
            Vec::new()
        }
    };
    let xs = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0).chain(capped(s)));
    let (x0, x1) = range(xs, true);
    let ys = series.iter().flat_map(|s| {
        s.points
            .iter()
            .flat_map(|(_, sp)| [sp.min, sp.max])
            .chain(capped(s).into_iter().map(|_| cap))
    });
    let (y0, y1) = range(ys, chart.log_y);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70);
    macro_rules! body {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .light_line_style(TRANSPARENT)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| tick(*y))
                .x_desc("Services (10 endpoints each)")
                .y_desc(chart.y)
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for s in series {
                let colour = colour(&s.label);
                let capped = capped(s);
                let dashed = s.label.starts_with("floor") || s.label == "direct";
                let style = ShapeStyle::from(&colour).stroke_width(if dashed { 1 } else { 2 });
                let pts: Vec<(f64, f64)> = s.points.iter().map(|(x, sp)| (*x, sp.median)).collect();
                ctx.draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                ctx.draw_series(s.points.iter().filter(|(_, sp)| sp.max > sp.min).map(
                    |(x, sp)| {
                        ErrorBar::new_vertical(*x, sp.min, sp.median, sp.max, colour.filled(), 6)
                    },
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                ctx.draw_series(
                    capped
                        .iter()
                        .map(|&x| TriangleMarker::new((x, cap), 7, colour.filled())),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                ctx.draw_series(capped.iter().map(|&x| {
                    Text::new(
                        format!("> {cap:.0} s"),
                        (x, cap),
                        ("sans-serif", 13).into_font().color(&colour),
                    )
                }))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            ctx.configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }};
    }
    if chart.log_y {
        body!(builder
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(|e| anyhow::anyhow!("{e}"))?);
    } else {
        body!(builder
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_leave_room_and_stay_positive_on_log_axes() {
        let (lo, hi) = range([0.0, 2.0, 50.0].into_iter(), true);
        assert!(lo > 0.0 && lo < 2.0 && hi > 50.0);
        let (lo, hi) = range([3.0, 9.0].into_iter(), false);
        assert_eq!(lo, 0.0);
        assert!(hi > 9.0);
        assert_eq!(range(std::iter::empty(), true), (1.0, 10.0));
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(25000.0), "25000");
        assert_eq!(tick(0.30000000000000004), "0.3");
        assert_eq!(tick(0.05), "0.05");
        assert_eq!(tick(12.5), "12.5");
        assert_eq!(tick(0.0123456), "0.01235");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn draws_an_svg_with_labels() {
        let dir = std::env::temp_dir().join(format!("kproxy-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let sp = |v: f64| Spread {
            runs: 3,
            min: v * 0.9,
            median: v,
            max: v * 1.2,
        };
        let series = vec![
            Series {
                label: "ebpf".into(),
                points: vec![(100.0, sp(0.01)), (1000.0, sp(0.1))],
                capped: vec![],
            },
            Series {
                label: "iptables-nft".into(),
                points: vec![(100.0, sp(1.0))],
                capped: vec![1000.0],
            },
        ];
        let chart = Chart {
            file: "t.svg",
            title: "Full sync",
            y: "seconds",
            log_y: true,
            capped: true,
            series: |_| vec![],
        };
        draw(&path, &chart, &series, 300.0).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        for text in [
            "Full sync",
            "ebpf",
            "iptables-nft",
            "&gt; 300 s",
            "Services",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
