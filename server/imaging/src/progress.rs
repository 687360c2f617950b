//! Progress reporting for long jobs: the small trait the pipelines call, a silent
//! implementation and JSON lines for programs. The terminal bar lives in the CLI.

/// Receives progress from a running job. Implementations must be cheap: `advance` is called
/// for every piece of data moved.
pub trait Progress: Send + Sync {
    /// Starts a phase of `total` bytes.
    fn start(&self, phase: &str, total: u64);
    fn advance(&self, bytes: u64);
    fn finish(&self);
    /// Files (entries) done out of those known so far, for jobs that copy file by file.
    fn files(&self, _done: u64, _total: u64) {}
    /// The whole job's bytes done and expected, for jobs made of several phases.
    fn overall(&self, _done: u64, _total: u64) {}
}

/// Reports nothing.
#[derive(Debug, Default)]
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// One JSON object per line on stderr — `{"phase":…,"done":…,"total":…,"rate":…,"eta_s":…}`,
/// plus `files_done`/`files_total` in file-by-file phases and `overall_done`/`overall_total`
/// across a job's phases —
/// at most twice a second and at the end of each phase, for programs (the web UI) to follow.
/// Lines go to stderr, or to any sink ([`JsonLines::with_sink`]).
pub struct JsonLines {
    state: std::sync::Mutex<JsonState>,
    sink: Box<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for JsonLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonLines").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct JsonState {
    phase: String,
    total: u64,
    done: u64,
    files: Option<(u64, u64)>,
    overall: Option<(u64, u64)>,
    started: std::time::Instant,
    last: std::time::Instant,
}

impl Default for JsonLines {
    fn default() -> Self {
        JsonLines::with_sink(|line| {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        })
    }
}

impl JsonLines {
    /// Progress lines handed to `sink` (one JSON object each, without a newline).
    pub fn with_sink(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        let now = std::time::Instant::now();
        JsonLines {
            state: std::sync::Mutex::new(JsonState {
                phase: String::new(),
                total: 0,
                done: 0,
                files: None,
                overall: None,
                started: now,
                last: now,
            }),
            sink: Box::new(sink),
        }
    }

    fn emit(&self, s: &JsonState) {
        let secs = s.started.elapsed().as_secs_f64().max(1e-6);
        let rate = s.done as f64 / secs;
        let eta = if s.total > s.done && rate > 0.0 {
            format!("{:.1}", (s.total - s.done) as f64 / rate)
        } else {
            "null".into()
        };
        let files = s
            .files
            .map(|(d, t)| format!(",\"files_done\":{d},\"files_total\":{t}"))
            .unwrap_or_default();
        let overall = s
            .overall
            .map(|(d, t)| format!(",\"overall_done\":{d},\"overall_total\":{t}"))
            .unwrap_or_default();
        (self.sink)(&format!(
            "{{\"phase\":{},\"done\":{},\"total\":{},\"rate\":{:.0},\"eta_s\":{eta}{files}{overall}}}",
            serde_json::to_string(&s.phase).unwrap_or_else(|_| "\"\"".into()),
            s.done,
            s.total,
            rate
        ));
    }
}

impl Progress for JsonLines {
    fn start(&self, phase: &str, total: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let overall = s.overall;
        *s = JsonState {
            phase: phase.to_string(),
            total,
            done: 0,
            files: None,
            overall,
            started: now,
            last: now,
        };
        self.emit(&s);
    }
    fn advance(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.done += bytes;
        if s.last.elapsed() >= std::time::Duration::from_millis(500) {
            s.last = std::time::Instant::now();
            self.emit(&s);
        }
    }
    fn finish(&self) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.emit(&s);
    }
    fn files(&self, done: u64, total: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.files = Some((done, total));
    }
    fn overall(&self, done: u64, total: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.overall = Some((done, total));
    }
}
