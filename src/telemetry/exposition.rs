//! The two text formats `/metrics` speaks (docs/behaviour.md §10.5) and the choice between them.
//!
//! `prometheus-client` encodes OpenMetrics only. The classic Prometheus text format (0.0.4) is
//! produced from that text by [`classic_from_openmetrics`], one pass over its lines: counter
//! families are renamed to their `_total` sample name, `# UNIT` lines, `_created` samples,
//! exemplars and the closing `# EOF` are dropped, timestamps go from seconds to milliseconds,
//! and types classic Prometheus does not know become `untyped`.

use std::fmt::Write as _;

/// A text exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0.0 text, as `prometheus-client` writes it.
    OpenMetrics,
    /// The classic Prometheus text format, version 0.0.4.
    Classic,
}

impl Exposition {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` (without a version, or version 1.0.0) with a higher
    /// quality than anything the classic format matches (`text/plain`, `text/*`, `*/*`);
    /// the classic format otherwise, also without an `Accept` header. Prometheus asks for
    /// OpenMetrics first.
    pub fn negotiate(accept: Option<&[u8]>) -> Self {
        let Some(accept) = accept.and_then(|a| std::str::from_utf8(a).ok()) else {
            return Exposition::Classic;
        };
        let mut openmetrics = 0.0f32;
        let mut classic = 0.0f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut quality = 1.0f32;
            let mut version = None;
            for param in parts {
                let Some((name, value)) = param.split_once('=') else {
                    continue;
                };
                let value = value.trim().trim_matches('"');
                match name.trim().to_ascii_lowercase().as_str() {
                    "q" => quality = value.parse().unwrap_or(0.0),
                    "version" => version = Some(value.to_owned()),
                    _ => {}
                }
            }
            match media.as_str() {
                "application/openmetrics-text" if version.as_deref().is_none_or(|v| v == "1.0.0") => {
                    openmetrics = openmetrics.max(quality);
                }
                "text/plain" if version.as_deref().is_none_or(|v| v == "0.0.4") => classic = classic.max(quality),
                "text/*" | "*/*" => classic = classic.max(quality),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics > classic {
            Exposition::OpenMetrics
        } else {
            Exposition::Classic
        }
    }
}

/// The family being converted: its OpenMetrics name and type.
struct Family<'a> {
    name: &'a str,
    kind: &'a str,
}

/// Rewrites an OpenMetrics text exposition as the classic Prometheus text format (0.0.4):
/// every family keeps its `# HELP` and `# TYPE`, under the name its samples carry.
pub fn classic_from_openmetrics(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    let mut family = Family { name: "", kind: "" };
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            family = Family { name, kind };
            write_metadata(&mut out, &family, help.take().filter(|(n, _)| *n == name).map(|h| h.1));
        } else if line.starts_with('#') || line.trim().is_empty() {
            // `# UNIT` (classic has none), `# EOF`, and anything else that is not a sample.
        } else if !is_created_sample(line, &family) {
            write_sample(&mut out, line);
        }
    }
    out
}

/// The name classic Prometheus knows a family by, and its classic type.
fn classic_name_and_type<'a>(family: &Family<'a>) -> (String, &'static str) {
    match family.kind {
        "counter" => (format!("{}_total", family.name), "counter"),
        "gauge" => (family.name.to_owned(), "gauge"),
        "histogram" => (family.name.to_owned(), "histogram"),
        "summary" => (family.name.to_owned(), "summary"),
        "info" => (format!("{}_info", family.name), "gauge"),
        _ => (family.name.to_owned(), "untyped"),
    }
}

