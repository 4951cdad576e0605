//! Plain-text tables and human-readable numbers for the CLI's output.

use std::time::Duration;

/// Lays out `rows` under `headers` in left-aligned columns two spaces apart, without
/// trailing spaces. Rows shorter than the header get empty cells.
pub fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(
                ' ',
                width.saturating_sub(cell.chars().count()),
            ));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration as `45s`, `12m`, `3h4m`, `2d5h`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// KiB as MiB with one decimal (`41.3`).
pub fn format_kib_as_mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_have_no_trailing_spaces() {
        let rows = vec![
            vec!["0123456789ab".to_string(), "web".into(), "1".into()],
            vec!["ff".to_string(), "a-much-longer-name".into()],
        ];
        let t = format_table(&["ID", "POD", "VCPUS"], &rows);
        assert_eq!(
            t,
            "ID            POD                 VCPUS\n\
             0123456789ab  web                 1\n\
             ff            a-much-longer-name\n"
        );
        assert_eq!(format_table(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m");
        assert_eq!(format_duration(Duration::from_secs(3 * 3600 + 240)), "3h4m");
        assert_eq!(
            format_duration(Duration::from_secs(2 * 86400 + 5 * 3600)),
            "2d5h"
        );
        assert_eq!(format_kib_as_mib(41236), "40.3");
        assert_eq!(format_kib_as_mib(0), "0.0");
    }
}
