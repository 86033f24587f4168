//! `inspect --plot FILE.svg`: where the bytes went, at a glance. Three heat maps, one per
//! series: the pruning rate, the standard deviation of the dequantized delta (what the variance
//! allocation ranks by) and the bytes stored (the tensor's records: positions, levels, coded
//! data). Columns are the transformer blocks, rows the matrices of a block (the name after the
//! block number); tensors outside the blocks (embeddings, heads, final norms) are listed
//! below the maps with their three values. Hand-written SVG, no plotting runtime: every cell
//! is a `rect` with `data-series`, `data-block`, `data-matrix` and `data-value` attributes and
//! a `title` (the tooltip a browser shows).

use crate::error::{Error, Result};
use crate::format::{TensorKind, TensorRecord, UdeltaReader};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The three series, with their SVG names and titles.
pub const SERIES: [(&str, &str); 3] = [
    ("rate", "pruning rate"),
    ("std", "std of the dequantized delta"),
    ("bytes", "bytes stored"),
];

/// Cell size and margins (pixels): the columns share [`MAP_W`], each between the bounds of
/// [`CELL_W`].
const MAP_W: usize = 480;
const CELL_W: (usize, usize) = (12, 48);
const CELL_H: usize = 16;
const LABEL_W: usize = 260;
const PANEL_GAP: usize = 40;
const TOP: usize = 50;

/// Colour stops of the scale (viridis, low to high).
const STOPS: [(u8, u8, u8); 5] = [
    (68, 1, 84),
    (59, 82, 139),
    (33, 145, 140),
    (94, 201, 98),
    (253, 231, 37),
];

/// One tensor's three values (`None` where a series does not apply: rate and std of a tensor
/// that is not compressed).
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Pruning rate.
    pub rate: Option<f64>,
    /// Std of the dequantized delta.
    pub std: Option<f64>,
    /// Bytes of its records.
    pub bytes: u64,
}

impl Point {
    fn of(r: &TensorRecord) -> Point {
        match &r.kind {
            TensorKind::Compressed(c) => Point {
                rate: Some(c.rate),
                std: Some(c.std),
                bytes: c.positions.len + c.levels.len + c.tail.map_or(0, |t| t.len),
            },
            TensorKind::Coded(c) => Point {
                rate: None,
                std: None,
                bytes: c.data.len,
            },
            TensorKind::Raw { data } => Point {
                rate: None,
                std: None,
                bytes: data.len,
            },
            TensorKind::Unchanged { .. } => Point {
                rate: None,
                std: None,
                bytes: 0,
            },
        }
    }

    /// The value of series `name`.
    pub fn value(&self, name: &str) -> Option<f64> {
        match name {
            "rate" => self.rate,
            "std" => self.std,
            _ => Some(self.bytes as f64),
        }
    }
}

/// The block number and the matrix name of a tensor inside a numbered block
/// (`model.layers.3.self_attn.q_proj.weight` -> `(3, "self_attn.q_proj.weight")`): the first
/// all-digit component after `layers`, `layer`, `h` or `blocks`.
pub fn block_of(name: &str) -> Option<(usize, String)> {
    let parts: Vec<&str> = name.split('.').collect();
    (1..parts.len()).find_map(|i| {
        let container = ["layers", "layer", "h", "blocks"].contains(&parts[i - 1]);
        let number = parts[i].parse::<usize>().ok().filter(|_| container)?;
        Some((number, parts[i + 1..].join(".")))
    })
}

/// What the plot shows: per block and matrix, and the tensors outside the blocks.
struct Layout {
    blocks: usize,
    /// Width of a column.
    cell_w: usize,
    /// Matrix names in order of first appearance.
    matrices: Vec<String>,
    cells: BTreeMap<(usize, String), Point>,
    others: Vec<(String, Point)>,
}

impl Layout {
    fn of(reader: &UdeltaReader) -> Layout {
        let mut l = Layout {
            blocks: 0,
            cell_w: CELL_W.1,
            matrices: Vec::new(),
            cells: BTreeMap::new(),
            others: Vec::new(),
        };
        for r in &reader.index.tensors {
            let p = Point::of(r);
            match block_of(&r.name) {
                Some((b, m)) => {
                    l.blocks = l.blocks.max(b + 1);
                    if !l.matrices.contains(&m) {
                        l.matrices.push(m.clone());
                    }
                    l.cells.insert((b, m), p);
                }
                None => l.others.push((r.name.clone(), p)),
            }
        }
        l.cell_w = (MAP_W / l.blocks.max(1)).clamp(CELL_W.0, CELL_W.1);
        l
    }