fn write_metadata(out: &mut String, family: &Family<'_>, help: Option<&str>) {
    let (name, kind) = classic_name_and_type(family);
    if let Some(help) = help {
        out.push_str("# HELP ");
        out.push_str(&name);
        out.push(' ');
        push_classic_help(out, help);
        out.push('\n');
    }
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// OpenMetrics escapes `\`, newline and `"` in help text; the classic format only the first two.
fn push_classic_help(out: &mut String, help: &str) {
    let mut chars = help.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('"') => out.push('"'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push_str("\\\\"),
            },
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A counter's or histogram's `_created` sample: OpenMetrics only.
fn is_created_sample(line: &str, family: &Family<'_>) -> bool {
    matches!(family.kind, "counter" | "histogram" | "summary")
        && line
            .strip_prefix(family.name)
            .and_then(|rest| rest.strip_prefix("_created"))
            .is_some_and(|rest| rest.starts_with(['{', ' ']))
}

/// Copies a sample line without its exemplar, its timestamp (if any) in milliseconds.
fn write_sample(out: &mut String, line: &str) {
    let split = series_end(line);
    let (series, rest) = line.split_at(split);
    out.push_str(series);
    let mut fields = rest.split_whitespace();
    if let Some(value) = fields.next() {
        out.push(' ');
        out.push_str(value);
    }
    if let Some(timestamp) = fields.next().filter(|t| *t != "#") {
        if let Ok(seconds) = timestamp.parse::<f64>() {
            let _ = write!(out, " {}", (seconds * 1000.0).round() as i64);
        }
    }
    out.push('\n');
}

/// Where the series (name and label set) of a sample line ends: after the closing `}` of its
/// label set, whose quoted values may hold `}`, spaces and escaped quotes; else at the first space.
fn series_end(line: &str) -> usize {
    let bytes = line.as_bytes();
    let Some(open) = bytes.iter().position(|b| *b == b'{' || *b == b' ') else {
        return line.len();
    };
    if bytes[open] == b' ' {
        return open;
    }
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in bytes.iter().enumerate().skip(open + 1) {
        match (*b, quoted, escaped) {
            (_, true, true) => escaped = false,
            (b'\\', true, false) => escaped = true,
            (b'"', _, false) => quoted = !quoted,
            (b'}', false, _) => return i + 1,
            _ => {}
        }
    }
    line.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPENMETRICS: &str = "\
# HELP app_requests Requests handled, by \\\"route\\\"
# TYPE app_requests counter
app_requests_total{route=\"a\",path=\"/x} y\\\"z\"} 3
app_requests_created{route=\"a\",path=\"/x} y\\\"z\"} 1700000000.5
# HELP app_duration_seconds Time taken
# TYPE app_duration_seconds histogram
# UNIT app_duration_seconds seconds
app_duration_seconds_sum 0.25
app_duration_seconds_count 2
app_duration_seconds_bucket{le=\"0.1\"} 1 # {trace_id=\"abc\"} 0.05 1700000000.0
app_duration_seconds_bucket{le=\"+Inf\"} 2
# HELP app_in_flight Requests now
# TYPE app_in_flight gauge
app_in_flight 0 1700000000.25
# HELP app_build Build
# TYPE app_build info
app_build_info{version=\"1\"} 1
# TYPE app_mystery unknown
app_mystery 7
# EOF
";

    #[test]
    fn classic_format_names_counters_by_their_samples_and_drops_openmetrics_only_lines() {
        let classic = classic_from_openmetrics(OPENMETRICS);
        let expected = "\
# HELP app_requests_total Requests handled, by \"route\"
# TYPE app_requests_total counter
app_requests_total{route=\"a\",path=\"/x} y\\\"z\"} 3
# HELP app_duration_seconds Time taken
# TYPE app_duration_seconds histogram
app_duration_seconds_sum 0.25
app_duration_seconds_count 2
app_duration_seconds_bucket{le=\"0.1\"} 1
app_duration_seconds_bucket{le=\"+Inf\"} 2
# HELP app_in_flight Requests now
# TYPE app_in_flight gauge
app_in_flight 0 1700000000250
# HELP app_build_info Build
# TYPE app_build_info gauge
app_build_info{version=\"1\"} 1
# TYPE app_mystery untyped
app_mystery 7
";
        assert_eq!(classic, expected);
    }

    #[test]
    fn help_escapes_follow_the_classic_rules() {
        let mut out = String::new();
        push_classic_help(&mut out, "a \\\\ b \\n c \\\" d\ne");
        assert_eq!(out, "a \\\\ b \\n c \" d\\ne");
    }

    #[test]
    fn series_end_skips_quoted_braces() {
        assert_eq!(series_end("m 1"), 1);
        assert_eq!(series_end("m{a=\"}\"} 1"), 8);
        assert_eq!(series_end("m{a=\"\\\"}\"} 1"), 10);
    }

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_the_classic_format() {
        let prometheus = b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
            version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, expected) in [
            (Some(&prometheus[..]), Exposition::OpenMetrics),
            (Some(b"application/openmetrics-text"), Exposition::OpenMetrics),
            (
                Some(b"text/plain;version=0.0.4;q=0.9, application/openmetrics-text; q=0.5"),
                Exposition::Classic,
            ),
            (Some(b"application/openmetrics-text;version=0.0.1"), Exposition::Classic),
            (Some(b"application/openmetrics-text;q=0"), Exposition::Classic),
            (Some(b"text/plain"), Exposition::Classic),
            (Some(b"*/*"), Exposition::Classic),
            (Some(b"\xff"), Exposition::Classic),
            (None, Exposition::Classic),
        ] {
            assert_eq!(Exposition::negotiate(accept), expected, "{accept:?}");
        }
    }
}
