//! Where the binary's logs go: `tracing` events on stderr — for commands as plain lines
//! (`  message`, `diskferry: warning: …`), for the daemon (`serve`) as timestamped lines or
//! JSON objects (`--log-format json`) — and, in the daemon, into the log of the job each event
//! belongs to. `DISKFERRY_LOG` (an `EnvFilter` directive, default `info`) chooses what is shown.

use std::fmt;

use clap::ValueEnum;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How the daemon writes its log.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    /// One timestamped line per event
    #[default]
    Text,
    /// One JSON object per line (for log collectors)
    Json,
}

/// `DISKFERRY_LOG`, else info (the in-process agent of `demo` only says what goes wrong).
fn filter() -> EnvFilter {
    EnvFilter::try_from_env("DISKFERRY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,diskferry_client=warn"))
}

/// Logging for a command: its steps as plain lines on stderr.
pub fn init_command() {
    let out = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(CommandLines)
        .with_filter(filter());
    let _ = tracing_subscriber::registry().with(out).try_init();
}

/// Logging for the daemon: stderr in `format`, and every job's events into its log.
pub fn init_daemon(format: LogFormat) {
    let jobs = diskferry_daemon::joblog::layer();
    let base = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let registry = tracing_subscriber::registry().with(jobs);
    let _ = match format {
        LogFormat::Text => registry.with(base.with_filter(filter())).try_init(),
        LogFormat::Json => registry
            .with(base.json().flatten_event(true).with_filter(filter()))
            .try_init(),
    };
}

/// Commands' lines: info as `  message`, warnings and errors prefixed, fields after the
/// message only when there is no message.
struct CommandLines;

impl<S, N> FormatEvent<S, N> for CommandLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        match *event.metadata().level() {
            Level::ERROR => write!(writer, "diskferry: error: ")?,
            Level::WARN => write!(writer, "diskferry: warning: ")?,
            Level::INFO => write!(writer, "  ")?,
            _ => write!(writer, "  [{}] ", event.metadata().target())?,
        }
        let mut message = MessageOnly(String::new());
        event.record(&mut message);
        if message.0.is_empty() {
            ctx.field_format().format_fields(writer.by_ref(), event)?;
        } else {
            write!(writer, "{}", message.0)?;
        }
        writeln!(writer)
    }
}

struct MessageOnly(String);

impl tracing::field::Visit for MessageOnly {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
