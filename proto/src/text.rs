//! Text an agent reports to its server (error messages of updates and
//! configurations): printable, bounded. The server refuses a heartbeat with
//! control characters or an over-long text (an operator's terminal prints
//! them), so the agent cleans what it reports with `report_text`.

/// Longest error text an agent may report, in bytes.
pub const MAX_REPORT_TEXT: usize = 1024;

/// `text` as the agent may report it: every control character (newlines and
/// tabs of a child's stderr included) becomes a space, and the text is cut
/// at a character boundary to at most `MAX_REPORT_TEXT` bytes.
pub fn report_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_REPORT_TEXT));
    out.extend(report_chars(text));
    out
}

/// The characters of `report_text(text)`, without building it (so that a
/// caller can compare a report with its source and not allocate).
pub fn report_chars(text: &str) -> impl Iterator<Item = char> + '_ {
    let mut len = 0;
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take_while(move |c| {
            len += c.len_utf8();
            len <= MAX_REPORT_TEXT
        })
}

/// One log line as an agent keeps and reports it: control characters as
/// spaces, a trailing newline dropped, cut at a character boundary to at
/// most `max` bytes.
pub fn bounded_line(line: &str, max: usize) -> String {
    let mut out = String::with_capacity(line.len().min(max));
    for c in line.trim_end_matches('\n').chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// Whether `text` is already what `report_text` would make of it.
pub fn is_report_text(text: &str) -> bool {
    text.len() <= MAX_REPORT_TEXT && !text.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_spaces_and_long_texts_are_cut() {
        assert_eq!(
            report_text("self-test failed:\n\u{1b}[31mboom\u{7}\tend"),
            "self-test failed:  [31mboom  end"
        );
        let long = "é".repeat(MAX_REPORT_TEXT);
        let cut = report_text(&long);
        assert!(cut.len() <= MAX_REPORT_TEXT && cut.len() > MAX_REPORT_TEXT - 2);
        assert!(is_report_text(&cut));
        assert!(!is_report_text("a\nb"));
        assert_eq!(report_text("plain"), "plain");
        assert!(report_chars("a\nb").eq("a b".chars()));
        assert_eq!(bounded_line("a\u{1b}b\n", 10), "a b");
        assert_eq!(bounded_line("ééé", 5), "éé");
    }
}
