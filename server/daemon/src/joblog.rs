//! Routing log events to the job they belong to: a `tracing` layer that finds the `job` span
//! an event was emitted in and hands the event's message to that job's log. The daemon's
//! binary installs [`layer`] beside its stderr (or JSON) output; a job registers a [`route`]
//! for its id while it runs. Events outside any job span, or for a job with no route, go only
//! to the other layers.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The name of the span a job runs in; its `job_id` field names the job.
pub const JOB_SPAN: &str = "job";

type Sink = Arc<dyn Fn(&str) + Send + Sync>;

fn routes() -> &'static Mutex<HashMap<i64, Sink>> {
    static ROUTES: OnceLock<Mutex<HashMap<i64, Sink>>> = OnceLock::new();
    ROUTES.get_or_init(Default::default)
}

/// While the returned guard lives, events inside job `id`'s span reach `sink`.
pub fn route(id: i64, sink: impl Fn(&str) + Send + Sync + 'static) -> RouteGuard {
    routes()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, Arc::new(sink));
    RouteGuard(id)
}

/// Removes a job's route when dropped.
#[derive(Debug)]
pub struct RouteGuard(i64);

impl Drop for RouteGuard {
    fn drop(&mut self) {
        routes()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// The layer that feeds job logs (events at INFO and above).
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    JobLogLayer
}

struct JobLogLayer;

/// A job span's id, kept in the span's extensions.
struct JobId(i64);

impl<S> Layer<S> for JobLogLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != JOB_SPAN {
            return;
        }
        let mut visit = JobIdVisitor(None);
        attrs.record(&mut visit);
        if let (Some(job), Some(span)) = (visit.0, ctx.span(id)) {
            span.extensions_mut().insert(JobId(job));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::INFO {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        // The innermost job span decides.
        let Some(job) = scope
            .into_iter()
            .find_map(|span| span.extensions().get::<JobId>().map(|j| j.0))
        else {
            return;
        };
        let sink = routes()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job)
            .cloned();
        if let Some(sink) = sink {
            sink(&line(event, level));
        }
    }
}

/// An event as a log line: its message, prefixed for warnings and errors.
fn line(event: &Event<'_>, level: Level) -> String {
    let mut visit = MessageVisitor(String::new());
    event.record(&mut visit);
    match level {
        Level::WARN => format!("warning: {}", visit.0),
        Level::ERROR => format!("error: {}", visit.0),
        _ => visit.0,
    }
}

struct JobIdVisitor(Option<i64>);

impl Visit for JobIdVisitor {
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "job_id" {
            self.0 = Some(value);
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "job_id" {
            self.0 = i64::try_from(value).ok();
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn events_inside_a_job_span_reach_that_jobs_log_only() {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let _route = route(7001, move |l| sink.lock().unwrap().push(l.to_string()));
        let subscriber = tracing_subscriber::registry().with(layer());
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("before any job");
            let span = tracing::info_span!(JOB_SPAN, job_id = 7001i64);
            let _in = span.enter();
            tracing::info!(partition = 2, "partition {} copied", 2);
            tracing::warn!("lost the client");
            tracing::debug!("too detailed for a job log");
            let other = tracing::info_span!(JOB_SPAN, job_id = 7002i64);
            let _in2 = other.enter();
            tracing::info!("belongs to the inner job, which has no route");
        });
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, ["partition 2 copied", "warning: lost the client"]);
    }
}