    fn panel_height(&self) -> usize {
        PANEL_GAP + self.matrices.len() * CELL_H + 20
    }
}

/// The SVG of a `.udelta` file's three series.
pub fn render(reader: &UdeltaReader, title: &str) -> String {
    let l = Layout::of(reader);
    let width = LABEL_W + l.blocks.max(1) * l.cell_w + 180;
    let others_h = 20 + 16 * (l.others.len() + 1);
    let height = TOP + SERIES.len() * l.panel_height() + others_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, (series, label)) in SERIES.iter().enumerate() {
        panel(&mut s, &l, series, label, TOP + i * l.panel_height());
    }
    others(&mut s, &l, TOP + SERIES.len() * l.panel_height());
    s.push_str("</svg>\n");
    s
}

/// One heat map: a row per matrix, a column per block, and the colour scale.
fn panel(s: &mut String, l: &Layout, series: &str, label: &str, y0: usize) {
    let values = l.cells.values().filter_map(|p| p.value(series));
    let range = Scale::of(values, series != "rate");
    let _ = writeln!(s, r#"<g class="panel" data-series="{series}">"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}" font-size="13" font-weight="bold">{} (by block; {})</text>"#,
        y0 + 20,
        escape(label),
        range.describe()
    );
    let top = y0 + PANEL_GAP - 12;
    for b in (0..l.blocks).step_by(l.blocks.div_ceil(16).max(1)) {
        let x = LABEL_W + b * l.cell_w + l.cell_w / 2;
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{top}" text-anchor="middle">{b}</text>"#
        );
    }
    for (row, m) in l.matrices.iter().enumerate() {
        let y = y0 + PANEL_GAP + row * CELL_H;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            LABEL_W - 6,
            y + CELL_H - 4,
            escape(m)
        );
        for b in 0..l.blocks {
            if let Some(p) = l.cells.get(&(b, m.clone())) {
                let x = LABEL_W + b * l.cell_w;
                cell(s, series, (b, m), p.value(series), &range, (x, y, l.cell_w));
            }
        }
    }
    legend(
        s,
        &range,
        LABEL_W + l.blocks.max(1) * l.cell_w + 20,
        y0 + PANEL_GAP,
    );
    s.push_str("</g>\n");
}

/// One cell of `(block, matrix)`, coloured by its value (grey where the series does not
/// apply), at `(x, y)` and `w` wide.
fn cell(
    s: &mut String,
    series: &str,
    (block, matrix): (usize, &str),
    value: Option<f64>,
    range: &Scale,
    (x, y, w): (usize, usize, usize),
) {
    let (fill, text) = match value {
        Some(v) => (range.colour(v), format!("{v}")),
        None => ("#dddddd".to_string(), String::new()),
    };
    let shown = if text.is_empty() {
        "n/a (not compressed)".to_string()
    } else {
        text.clone()
    };
    let _ = writeln!(
        s,
        r#"<rect class="cell" data-series="{series}" data-block="{block}" data-matrix="{m}" data-value="{text}" x="{x}" y="{y}" width="{w}" height="{h}" fill="{fill}" stroke="white" stroke-width="0.5"><title>block {block} {m}: {series} {shown}</title></rect>"#,
        m = escape(matrix),
        h = CELL_H,
    );
}

/// The colour scale's bar with its ends labelled.
fn legend(s: &mut String, range: &Scale, x: usize, y: usize) {
    for i in 0..10 {
        let v = range.at(i as f64 / 9.0);
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="14" height="10" fill="{}"/>"#,
            y + (9 - i) * 10,
            range.colour(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}">{}</text>"#,
        x + 18,
        y + 9,
        short(range.hi)
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}">{}</text>"#,
        x + 18,
        y + 99,
        short(range.lo)
    );
}

