//! The paper's figures (PNG and SVG) and the same numbers as a Markdown table, from the
//! `summary.json` of evaluations (`apr report`, and the pipeline's report).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::TrainError;
use crate::eval::{AtSamples, EvalSummary};

type Result<T> = std::result::Result<T, TrainError>;

/// An SFT run to draw as held-out accuracy against training tokens: its directory (with a
/// `metrics.jsonl` holding held-out accuracy) and the tokens of the model it started from.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    /// The run's directory.
    pub dir: PathBuf,
    /// Training tokens before its first step (0 from random weights).
    pub offset_tokens: f64,
}

impl std::str::FromStr for Curve {
    type Err = String;

    /// `DIR`, or `DIR@N` for a run that started from a model trained on N tokens.
    fn from_str(spec: &str) -> std::result::Result<Self, String> {
        let (dir, offset_tokens) = match spec.rsplit_once('@') {
            Some((dir, n)) => match n.parse::<f64>() {
                Ok(n) if n.is_finite() && n >= 0.0 => (dir, n),
                _ => return Err(format!("{spec}: the part after @ is not a token count")),
            },
            None => (spec, 0.0),
        };
        Ok(Curve {
            dir: PathBuf::from(dir),
            offset_tokens,
        })
    }
}

/// Held-out accuracy against cumulative training tokens, from an SFT run's `metrics.jsonl`.
fn curve(spec: &Curve) -> Result<Series> {
    let dir = spec.dir.as_path();
    let offset = spec.offset_tokens;
    let metrics: Vec<crate::sft::StepMetrics> = crate::metrics_log::read(dir)?;
    let mut tokens = offset;
    let mut points = Vec::new();
    for m in &metrics {
        tokens += m.tokens;
        if let Some(a) = m.val_accuracy {
            points.push((tokens / 1e6, a));
        }
    }
    if points.is_empty() {
        return Err(TrainError::file(
            &dir.join("metrics.jsonl"),
            "no held-out accuracy (train with --eval-every)",
        ));
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Series { name, points })
}

/// One evaluation to draw.
struct Run {
    name: String,
    summary: EvalSummary,
}

/// `DIR/summary.json`, or every `DIR/*/summary.json`, in name order.
fn collect(dir: &Path) -> Result<Vec<Run>> {
    let direct = dir.join("summary.json");
    let mut paths = Vec::new();
    if direct.is_file() {
        paths.push(direct);
    } else {
        let entries = std::fs::read_dir(dir).map_err(|e| TrainError::file(dir, e))?;
        for entry in entries {
            let path = entry
                .map_err(|e| TrainError::file(dir, e))?
                .path()
                .join("summary.json");
            if path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
    }
    if paths.is_empty() {
        return Err(TrainError::file(
            dir,
            "no summary.json here or one level below",
        ));
    }
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|e| TrainError::file(&path, e))?;
            let summary: EvalSummary = serde_json::from_str(&text)
                .map_err(|e| TrainError::file(&path, format!("not an eval summary ({e})")))?;
            let name = path
                .parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(Run { name, summary })
        })
        .collect()
}

/// Registers the first TrueType font found as plotters' "sans-serif" (bitmaps need glyphs);
/// `out` is where the figures were to go, named in the error.
fn load_font(out: &Path) -> Result<()> {
    let candidates = [
        std::env::var("APR_FONT").unwrap_or_default(),
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
        "/usr/share/fonts/TTF/DejaVuSans.ttf".into(),
        "/usr/share/fonts/dejavu/DejaVuSans.ttf".into(),
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf".into(),
        "/Library/Fonts/Arial.ttf".into(),
        "C:\\Windows\\Fonts\\arial.ttf".into(),
    ];
    for path in candidates.iter().filter(|p| !p.is_empty()) {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Vec::leak(bytes);
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
    }
    Err(TrainError::file(out, "no TrueType font found for the PNG figures (install fonts-dejavu-core or set APR_FONT=/path/to/font.ttf)"))
}

/// A named series of (x, y) points.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// One figure: title, axis labels, series, and whether points are joined.
struct Figure<'a> {
    file: &'a str,
    title: &'a str,
    x_label: &'a str,
    series: Vec<Series>,
    lines: bool,
}

