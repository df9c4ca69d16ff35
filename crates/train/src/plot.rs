//! Line charts rendered straight to PNG: the `loss.png` and `lr.png` figures written after a
//! training run. Text is drawn with a built-in pixel font, so the output does not depend on
//! the fonts (or lack of them) on the training machine.

use std::path::Path;

use anyhow::Context;

use crate::raster::{Canvas, Direction, Rect, CAP_ROWS, GLYPH_ROWS};

/// One line on a chart.
pub struct Series<'a> {
    pub name: &'a str,
    /// `(x, y)` pairs, joined in order; points with a non-finite coordinate are skipped.
    pub points: &'a [(f64, f64)],
    pub color: [u8; 3],
    /// Also draws a square at every point, for sparse series such as validation loss.
    pub markers: bool,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series<'a>>,
}

impl Chart<'_> {
    /// Renders to an RGB image (width × height) and writes it as PNG, atomically (write `path`
    /// via a temporary file in the same directory + rename).
    pub fn write_png(&self, path: &Path, width: u32, height: u32) -> anyhow::Result<()> {
        let pixels = self.render(width, height);
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().context("encoding PNG")?;
        writer.write_image_data(&pixels).context("encoding PNG")?;
        writer.finish().context("encoding PNG")?;

        let file_name = path
            .file_name()
            .with_context(|| format!("{} is not a file path", path.display()))?;
        let tmp = path.with_file_name(format!(
            ".{}.tmp{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|err| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::Error::new(err).context(format!("renaming to {}", path.display()))
        })
    }

    /// The RGB pixels (row-major, 3 bytes per pixel) — for tests.
    pub fn render(&self, width: u32, height: u32) -> Vec<u8> {
        self.draw(width, height).0.pixels
    }

    /// Draws the chart and also returns the plot frame, which tests check pixels against.
    fn draw(&self, width: u32, height: u32) -> (Canvas, Rect) {
        let mut canvas = Canvas::new(width, height);
        let s = canvas.scale;
        let (pad, tick_len, label_gap, line_height) = (5 * s, 3 * s, 2 * s, GLYPH_ROWS * s);

        let (x_range, y_range) = (self.x_range(), self.y_range());
        let (x_ticks, y_ticks) = (
            nice_ticks(x_range.0, x_range.1),
            nice_ticks(y_range.0, y_range.1),
        );
        let (x_labels, y_labels) = (x_ticks.labels(), y_ticks.labels());
        let widest = |labels: &[String]| {
            labels
                .iter()
                .map(|l| canvas.text_width(l))
                .max()
                .unwrap_or(0)
        };

        let plot = Rect::new(
            pad + line_height + pad + widest(&y_labels) + label_gap + tick_len,
            pad + line_height + pad,
            // Room for half of an x tick label centred on the right edge.
            canvas.width - 1 - pad - widest(&x_labels) / 2,
            canvas.height - 1 - (tick_len + label_gap + line_height + pad + line_height + pad),
        );
        let inside = plot.inset(1);
        let x_map = Mapping {
            range: x_range,
            pixels: (inside.left, inside.right),
        };
        let y_map = Mapping {
            range: y_range,
            pixels: (inside.bottom, inside.top),
        };

        for (&value, label) in x_ticks.values.iter().zip(&x_labels) {
            let x = x_map.pixel(value);
            if (plot.left..=plot.right).contains(&x) {
                canvas.fill(Rect::new(x, inside.top, x, inside.bottom), GRID);
                canvas.fill(Rect::new(x, plot.bottom, x, plot.bottom + tick_len), INK);
                let label_x = x - canvas.text_width(label) / 2;
                canvas.text(
                    label_x,
                    plot.bottom + tick_len + label_gap,
                    label,
                    Direction::Right,
                    INK,
                );
            }
        }
        for (&value, label) in y_ticks.values.iter().zip(&y_labels) {
            let y = y_map.pixel(value);
            if (plot.top..=plot.bottom).contains(&y) {
                canvas.fill(Rect::new(inside.left, y, inside.right, y), GRID);
                canvas.fill(Rect::new(plot.left - tick_len, y, plot.left, y), INK);
                let label_x = plot.left - tick_len - label_gap - canvas.text_width(label);
                canvas.text(label_x, y - CAP_ROWS * s / 2, label, Direction::Right, INK);
            }
        }

        for series in &self.series {
            let mut pixels: Vec<(i64, i64)> = finite_points(series.points)
                .map(|(x, y)| (x_map.pixel(x), y_map.pixel(y)))
                .collect();
            // Long runs put thousands of points on one pixel; drawing each once is enough.
            pixels.dedup();
            for pair in pixels.windows(2) {
                canvas.line(pair[0], pair[1], inside, series.color);
            }
            if series.markers || pixels.len() == 1 {
                for &(x, y) in &pixels {
                    canvas.fill(Rect::around(x, y, s + 1).intersect(inside), series.color);
                }
            }
        }

        canvas.frame(plot, INK);
        if self.series.len() > 1 {
            self.draw_legend(&mut canvas, inside);
        }

        let title_x = (canvas.width - canvas.text_width(self.title)) / 2;
        // Drawn twice, a pixel apart, for a bold title.
        for dx in [0, 1] {
            canvas.text(title_x + dx, pad, self.title, Direction::Right, INK);
        }
        let x_label_x = (plot.left + plot.right - canvas.text_width(self.x_label)) / 2;
        let x_label_y = canvas.height - pad - line_height;
        canvas.text(x_label_x, x_label_y, self.x_label, Direction::Right, INK);
        let y_label_y = (plot.top + plot.bottom + canvas.text_width(self.y_label)) / 2;
        canvas.text(pad, y_label_y, self.y_label, Direction::Up, INK);
        (canvas, plot)
    }

    /// A box in the top-right corner of the plot (where falling loss curves rarely are), one
    /// row per series: a short stroke in its color, then its name.
    fn draw_legend(&self, canvas: &mut Canvas, inside: Rect) {
        let s = canvas.scale;
        let (pad, swatch, row_height) = (4 * s, 12 * s, GLYPH_ROWS * s + 2 * s);
        let names_width = self
            .series
            .iter()
            .map(|series| canvas.text_width(series.name))
            .max();
        let (right, top) = (inside.right - pad, inside.top + pad);
        let legend = Rect::new(
            right - (pad + swatch + pad + names_width.unwrap_or(0) + pad),
            top,
            right,
            top + pad + row_height * self.series.len() as i64 - 2 * s + pad,
        );
        canvas.fill(legend, WHITE);
        canvas.frame(legend, LEGEND_FRAME);
        for (row_top, series) in (legend.top + pad..)
            .step_by(row_height as usize)
            .zip(&self.series)
        {
            let (stroke_left, mid_y) = (legend.left + pad, row_top + CAP_ROWS * s / 2);
            let stroke = Rect::new(
                stroke_left,
                mid_y - s / 2,
                stroke_left + swatch,
                mid_y - s / 2 + 1,
            );
            canvas.fill(stroke, series.color);
            if series.markers {
                canvas.fill(
                    Rect::around(stroke_left + swatch / 2, mid_y, s + 1),
                    series.color,
                );
            }
            canvas.text(
                stroke_left + swatch + pad,
                row_top,
                series.name,
                Direction::Right,
                INK,
            );
        }
    }

    fn all_points(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.series
            .iter()
            .flat_map(|series| finite_points(series.points))
    }

    /// Exactly the data's x extent: training curves start and end at the edges.
    fn x_range(&self) -> (f64, f64) {
        match min_max(self.all_points().map(|(x, _)| x)) {
            None => (0.0, 1.0),
            Some((lo, hi)) if lo == hi => pad_single_value(lo),
            Some(range) => range,
        }
    }

    /// The data's y extent plus 5% either side, so the curve does not run along the frame.
    fn y_range(&self) -> (f64, f64) {
        match min_max(self.all_points().map(|(_, y)| y)) {
            None => (0.0, 1.0),
            Some((lo, hi)) if lo == hi => pad_single_value(lo),
            Some((lo, hi)) => {
                let margin = (hi - lo) * 0.05;
                (lo - margin, hi + margin)
            }
        }
    }
}

