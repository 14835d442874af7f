//! Where log lines go: into a buffer that a thread of its own writes to stdout, so a request
//! never waits for a `write(2)` (one per line, on the data path's threads, was the largest
//! single cost of an HTTP request: 40% more throughput without it).
//!
//! A line is appended whole, under a mutex held for the copy. The writer thread sleeps until
//! the first line arrives, lets [`BATCH`] pass so more join it, then takes the whole buffer
//! at once and writes it in as few calls as it can: under load, about a hundred wake-ups and
//! writes a second however many requests are logged (a wake-up per line cost more than the
//! write it saved). When stdout cannot keep up
//! and [`MAX_PENDING`] bytes wait, further lines are dropped — counted, and said in a line of
//! their own — rather than slowing or growing the proxy. [`LogWriter::flush`] waits until
//! what was logged is written (at exit); a process killed with SIGKILL loses at most what the
//! writer had not taken yet (milliseconds).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of log lines waiting at most; past it, lines are dropped.
pub const MAX_PENDING: usize = 4 << 20;
/// How long the writer lets lines gather after the first one arrives.
pub const BATCH: Duration = Duration::from_millis(10);

/// The buffered writer; clones share one buffer and one writer thread.
#[derive(Clone)]
pub struct LogWriter {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Signalled when lines arrive (for the writer) and when a batch is written (for
    /// [`LogWriter::flush`]).
    changed: Condvar,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The writer holds a batch it has not finished writing.
    writing: bool,
    dropped: u64,
}

impl LogWriter {
    /// Starts the writer thread, writing to stdout.
    pub fn stdout() -> std::io::Result<LogWriter> {
        Self::start(std::io::stdout())
    }

    /// Starts the writer thread, writing to `out`.
    pub fn start<W: Write + Send + 'static>(mut out: W) -> std::io::Result<LogWriter> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let writer = inner.clone();
        std::thread::Builder::new()
            .name("muon-log".into())
            .spawn(move || {
                let mut batch = Vec::new();
                loop {
                    let mut state = writer.lock();
                    while state.pending.is_empty() && state.dropped == 0 {
                        state = writer.wait(state);
                    }
                    drop(state);
                    std::thread::sleep(BATCH);
                    let mut state = writer.lock();
                    std::mem::swap(&mut state.pending, &mut batch);
                    let dropped = std::mem::take(&mut state.dropped);
                    state.writing = true;
                    drop(state);
                    // Nowhere to report a failed write to but the log itself: dropped.
                    let _ = out.write_all(&batch);
                    if dropped > 0 {
                        let _ = writeln!(
                            out,
                            "muon-proxy: {dropped} log lines dropped (stdout did not keep up)"
                        );
                    }
                    let _ = out.flush();
                    batch.clear();
                    // A large burst's buffer is not kept.
                    batch.shrink_to(64 << 10);
                    writer.lock().writing = false;
                    writer.changed.notify_all();
                }
            })?;
        Ok(LogWriter { inner })
    }

    /// Appends one whole line (or lines).
    pub(crate) fn append(&self, line: &[u8]) {
        let mut state = self.inner.lock();
        if state.pending.len() + line.len() > MAX_PENDING {
            state.dropped += 1;
            return;
        }
        // Only the first line of a batch wakes the writer (it is then asleep on the
        // condvar); later ones find it batching.
        let wake = state.pending.is_empty() && !state.writing;
        state.pending.extend_from_slice(line);
        drop(state);
        if wake {
            self.inner.changed.notify_all();
        }
    }

    /// Waits (at most `within`) until every line appended so far is written.
    pub fn flush(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut state = self.inner.lock();
        while !state.pending.is_empty() || state.writing {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            state = match self.inner.changed.wait_timeout(state, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

impl Inner {
    /// The state is plain bytes and counters: a panic elsewhere leaves it usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(g).unwrap_or_else(|p| p.into_inner())
    }
}

/// What tracing-subscriber writes one formatted event to (it writes each event whole, in
/// one `write_all`).
pub struct Line<'a>(&'a LogWriter);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that can be read back, and made slow.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, Duration)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let delay = self.0.lock().unwrap().1;
            std::thread::sleep(delay);
            self.0.lock().unwrap().0.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_and_in_order_and_flush_waits_for_them() {
        let sink = Sink::default();
        let w = LogWriter::start(sink.clone()).unwrap();
        for i in 0..1000 {
            w.make_line()
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        w.flush(Duration::from_secs(10));
        let out = String::from_utf8(sink.0.lock().unwrap().0.clone()).unwrap();
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn lines_past_the_limit_are_dropped_and_counted_not_waited_for() {
        let sink = Sink::default();
        sink.0.lock().unwrap().1 = Duration::from_millis(300);
        let w = LogWriter::start(sink.clone()).unwrap();
        let line = vec![b'x'; 1 << 20];
        let started = Instant::now();
        for _ in 0..10 {
            w.make_line().write_all(&line).unwrap();
        }
        // Ten 1 MiB lines against a 4 MiB buffer and a slow sink: appending never waits
        // for the sink (a generous bound: the sink takes 300 ms per write).
        assert!(started.elapsed() < Duration::from_secs(5));
        w.flush(Duration::from_secs(20));
        let out = sink.0.lock().unwrap().0.clone();
        let text = String::from_utf8_lossy(&out);
        let written = out.iter().filter(|b| **b == b'x').count() / (1 << 20);
        let dropped: usize = text
            .split("muon-proxy: ")
            .skip(1)
            .filter_map(|s| s.split(' ').next()?.parse::<usize>().ok())
            .sum();
        assert!(dropped > 0, "nothing dropped");
        assert_eq!(
            written + dropped,
            10,
            "{written} written, {dropped} dropped"
        );
    }

    impl LogWriter {
        fn make_line(&self) -> Line<'_> {
            Line(self)
        }
    }
}