/// Width in pixels of the legend column right of the plot, so no label covers a curve.
const LEGEND_WIDTH: u32 = 250;

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    fig: &Figure,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let (width, _) = root.dim_in_pixel();
    let (plot, legend) = root.split_horizontally(width.saturating_sub(LEGEND_WIDTH));
    let xs = fig.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_max = xs.fold(1.0f64, f64::max) * 1.08;
    let mut chart = ChartBuilder::on(&plot)
        .caption(fig.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..100.0)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(fig.x_label)
        .y_desc("accuracy (%)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in fig.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x, 100.0 * y)).collect();
        if fig.lines {
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))
            .map_err(|e| e.to_string())?;
        // The legend: a swatch and the series' name, one row each, beside the plot.
        let y = 60 + 24 * i as i32;
        legend
            .draw(&Rectangle::new([(8, y - 6), (22, y + 6)], color.filled()))
            .map_err(err)?;
        legend
            .draw(&Text::new(
                s.name.clone(),
                (30, y - 8),
                ("sans-serif", 14).into_font(),
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `FILE.png` and `FILE.svg`.
fn save(out: &Path, fig: &Figure) -> Result<Vec<PathBuf>> {
    let png = out.join(format!("{}.png", fig.file));
    let svg = out.join(format!("{}.svg", fig.file));
    draw(
        BitMapBackend::new(&png, (1100, 600)).into_drawing_area(),
        fig,
    )
    .map_err(|e| TrainError::file(&png, e))?;
    draw(SVGBackend::new(&svg, (1100, 600)).into_drawing_area(), fig)
        .map_err(|e| TrainError::file(&svg, e))?;
    Ok(vec![png, svg])
}

/// The figures of paper Fig. 4a, 4b and 6 for a set of runs.
fn figures(runs: &[Run]) -> Vec<Figure<'static>> {
    let point = |f: &dyn Fn(&EvalSummary) -> f64| -> Vec<Series> {
        runs.iter()
            .map(|r| Series {
                name: r.name.clone(),
                points: vec![(f(&r.summary), r.summary.accuracy)],
            })
            .collect()
    };
    // Fig. 4a: a sampled run is two curves, pass@k and cons@k over its first k samples, at what
    // k samples cost; a single-sample run is one point.
    let mut scaling = Vec::new();
    for r in runs {
        let curve = &r.summary.by_samples;
        if r.summary.samples > 1 && curve.len() > 1 {
            for (what, pick) in [
                ("pass@k", (|a: &AtSamples| a.pass) as fn(&AtSamples) -> f64),
                ("cons@k", |a: &AtSamples| a.cons),
            ] {
                scaling.push(Series {
                    name: format!("{} {what}", r.name),
                    points: curve.iter().map(|a| (a.total_tokens, pick(a))).collect(),
                });
            }
        } else {
            scaling.push(Series {
                name: r.name.clone(),
                points: vec![(r.summary.mean_total_tokens, r.summary.accuracy)],
            });
        }
    }
    vec![
        Figure {
            file: "accuracy_vs_total_tokens",
            title: "Accuracy vs total tokens (paper Fig. 4a)",
            x_label: "mean total tokens per problem",
            series: scaling,
            lines: true,
        },
        Figure {
            file: "accuracy_vs_context_window",
            title: "Cumulative accuracy vs context window (paper Fig. 4b)",
            x_label: "per-thread context window (tokens)",
            series: runs
                .iter()
                .map(|r| Series {
                    name: r.name.clone(),
                    points: r
                        .summary
                        .accuracy_by_window
                        .iter()
                        .map(|&(w, a)| (w as f64, a))
                        .collect(),
                })
                .collect(),
            lines: true,
        },
        Figure {
            file: "accuracy_vs_sequential_tokens",
            title: "Accuracy vs sequential tokens (paper Fig. 6a)",
            x_label: "mean sequential tokens per problem",
            series: point(&|s| s.mean_sequential_tokens),
            lines: false,
        },
        Figure {
            file: "accuracy_vs_latency",
            title: "Accuracy vs wall-clock latency (paper Fig. 6b)",
            x_label: "mean latency per problem (s)",
            series: point(&|s| s.mean_latency_s),
            lines: false,
        },
    ]
}

/// The numbers behind the figures as a Markdown table.
fn table(runs: &[Run]) -> String {
    let mut md = String::from(
        "| run | problems × samples | accuracy | ± s.e. | pass@n | cons@n | total tokens | sequential | longest thread | children | spawn rounds | latency (s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let s = &r.summary;
        let n = (s.problems * s.samples.max(1)).max(1) as f64;
        let se = (s.accuracy * (1.0 - s.accuracy) / n).sqrt();
        let _ = writeln!(
            md,
            "| {} | {} × {} | {:.1}% | {:.1} | {:.1}% | {:.1}% | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            r.name,
            s.problems,
            s.samples,
            100.0 * s.accuracy,
            100.0 * se,
            100.0 * s.pass_at_n,
            100.0 * s.cons_at_n,
            s.mean_total_tokens,
            s.mean_sequential_tokens,
            s.mean_longest_thread,
            s.mean_children,
            s.mean_spawn_rounds,
            s.mean_latency_s
        );
    }
    md
}

/// Draws every figure for the runs under `dirs` into `out` and writes `out/report.md`'s table
/// as `figures.md`; returns the files written.
pub fn write_report(dirs: &[PathBuf], curves: &[Curve], out: &Path) -> Result<Vec<PathBuf>> {
    let mut runs = Vec::new();
    for dir in dirs {
        runs.extend(collect(dir)?);
    }
    let curves = curves.iter().map(curve).collect::<Result<Vec<_>>>()?;
    load_font(out)?;
    std::fs::create_dir_all(out).map_err(|e| TrainError::file(out, e))?;
    let mut written = Vec::new();
    let mut md = String::from("# Evaluation figures\n\n");
    let mut all = figures(&runs);
    if !curves.is_empty() {
        all.push(Figure {
            file: "accuracy_vs_training_tokens",
            title: "Held-out accuracy during SFT",
            x_label: "training tokens (millions)",
            series: curves,
            lines: true,
        });
    }
    for fig in all {
        written.extend(save(out, &fig)?);
        let _ = writeln!(md, "![{}]({}.png)\n", fig.title, fig.file);
    }
    md.push_str(&table(&runs));
    let path = out.join("figures.md");
    std::fs::write(&path, &md).map_err(|e| TrainError::file(&path, e))?;
    written.push(path);
    Ok(written)
}
