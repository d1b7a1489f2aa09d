//! Figures into tables: medians, percentiles, and aligned columns.

use std::time::Duration;

/// The median of `v` (the upper one of an even count); NaN if empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The median of `v` with `places` decimals, or "-" if there is none.
pub fn median_cell(v: &[f64], places: usize) -> String {
    let m = median(v);
    if m.is_nan() {
        "-".to_string()
    } else {
        format!("{m:.places$}")
    }
}

/// The nearest-rank percentile `p` (0..=100) of `v`; None if empty.
pub fn percentile(v: &[Duration], p: f64) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len().max(1)) - 1).copied()
}

/// `a / b` to two places, or "-" when either side is missing.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}", a / b),
        _ => "-".to_string(),
    }
}

/// The median of byte counts; None if there are none.
pub fn median_bytes(v: &[u64]) -> Option<u64> {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied()
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// A titled table: the first column left-aligned, the others right-aligned,
/// then notes (skipped peers, problems seen in logs) under it.
pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Table {
    pub fn new(title: impl Into<String>, header: &[&str]) -> Table {
        Table {
            title: title.into(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len(), "one cell per column");
        self.rows.push(cells);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    pub fn notes_extend(&mut self, notes: impl IntoIterator<Item = String>) {
        self.notes.extend(notes);
    }

    pub fn print(&self) {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::from(" ");
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                let pad = w.saturating_sub(cell.chars().count());
                if i == 0 {
                    out.push_str(&format!(" {cell}{}", " ".repeat(pad)));
                } else {
                    out.push_str(&format!("  {}{cell}", " ".repeat(pad)));
                }
            }
            println!("{}", out.trim_end());
        };
        println!("\n{}\n", self.title);
        line(&self.header);
        for row in &self.rows {
            line(row);
        }
        for note in &self.notes {
            println!("  note: {note}");
        }
    }
}

/// A note for a table when a row's logs had warnings or errors: how many,
/// and the first of them.
pub fn problems_note(label: &str, problems: &[String]) -> Option<String> {
    let first = problems.first()?;
    Some(format!(
        "{label}: {} warning/error line(s) in its logs, first: {}",
        problems.len(),
        first.trim()
    ))
}