const WHITE: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [226, 226, 226];
const LEGEND_FRAME: [u8; 3] = [170, 170, 170];

fn finite_points(points: &[(f64, f64)]) -> impl Iterator<Item = (f64, f64)> + '_ {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
}

fn min_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |range, v| match range {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// A range around a lone value, so that it gets ticks and sits in the middle of the axis.
fn pad_single_value(v: f64) -> (f64, f64) {
    let half = if v == 0.0 { 0.5 } else { v.abs() * 0.05 };
    (v - half, v + half)
}

/// Tick positions on an axis: multiples of `step`, which is 1, 2 or 5 times a power of ten.
#[derive(Debug)]
struct Ticks {
    step: f64,
    values: Vec<f64>,
}

impl Ticks {
    fn labels(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|&v| format_tick(v, self.step))
            .collect()
    }
}

/// Tolerance in units of one step, so that a tick at exactly an end of the range survives
/// rounding.
const TICK_SLACK: f64 = 1e-6;

/// The largest 1-2-5 step giving 5 to 8 ticks inside `lo..=hi`, or failing that the one closest
/// to 6 ticks. Empty when the range is empty or not finite.
fn nice_ticks(lo: f64, hi: f64) -> Ticks {
    let none = Ticks {
        step: 1.0,
        values: Vec::new(),
    };
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return none;
    }
    let top_exponent = span.log10().floor() as i32;
    let mut closest: Option<(f64, f64, i32)> = None;
    for exponent in (top_exponent - 2..=top_exponent + 1).rev() {
        for mantissa in [5.0, 2.0, 1.0] {
            let step = scale10(mantissa, exponent);
            let count = (hi / step + TICK_SLACK).floor() - (lo / step - TICK_SLACK).ceil() + 1.0;
            if !count.is_finite() {
                continue;
            }
            if (5.0..=8.0).contains(&count) {
                return ticks_at(lo, mantissa, exponent, count);
            }
            if closest.is_none_or(|(best, _, _)| (count - 6.0).abs() < (best - 6.0).abs()) {
                closest = Some((count, mantissa, exponent));
            }
        }
    }
    match closest {
        Some((count, mantissa, exponent)) if (1.0..=50.0).contains(&count) => {
            ticks_at(lo, mantissa, exponent, count)
        }
        _ => none,
    }
}

