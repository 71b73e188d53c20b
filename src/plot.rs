//! Minimal PNG line plots for run reports (loss curves, validation NDCG@10): axes, tick labels, a legend
//! and one polyline per series, drawn into an RGB buffer with an 8×8 bitmap font and written with `png`.
//! No system fonts are needed, so plots render the same on every machine.
use std::path::Path;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const W: usize = 900;
const H: usize = 500;
const LEFT: usize = 80;
const RIGHT: usize = 220;
const TOP: usize = 40;
const BOTTOM: usize = 50;
const PALETTE: [[u8; 3]; 8] = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                              [140, 86, 75], [227, 119, 194], [127, 127, 127]];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            self.set(x.round() as i64, y.round() as i64, c);
            self.set(x.round() as i64, y.round() as i64 + 1, c);
        }
    }
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[(ch as usize).min(127)];
            for (r, bits) in glyph.iter().enumerate() {
                for b in 0..8 {
                    if bits >> b & 1 == 1 {
                        self.set((x + k * 8 + b) as i64, (y + r) as i64, c);
                    }
                }
            }
        }
    }
}

fn label(v: f64) -> String {
    if v.abs() >= 1000.0 { format!("{v:.0}") } else if v.abs() >= 10.0 { format!("{v:.1}") } else { format!("{v:.3}") }
}

/// Draws the series (x ascending) and writes a PNG.
pub fn line_plot(path: &Path, title: &str, x_label: &str, series: &[Series]) -> std::io::Result<()> {
    let mut cv = Canvas { px: vec![255; W * H * 3] };
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 { x1 = x0 + 1.0; }
    if y1 <= y0 { y1 = y0 + 1e-6; }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = ((W - LEFT - RIGHT) as f64, (H - TOP - BOTTOM) as f64);
    let map = |x: f64, y: f64| (LEFT as f64 + (x - x0) / (x1 - x0) * pw, TOP as f64 + (1.0 - (y - y0) / (y1 - y0)) * ph);
    let axis = [0, 0, 0];
    let grid = [225, 225, 225];
    for t in 0..=5 {
        let f = t as f64 / 5.0;
        let (gx, _) = map(x0 + f * (x1 - x0), y0);
        let (_, gy) = map(x0, y0 + f * (y1 - y0));
        cv.line((gx, TOP as f64), (gx, (H - BOTTOM) as f64), grid);
        cv.line((LEFT as f64, gy), ((W - RIGHT) as f64, gy), grid);
        cv.text(gx as usize - 12, H - BOTTOM + 8, &label(x0 + f * (x1 - x0)), axis);
        let yl = label(y0 + f * (y1 - y0));
        cv.text(LEFT - 8 - yl.len() * 8, gy as usize - 4, &yl, axis);
    }
    cv.line((LEFT as f64, TOP as f64), (LEFT as f64, (H - BOTTOM) as f64), axis);
    cv.line((LEFT as f64, (H - BOTTOM) as f64), ((W - RIGHT) as f64, (H - BOTTOM) as f64), axis);
    cv.text(LEFT, 14, title, axis);
    cv.text(LEFT + (W - LEFT - RIGHT) / 2 - x_label.len() * 4, H - 20, x_label, axis);
    for (k, s) in series.iter().enumerate() {
        let c = PALETTE[k % PALETTE.len()];
        let mut prev: Option<(f64, f64)> = None;
        for &(x, y) in &s.points {
            if !(x.is_finite() && y.is_finite()) {
                prev = None;
                continue;
            }
            let p = map(x, y);
            if let Some(q) = prev {
                cv.line(q, p, c);
            } else {
                cv.line(p, p, c);
            }
            prev = Some(p);
        }
        let ly = TOP + 10 + k * 16;
        cv.line(((W - RIGHT + 12) as f64, ly as f64 + 3.0), ((W - RIGHT + 32) as f64, ly as f64 + 3.0), c);
        cv.text(W - RIGHT + 38, ly, &s.name.chars().take(22).collect::<String>(), axis);
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().map_err(std::io::Error::other)?;
        w.write_image_data(&cv.px).map_err(std::io::Error::other)?;
    }
    crate::checkpoint::write_atomic(path, &bytes)
}