/// The tensors outside the blocks, one line each with the three values.
fn others(s: &mut String, l: &Layout, y0: usize) {
    let _ = writeln!(s, r#"<g class="others">"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}" font-size="13" font-weight="bold">outside the blocks</text>"#,
        y0 + 16
    );
    for (i, (name, p)) in l.others.iter().enumerate() {
        let f = |v: Option<f64>| v.map_or("n/a".to_string(), short);
        let _ = writeln!(
            s,
            r#"<text class="other" x="10" y="{}" data-name="{n}">{n}: rate {}, std {}, {} bytes</text>"#,
            y0 + 32 + i * 16,
            f(p.rate),
            f(p.std),
            p.bytes,
            n = escape(name),
        );
    }
    s.push_str("</g>\n");
}

/// A panel's colour scale: linear, or logarithmic for spreads over decades (std, bytes).
struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Scale {
    fn of(values: impl Iterator<Item = f64>, log_if_positive: bool) -> Scale {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if lo > hi {
            (lo, hi) = (0.0, 1.0);
        }
        Scale {
            lo,
            hi,
            log: log_if_positive && lo > 0.0 && hi / lo > 10.0,
        }
    }

    fn fraction(&self, v: f64) -> f64 {
        let f = if self.log {
            (v.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        };
        if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            0.5
        }
    }

    fn at(&self, f: f64) -> f64 {
        if self.log {
            (self.lo.ln() + f * (self.hi.ln() - self.lo.ln())).exp()
        } else {
            self.lo + f * (self.hi - self.lo)
        }
    }

    fn colour(&self, v: f64) -> String {
        let f = self.fraction(v) * (STOPS.len() - 1) as f64;
        let i = (f.floor() as usize).min(STOPS.len() - 2);
        let t = f - i as f64;
        let mix = |a: u8, b: u8| (a as f64 + t * (b as f64 - a as f64)).round() as u8;
        let (a, b) = (STOPS[i], STOPS[i + 1]);
        format!(
            "#{:02x}{:02x}{:02x}",
            mix(a.0, b.0),
            mix(a.1, b.1),
            mix(a.2, b.2)
        )
    }

    fn describe(&self) -> String {
        format!(
            "{} to {}{}",
            short(self.lo),
            short(self.hi),
            if self.log { ", log scale" } else { "" }
        )
    }
}

/// A value in a few significant digits.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// XML text and attribute escaping.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes the plot of `reader` to `path` (staged: a failed write leaves nothing).
pub fn write_plot(reader: &UdeltaReader, input: &Path, path: &Path) -> Result<()> {
    let index = &reader.index;
    let file = input.file_name().map(|n| n.to_string_lossy().into_owned());
    let title = format!(
        "{}: model {}, s = {}, {} bits",
        file.unwrap_or_default(),
        index.model.name,
        index.params.sparsity,
        index.params.bits
    );
    let svg = render(reader, &title);
    let staged = crate::staging::StagedPath::new(path, true)?;
    std::fs::write(staged.path(), svg).map_err(|e| Error::io(path, e))?;
    staged.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_and_matrix_names() {
        assert_eq!(
            block_of("model.layers.12.self_attn.q_proj.weight"),
            Some((12, "self_attn.q_proj.weight".into()))
        );
        assert_eq!(
            block_of("encoder.layer.3.attention.self.query.weight"),
            Some((3, "attention.self.query.weight".into()))
        );
        assert_eq!(
            block_of("transformer.h.0.attn.c_attn.weight"),
            Some((0, "attn.c_attn.weight".into()))
        );
        assert_eq!(block_of("model.embed_tokens.weight"), None);
        assert_eq!(block_of("model.layers.x.mlp"), None);
    }

    #[test]
    fn scale_colours_ends_and_log() {
        let s = Scale::of([1.0, 1000.0].into_iter(), true);
        assert!(s.log);
        assert_eq!(s.colour(1.0), "#440154");
        assert_eq!(s.colour(1000.0), "#fde725");
        assert!((s.fraction(31.6227766) - 0.5).abs() < 1e-6);
        let lin = Scale::of([0.9, 0.99].into_iter(), false);
        assert!(!lin.log);
        assert!((lin.fraction(0.945) - 0.5).abs() < 1e-9);
        assert_eq!(escape("a<b&\"c\""), "a&lt;b&amp;&quot;c&quot;");
    }
}
