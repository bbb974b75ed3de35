//! `stackwise plot RUN --out loss.svg|png`: the run's training and validation loss, and its
//! throughput, drawn from the run's own `metrics.jsonl` (a folder, file:// or s3://). The
//! same plot is written into the run as `loss.svg` when training ends.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use plotters::coord::Shift;
use plotters::prelude::*;
use stackwise_common::store::Store;

#[derive(Args)]
pub struct PlotArgs {
    /// The run: its folder (runs/NAME) or URI (s3://bucket/prefix/runs/NAME).
    pub run: String,
    /// The image to write: .svg or .png.
    #[arg(long, default_value = "loss.svg")]
    pub out: PathBuf,
    /// Image size in pixels, WIDTHxHEIGHT.
    #[arg(long, default_value = "1000x700", value_parser = parse_size)]
    pub size: (u32, u32),
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or("expected WIDTHxHEIGHT, e.g. 1000x700")?;
    let n = |v: &str| {
        v.parse::<u32>()
            .ok()
            .filter(|n| (100..=8000).contains(n))
            .ok_or(format!("{v}: a size from 100 to 8000"))
    };
    Ok((n(w)?, n(h)?))
}

/// The curves of one run, one value per step (a resumed run's later records win).
#[derive(Debug, Default, PartialEq)]
pub struct Curves {
    pub train: Vec<(u64, f64)>,
    pub val: Vec<(u64, f64)>,
    pub tokens_per_s: Vec<(u64, f64)>,
}

impl Curves {
    pub fn from_jsonl(text: &str) -> Self {
        let (mut train, mut val, mut tps) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a torn last line of a crashed run
            };
            let Some(step) = v["step"].as_u64() else {
                continue;
            };
            // A resumed run trains the steps after its checkpoint again: drop what follows.
            if let Some(loss) = v["loss"].as_f64() {
                train.split_off(&step);
                val.split_off(&step);
                tps.split_off(&step);
                if loss.is_finite() {
                    train.insert(step, loss);
                }
            }
            if let Some(t) = v["tokens_per_s"].as_f64().filter(|t| t.is_finite()) {
                tps.insert(step, t);
            }
            if let Some(l) = v["val_loss"].as_f64().filter(|l| l.is_finite()) {
                val.insert(step, l);
            }
        }
        Curves {
            train: train.into_iter().collect(),
            val: val.into_iter().collect(),
            tokens_per_s: tps.into_iter().collect(),
        }
    }

    pub fn read(run: &str) -> Result<Self> {
        let store = Store::open(run)?;
        let Some(bytes) = store.get("metrics.jsonl")? else {
            bail!("{run} has no metrics.jsonl (is it a run folder, e.g. OUTPUT/runs/NAME?)");
        };
        let curves = Curves::from_jsonl(&String::from_utf8_lossy(&bytes));
        if curves.train.is_empty() {
            bail!("{run}/metrics.jsonl has no step with a loss yet");
        }
        Ok(curves)
    }
}

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the embedded font parses"));
    });
}

fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &Curves, title: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("draw the plot: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically((root.dim_in_pixel().1 as f64 * 0.62) as u32);
    let last = c.train.last().map_or(1, |p| p.0).max(1);
    let first = c.train.first().map_or(0, |p| p.0);
    let steps = first..last;
    let blue = RGBColor(47, 111, 222);
    let orange = RGBColor(224, 99, 45);
    let green = RGBColor(42, 157, 106);

    let losses = c.train.iter().chain(&c.val).map(|p| p.1);
    let mut chart = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(steps.clone(), range(losses))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .light_line_style(RGBColor(236, 238, 242))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            c.train.iter().copied(),
            blue.stroke_width(2),
        ))
        .map_err(err)?
        .label("train")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], blue.stroke_width(3)));
    if !c.val.is_empty() {
        chart
            .draw_series(LineSeries::new(
                c.val.iter().copied(),
                orange.stroke_width(2),
            ))
            .map_err(err)?
            .label("validation")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], orange.stroke_width(3))
            });
        chart
            .draw_series(c.val.iter().map(|p| Circle::new(*p, 3, orange.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(201, 206, 216))
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(err)?;

    if !c.tokens_per_s.is_empty() {
        let mut chart = ChartBuilder::on(&bottom)
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(steps, range(c.tokens_per_s.iter().map(|p| p.1)))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("tokens/s")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(RGBColor(236, 238, 242))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                c.tokens_per_s.iter().copied(),
                green.stroke_width(2),
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn title(run: &str, c: &Curves) -> String {
    let name = run.trim_end_matches('/').rsplit('/').next().unwrap_or(run);
    let (step, loss) = c.train.last().copied().unwrap_or_default();
    let val = c
        .val
        .last()
        .map_or(String::new(), |v| format!(", validation {:.4}", v.1));
    format!("{name}: step {step}, loss {loss:.4}{val}")
}

/// The plot as an SVG document.
pub fn svg(run: &str, c: &Curves, size: (u32, u32)) -> Result<String> {
    register_font();
    let mut out = String::new();
    draw(
        SVGBackend::with_string(&mut out, size).into_drawing_area(),
        c,
        &title(run, c),
    )?;
    Ok(out)
}

pub fn write(run: &str, c: &Curves, out: &Path, size: (u32, u32)) -> Result<()> {
    match out.extension().and_then(|e| e.to_str()) {
        Some("svg") => std::fs::write(out, svg(run, c, size)?)
            .with_context(|| format!("write {}", out.display())),
        Some("png") => {
            register_font();
            draw(
                BitMapBackend::new(out, size).into_drawing_area(),
                c,
                &title(run, c),
            )
        }
        _ => bail!("{}: the plot is written as .svg or .png", out.display()),
    }
}

pub fn run(a: PlotArgs) -> Result<()> {
    let curves = Curves::read(&a.run)?;
    write(&a.run, &curves, &a.out, a.size)?;
    eprintln!(
        "wrote {} ({} logged steps, {} validation points)",
        a.out.display(),
        curves.train.len(),
        curves.val.len()
    );
    Ok(())
}

/// At the end of training: `loss.svg` into the run, beside `metrics.jsonl`. A run without
/// metrics gets none; a failure is a warning, never the run's error.
pub fn write_into_run(run: &str) {
    let result = (|| -> Result<bool> {
        let store = Store::open(run)?;
        if store.get("metrics.jsonl")?.is_none() {
            return Ok(false);
        }
        let curves = Curves::read(run)?;
        store.put("loss.svg", svg(run, &curves, (1000, 700))?.into())?;
        Ok(true)
    })();
    match result {
        Ok(true) => tracing::info!("wrote {run}/loss.svg"),
        Ok(false) => {}
        Err(e) => tracing::warn!("plot {run}/loss.svg: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_keeps_the_records_of_its_second_pass() {
        let text = [
            r#"{"step":1,"loss":5.0,"tokens_per_s":100.0}"#,
            r#"{"step":2,"loss":4.0,"tokens_per_s":100.0,"val_loss":4.5}"#,
            r#"{"step":3,"loss":3.5,"tokens_per_s":100.0}"#,
            // Crashed after step 3; resumed from the checkpoint at step 2.
            r#"{"step":3,"loss":3.4,"tokens_per_s":90.0}"#,
            r#"{"step":4,"loss":3.0,"tokens_per_s":95.0,"val_loss":3.2}"#,
            r#"{"event":"stage_end"}"#,
            r#"{"step":5,"loss":2.9,"tok"#,
        ]
        .join("\n");
        let c = Curves::from_jsonl(&text);
        assert_eq!(c.train, vec![(1, 5.0), (2, 4.0), (3, 3.4), (4, 3.0)]);
        assert_eq!(c.val, vec![(2, 4.5), (4, 3.2)]);
        assert_eq!(
            c.tokens_per_s,
            vec![(1, 100.0), (2, 100.0), (3, 90.0), (4, 95.0)]
        );
    }

    #[test]
    fn the_svg_has_both_curves_and_readable_labels() {
        let c = Curves::from_jsonl(
            &(1..=50)
                .map(|s| {
                    let val = if s % 10 == 0 {
                        format!(r#","val_loss":{}"#, 6.0 - s as f64 / 20.0)
                    } else {
                        String::new()
                    };
                    format!(
                        r#"{{"step":{s},"loss":{},"tokens_per_s":1000.0{val}}}"#,
                        6.0 - s as f64 / 25.0
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let svg = svg("out/runs/demo", &c, (800, 600)).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for label in [
            "demo: step 50, loss 4.0000, validation 3.5000",
            "train",
            "validation",
            "step",
            "loss",
            "tokens/s",
        ] {
            assert!(texts.contains(&label), "no label {label:?}");
        }
        // The train curve and its legend, the validation curve and its legend, tokens/s.
        assert_eq!(svg.matches(r##"stroke="#2F6FDE""##).count(), 2);
        assert_eq!(svg.matches(r##"stroke="#E0632D""##).count(), 2);
        assert_eq!(svg.matches(r##"stroke="#2A9D6A""##).count(), 1);
    }

    #[test]
    fn sizes_and_formats_are_checked() {
        assert_eq!(parse_size("640x480"), Ok((640, 480)));
        assert!(parse_size("640").is_err() && parse_size("0x480").is_err());
        let c = Curves::from_jsonl(r#"{"step":1,"loss":1.0}"#);
        let e = write("r", &c, Path::new("/tmp/x.jpg"), (200, 200)).unwrap_err();
        assert!(e.to_string().contains(".svg or .png"), "{e}");
    }
}
