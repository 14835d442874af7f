//! Access events as JSON lines, written straight into the log buffer: the same line
//! tracing-subscriber's JSON formatter writes (`timestamp`, `level`, `message`, the fields,
//! `target`), without its per-field dispatch, its map serializer and its allocations. With
//! `--log-format json` this formats every access event (one per connection and one per
//! request: the largest single cost of a proxied HTTP request when it went through tracing);
//! other events, and the human format, still go through tracing.
//!
//! The `access` target's filter still applies: an event is written only when
//! `tracing::enabled!` says the subscriber wants it (so `--log-level info,access=off` turns
//! access events off).

use crate::logwriter::LogWriter;
use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Set by [`install`] in JSON mode.
static WRITER: OnceLock<LogWriter> = OnceLock::new();

thread_local! {
    /// Each thread's line, reused.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

/// Turns the fast path on (JSON mode), writing to `writer`.
pub fn install(writer: LogWriter) {
    let _ = WRITER.set(writer);
}

/// Writes one `access` event with message `message` and the fields `fields` adds; false when
/// the fast path is off (the caller logs through tracing instead). Nothing is written (and
/// true is returned) when the access target is filtered out.
pub fn access(message: &'static str, fields: impl FnOnce(&mut Line<'_>)) -> bool {
    let Some(writer) = WRITER.get() else {
        return false;
    };
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return true;
    }
    LINE.with(|cell| {
        let Ok(mut buf) = cell.try_borrow_mut() else {
            return false;
        };
        buf.clear();
        buf.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(&mut buf, SystemTime::now());
        buf.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"");
        buf.extend_from_slice(message.as_bytes());
        buf.push(b'"');
        fields(&mut Line { buf: &mut buf });
        buf.extend_from_slice(b",\"target\":\"access\"}\n");
        writer.append(&buf);
        // A line far larger than usual (a huge path) does not keep its buffer.
        buf.shrink_to(16 << 10);
        true
    })
}

/// The fields of one line being written.
pub struct Line<'a> {
    buf: &'a mut Vec<u8>,
}

impl Line<'_> {
    fn key(&mut self, key: &str) {
        self.buf.extend_from_slice(b",\"");
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    /// A string field.
    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        self.buf.push(b'"');
        escape_into(self.buf, value);
        self.buf.push(b'"');
    }

    /// A number field.
    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = value;
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.buf.extend_from_slice(&digits[i..]);
    }

    /// A field shown as a string (an address, a code), or `""` when absent.
    pub fn display<T: fmt::Display>(&mut self, key: &str, value: Option<T>) {
        self.key(key);
        self.buf.push(b'"');
        if let Some(v) = value {
            let _ = write!(Escaper(self.buf), "{v}");
        }
        self.buf.push(b'"');
    }
}

/// JSON string escaping (RFC 8259): quote, backslash and control characters.
fn escape_into(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                buf.extend_from_slice(&bytes[start..i]);
                let hex = b"0123456789abcdef";
                buf.extend_from_slice(b"\\u00");
                buf.push(hex[usize::from(b >> 4)]);
                buf.push(hex[usize::from(b & 0xf)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        buf.extend_from_slice(&bytes[start..i]);
        buf.extend_from_slice(esc);
        start = i + 1;
    }
    buf.extend_from_slice(&bytes[start..]);
}

/// Escapes what is formatted into it.
struct Escaper<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaper<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// `2026-12-02T00:03:12.512345Z` (RFC 3339, UTC, microseconds), as tracing-subscriber writes.
fn timestamp(buf: &mut Vec<u8>, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let _ = write!(
        Escaper(buf),
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_micros()
    );
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn strings_are_escaped_as_json_wants() {
        let mut buf = Vec::new();
        escape_into(&mut buf, "a\"b\\c\nd\u{1}é/");
        let s = String::from_utf8(buf).unwrap();
        assert_eq!(s, r#"a\"b\\c\nd\u0001é/"#);
        let back: String = serde_json::from_str(&format!("\"{s}\"")).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é/");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut buf = Vec::new();
        timestamp(
            &mut buf,
            UNIX_EPOCH + Duration::from_micros(1_764_633_792_512_345),
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "2025-12-02T00:03:12.512345Z"
        );
        let mut buf = Vec::new();
        timestamp(&mut buf, UNIX_EPOCH + Duration::from_secs(951_782_400)); // leap day
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "2000-02-29T00:00:00.000000Z"
        );
    }

    #[test]
    fn a_line_is_one_json_object_with_the_fields_in_order() {
        let mut buf = Vec::new();
        let mut line = Line { buf: &mut buf };
        line.str("path", "/a?b=\"c\"");
        line.u64("status", 200);
        line.u64("zero", 0);
        line.display(
            "endpoint",
            Some("198.18.0.5:8080".parse::<std::net::SocketAddr>().unwrap()),
        );
        line.display::<u32>("grpc_status", None);
        let text = format!(
            "{{\"message\":\"request\"{}}}",
            String::from_utf8(buf).unwrap()
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["path"], "/a?b=\"c\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["zero"], 0);
        assert_eq!(v["endpoint"], "198.18.0.5:8080");
        assert_eq!(v["grpc_status"], "");
    }
}