fn ticks_at(lo: f64, mantissa: f64, exponent: i32, count: f64) -> Ticks {
    let step = scale10(mantissa, exponent);
    let first = (lo / step - TICK_SLACK).ceil();
    // Multiplying whole numbers first keeps values like 3e-4 exact instead of 3.0000000000000003e-4.
    let values = (0..count as usize)
        .map(|i| scale10((first + i as f64) * mantissa, exponent))
        .collect();
    Ticks { step, values }
}

/// `m × 10^exponent`, dividing for negative exponents because 10^-k is not exact in binary.
fn scale10(m: f64, exponent: i32) -> f64 {
    if exponent >= 0 {
        m * 10f64.powi(exponent)
    } else {
        m / 10f64.powi(-exponent)
    }
}

/// A short label for a tick: plain decimals with just the digits the step needs (`250`, `1.5`),
/// or `2e-4` style for steps under 0.001 or from 10^5 up, where decimals would get long.
fn format_tick(value: f64, step: f64) -> String {
    if value.abs() < step * 1e-6 {
        return "0".to_string();
    }
    let step_exponent = (step.log10() + 1e-9).floor() as i32;
    if !(-3..5).contains(&step_exponent) {
        let value_exponent = (value.abs().log10() + 1e-9).floor() as i32;
        let decimals = (value_exponent - step_exponent).max(0) as usize;
        let text = format!("{value:.decimals$e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        format!("{}e{exponent}", trim_zeros(mantissa))
    } else {
        let decimals = (-step_exponent).max(0) as usize;
        trim_zeros(&format!("{value:.decimals$}")).to_string()
    }
}

fn trim_zeros(number: &str) -> &str {
    if number.contains('.') {
        number.trim_end_matches('0').trim_end_matches('.')
    } else {
        number
    }
}

/// Maps data values on one axis to pixel positions: `range.0` to `pixels.0`, `range.1` to
/// `pixels.1`.
struct Mapping {
    range: (f64, f64),
    pixels: (i64, i64),
}

impl Mapping {
    fn pixel(&self, value: f64) -> i64 {
        let ((lo, hi), (from, to)) = (self.range, self.pixels);
        let fraction = (value - lo) / (hi - lo);
        // A NaN fraction (from an infinite span) becomes 0 in the saturating cast.
        (from as f64 + fraction * (to - from) as f64).round() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGENTA: [u8; 3] = [200, 0, 200];
    const TEAL: [u8; 3] = [0, 150, 150];

    fn chart<'a>(series: Vec<Series<'a>>) -> Chart<'a> {
        Chart {
            title: "Training loss",
            x_label: "step",
            y_label: "loss",
            series,
        }
    }

    fn line<'a>(name: &'a str, points: &'a [(f64, f64)], color: [u8; 3]) -> Series<'a> {
        Series {
            name,
            points,
            color,
            markers: false,
        }
    }

    /// `(x, y)` of every pixel of exactly `color`.
    fn pixels_of(canvas: &Canvas, color: [u8; 3]) -> Vec<(i64, i64)> {
        (0..canvas.height)
            .flat_map(|y| (0..canvas.width).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let at = (y * canvas.width + x) as usize * 3;
                canvas.pixels[at..at + 3] == color
            })
            .collect()
    }

    #[test]
    fn written_png_decodes_to_the_requested_size_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let points = [(0.0, 3.0), (50.0, 2.0), (100.0, 1.5)];
        let chart = chart(vec![line("train", &points, MAGENTA)]);
        // Twice, so that replacing an existing file is covered as well.
        chart.write_png(&path, 400, 300).unwrap();
        chart.write_png(&path, 640, 400).unwrap();

        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut decoded = vec![0; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut decoded).unwrap();
        assert_eq!((frame.width, frame.height), (640, 400));
        assert_eq!(frame.color_type, png::ColorType::Rgb);
        assert_eq!(decoded[..frame.buffer_size()], chart.render(640, 400)[..]);

        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["loss.png"]);
    }

    #[test]
    fn series_pixels_appear_only_inside_the_frame() {
        let points: Vec<(f64, f64)> = (0..200)
            .map(|i| (i as f64, (i as f64 * 0.1).sin()))
            .collect();
        let (canvas, plot) = chart(vec![line("train", &points, MAGENTA)]).draw(640, 400);
        let colored = pixels_of(&canvas, MAGENTA);
        assert!(colored.len() > 400, "only {} series pixels", colored.len());
        let inside = plot.inset(1);
        assert!(colored
            .iter()
            .all(|&(x, y)| (inside.left..=inside.right).contains(&x)
                && (inside.top..=inside.bottom).contains(&y)));
        // The frame itself is intact on all four sides.
        for (x, y) in [
            (plot.left, plot.top + 5),
            (plot.right, plot.bottom - 5),
            (plot.left + 5, plot.top),
            (plot.right - 5, plot.bottom),
        ] {
            let at = (y * canvas.width + x) as usize * 3;
            assert_eq!(canvas.pixels[at..at + 3], INK);
        }
    }

    #[test]
    fn rising_series_is_drawn_higher_on_the_right() {
        let points: Vec<(f64, f64)> = (0..=10).map(|i| (i as f64, i as f64)).collect();
        let (canvas, plot) = chart(vec![line("lr", &points, MAGENTA)]).draw(640, 400);
        let colored = pixels_of(&canvas, MAGENTA);
        let quarter = (plot.right - plot.left) / 4;
        let mean_row = |keep: &dyn Fn(i64) -> bool| {
            let rows: Vec<i64> = colored
                .iter()
                .filter(|(x, _)| keep(*x))
                .map(|&(_, y)| y)
                .collect();
            assert!(!rows.is_empty());
            rows.iter().sum::<i64>() as f64 / rows.len() as f64
        };
        let left = mean_row(&|x| x < plot.left + quarter);
        let right = mean_row(&|x| x > plot.right - quarter);
        assert!(right + 100.0 < left, "left rows {left}, right rows {right}");
    }

    #[test]
    fn ticks_are_1_2_5_steps_covering_the_range() {
        let ranges = [
            (0.0, 1.0),
            (1e-5, 3e-4),
            (0.9, 11.5),
            (0.0, 250.0),
            (-3.0, 7.0),
            (0.0, 1e6),
            (0.5, 0.52),
            (1.0, 123_456.0),
            (-4.2e-6, 3.2e-4),
        ];
        for (lo, hi) in ranges {
            let ticks = nice_ticks(lo, hi);
            let n = ticks.values.len();
            assert!((5..=8).contains(&n), "{lo}..{hi}: {:?}", ticks);
            let exponent = ticks.step.log10().floor();
            let mantissa = ticks.step / 10f64.powf(exponent);
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-9),
                "{lo}..{hi}: {:?}",
                ticks
            );
            let tolerance = ticks.step * 1e-6;
            assert!(
                ticks.values[0] >= lo - tolerance && ticks.values[0] - lo < ticks.step,
                "{lo}..{hi}: {:?}",
                ticks
            );
            assert!(
                ticks.values[n - 1] <= hi + tolerance && hi - ticks.values[n - 1] < ticks.step,
                "{lo}..{hi}: {:?}",
                ticks
            );
            for pair in ticks.values.windows(2) {
                assert!(
                    (pair[1] - pair[0] - ticks.step).abs() < tolerance,
                    "{lo}..{hi}: {:?}",
                    ticks
                );
            }
        }
        assert_eq!(nice_ticks(0.9, 11.5).values, [2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(
            nice_ticks(1e-5, 3e-4).values,
            [5e-5, 1e-4, 1.5e-4, 2e-4, 2.5e-4, 3e-4]
        );
        assert!(nice_ticks(1.0, 1.0).values.is_empty());
        assert!(nice_ticks(0.0, f64::INFINITY).values.is_empty());
        assert!(nice_ticks(f64::NAN, 1.0).values.is_empty());
    }

    #[test]
    fn tick_labels_are_short_and_distinct() {
        let labels = |lo: f64, hi: f64| {
            let ticks = nice_ticks(lo, hi);
            ticks
                .values
                .iter()
                .map(|&v| format_tick(v, ticks.step))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            labels(0.0, 1000.0),
            ["0", "200", "400", "600", "800", "1000"]
        );
        assert_eq!(labels(0.9, 3.2), ["1", "1.5", "2", "2.5", "3"]);
        assert_eq!(
            labels(1e-5, 3e-4),
            ["5e-5", "1e-4", "1.5e-4", "2e-4", "2.5e-4", "3e-4"]
        );
        assert_eq!(
            labels(-1e-5, 1.05e-3),
            ["0", "2e-4", "4e-4", "6e-4", "8e-4", "1e-3"]
        );
        assert_eq!(
            labels(0.0, 1.2e6),
            ["0", "2e5", "4e5", "6e5", "8e5", "1e6", "1.2e6"]
        );
        assert_eq!(labels(0.5, 0.52), ["0.5", "0.505", "0.51", "0.515", "0.52"]);
        assert_eq!(format_tick(-0.5, 0.5), "-0.5");
        assert_eq!(format_tick(1e-17, 0.5), "0");
    }

    #[test]
    fn degenerate_input_draws_axes_without_panicking() {
        let nan = [
            (f64::NAN, 1.0),
            (1.0, f64::INFINITY),
            (2.0, f64::NEG_INFINITY),
        ];
        let with_nan = [
            (0.0, 2.0),
            (1.0, f64::NAN),
            (2.0, 1.0),
            (f64::INFINITY, 0.5),
        ];
        let flat = [(0.0, 2.0), (10.0, 2.0), (20.0, 2.0)];
        let long: Vec<(f64, f64)> = (0..200_000)
            .map(|i| (i as f64 * 50.0, 1.0 / (1.0 + i as f64)))
            .collect();
        let huge = [(-1e308, -1e308), (1e308, 1e308)];
        let cases: [&[(f64, f64)]; 7] = [&[], &nan, &with_nan, &flat, &long, &huge, &[(5.0, 5.0)]];
        for points in cases {
            for (width, height) in [(0, 0), (1, 1), (30, 20), (640, 400)] {
                let pixels = chart(vec![line("a", points, MAGENTA), line("b", &[], TEAL)])
                    .render(width, height);
                assert_eq!(pixels.len(), width as usize * height as usize * 3);
            }
        }
        let (canvas, _) = chart(Vec::new()).draw(640, 400);
        assert!(!pixels_of(&canvas, INK).is_empty());
        assert_eq!(chart(vec![line("a", &nan, MAGENTA)]).x_range(), (0.0, 1.0));
        assert_eq!(
            chart(vec![line("a", &with_nan, MAGENTA)]).x_range(),
            (0.0, 2.0)
        );
    }

    #[test]
    fn flat_series_sits_in_the_middle_of_a_padded_range() {
        let flat = [(0.0, 2.0), (10.0, 2.0), (20.0, 2.0)];
        let chart = chart(vec![line("lr", &flat, MAGENTA)]);
        let (lo, hi) = chart.y_range();
        assert!(lo < 2.0 && 2.0 < hi);
        let (canvas, plot) = chart.draw(640, 400);
        let rows: Vec<i64> = pixels_of(&canvas, MAGENTA)
            .iter()
            .map(|&(_, y)| y)
            .collect();
        let middle = (plot.top + plot.bottom) / 2;
        assert!(
            rows.iter().all(|y| (y - middle).abs() <= 2),
            "rows {:?} vs middle {middle}",
            rows
        );
    }

    #[test]
    fn single_points_and_marker_series_get_squares() {
        let lone = [(100.0, 1.0)];
        let (canvas, _) = chart(vec![line("val", &lone, MAGENTA)]).draw(640, 400);
        // A (2s+3)² square at scale 2.
        assert_eq!(pixels_of(&canvas, MAGENTA).len(), 49);

        let val = [(0.0, 2.0), (50.0, 1.5), (100.0, 1.0)];
        let plain = pixels_of(
            &chart(vec![line("val", &val, MAGENTA)]).draw(640, 400).0,
            MAGENTA,
        )
        .len();
        let marked = Series {
            markers: true,
            ..line("val", &val, MAGENTA)
        };
        let with_markers = pixels_of(&chart(vec![marked]).draw(640, 400).0, MAGENTA).len();
        assert!(with_markers > plain + 50, "{with_markers} vs {plain}");
    }

    #[test]
    fn legend_appears_only_with_several_series() {
        let train = [(0.0, 2.0), (100.0, 1.0)];
        let val = [(50.0, 1.8), (100.0, 1.2)];
        let one = chart(vec![line("train", &train, MAGENTA)]).draw(640, 400).0;
        assert!(pixels_of(&one, LEGEND_FRAME).is_empty());
        let two = chart(vec![
            line("train", &train, MAGENTA),
            line("validation", &val, TEAL),
        ])
        .draw(640, 400)
        .0;
        assert!(pixels_of(&two, LEGEND_FRAME).len() > 100);
    }
}
