//! The bench's one table: a row per measurement with its budget and verdict,
//! the number formats the rows share, and the Markdown rendering.

use std::fmt::Write as _;

pub(super) const MIB: f64 = 1024.0 * 1024.0;

pub(super) fn mib(kb: u64) -> String {
    format!("{:.2} MiB", kb as f64 * 1024.0 / MIB)
}

pub(super) fn verdict(ok: bool) -> &'static str {
    if ok { "pass" } else { "**MISS**" }
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One line of the table.
pub(super) struct Row {
    what: String,
    measured: String,
    budget: String,
    verdict: String,
    how: String,
}

pub(super) fn row(
    what: impl Into<String>,
    measured: impl Into<String>,
    budget: &str,
    verdict: &str,
    how: impl Into<String>,
) -> Row {
    Row {
        what: what.into(),
        measured: measured.into(),
        budget: budget.into(),
        verdict: verdict.into(),
        how: how.into(),
    }
}

pub(super) fn render(rows: &[Row]) -> String {
    let mut out = String::from(
        "| what | measured | budget | verdict | how it was measured |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            r.what,
            r.measured,
            r.budget,
            r.verdict,
            r.how.replace('|', "\\|")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(mib(1536), "1.50 MiB");
        assert_eq!(verdict(false), "**MISS**");
    }

    #[test]
    fn rows_render_as_a_markdown_table() {
        let table = render(&[row("a", "1 B", "≤ 2 B", verdict(true), "x | y")]);
        assert_eq!(
            table,
            "| what | measured | budget | verdict | how it was measured |\n|---|---|---|---|---|\n| a | 1 B | ≤ 2 B | pass | x \\| y |\n"
        );
    }
}
