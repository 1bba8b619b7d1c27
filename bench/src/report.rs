//! What a run prints: JSON lines through serde, each result with the run's metadata
//! (`--json`), or the human table.

use serde::{Serialize, Serializer};
use std::time::{Duration, SystemTime};

/// Who ran what, where and when: next to every JSON result.
#[derive(Debug, Clone, Serialize)]
pub struct RunMeta {
    pub tool: &'static str,
    pub version: &'static str,
    pub commit: &'static str,
    pub host: String,
    /// UTC, RFC 3339, e.g. `2026-12-01T06:55:00Z`.
    pub start_time: String,
    /// The command line, as given.
    pub argv: Vec<String>,
    /// The subcommand and every option's value, defaults included.
    pub options: serde_json::Value,
}

impl RunMeta {
    /// The metadata of this process's run; `options`: the parsed command line.
    pub fn new(started: SystemTime, options: &impl Serialize) -> RunMeta {
        RunMeta {
            tool: "ballot-bench",
            version: env!("CARGO_PKG_VERSION"),
            commit: ballot::version::COMMIT,
            host: host_name(),
            start_time: humantime::format_rfc3339_seconds(started).to_string(),
            argv: std::env::args().collect(),
            options: serde_json::to_value(options).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// One JSON line: a result's fields, then `"run": {...}`.
#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    #[serde(flatten)]
    result: &'a T,
    run: &'a RunMeta,
}

/// `results` as JSON lines on stdout, one object each.
pub fn json_lines<T: Serialize>(results: &[T], meta: &RunMeta) -> Result<(), String> {
    for r in results {
        let line = serde_json::to_string(&Line {
            result: r,
            run: meta,
        })
        .map_err(|e| format!("cannot encode a result as JSON: {e}"))?;
        println!("{line}");
    }
    Ok(())
}

/// This machine's host name (`gethostname`), or "unknown".
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A duration as seconds (a float) in the options' JSON.
pub fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}
