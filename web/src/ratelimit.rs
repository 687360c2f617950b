//! Guessing limits: failed logins and failed API tokens are counted per client address, and
//! an address with [`MAX_FAILURES`] failures in the last [`WINDOW`] is refused (429 with
//! `Retry-After`) until the oldest of them is a window old. Successes are not counted. The
//! table is bounded: past [`MAX_ADDRESSES`] addresses the one with the oldest failure goes.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, Extensions, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::error::Failure;

/// Failures allowed per address within [`WINDOW`].
pub const MAX_FAILURES: usize = 5;
/// How long a failure counts.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Most addresses remembered.
const MAX_ADDRESSES: usize = 10_000;

/// Recent failures per client address.
#[derive(Debug, Default)]
pub struct Failures {
    by_ip: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl Failures {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, VecDeque<Instant>>> {
        self.by_ip.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(wait)` when `ip` has used up its failures: how long until it may try again.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check_at(ip, Instant::now())
    }

    /// Counts a failure from `ip`.
    pub fn fail(&self, ip: IpAddr) {
        self.fail_at(ip, Instant::now());
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut table = self.table();
        let Some(times) = table.get_mut(&ip) else {
            return Ok(());
        };
        forget_old(times, now);
        match times.front() {
            Some(&oldest) if times.len() >= MAX_FAILURES => {
                Err(WINDOW.saturating_sub(now.duration_since(oldest)))
            }
            None => {
                table.remove(&ip);
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }

    fn fail_at(&self, ip: IpAddr, now: Instant) {
        let mut table = self.table();
        if table.len() >= MAX_ADDRESSES && !table.contains_key(&ip) {
            table.retain(|_, times| {
                forget_old(times, now);
                !times.is_empty()
            });
            if table.len() >= MAX_ADDRESSES {
                let stalest = table
                    .iter()
                    .min_by_key(|(_, t)| t.back().copied())
                    .map(|(ip, _)| *ip);
                if let Some(stalest) = stalest {
                    table.remove(&stalest);
                }
            }
        }
        let times = table.entry(ip).or_default();
        forget_old(times, now);
        times.push_back(now);
        // Only the last MAX_FAILURES matter.
        while times.len() > MAX_FAILURES {
            times.pop_front();
        }
    }
}

/// The client's address as the connection gave it (unspecified when the request did not come
/// through [`crate::serve`], as in unit tests).
pub fn client_ip(extensions: &Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// The client's address, as an extractor.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(client_ip(&parts.extensions)))
    }
}

/// 429 with `Retry-After` in whole seconds (at least 1).
pub fn too_many(wait: Duration) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    (
        [(header::RETRY_AFTER, secs.to_string())],
        Failure::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed attempts from this address: try again in {secs} s"),
        ),
    )
        .into_response()
}

fn forget_old(times: &mut VecDeque<Instant>, now: Instant) {
    while times
        .front()
        .is_some_and(|&t| now.duration_since(t) >= WINDOW)
    {
        times.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_a_minute_then_refused_until_the_oldest_expires() {
        let f = Failures::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "::1".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..MAX_FAILURES as u64 {
            assert!(f.check_at(a, t0 + Duration::from_secs(i)).is_ok());
            f.fail_at(a, t0 + Duration::from_secs(i));
        }
        let wait = f.check_at(a, t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        assert!(
            f.check_at(b, t0).is_ok(),
            "other addresses are not affected"
        );
        assert!(
            f.check_at(a, t0 + WINDOW).is_ok(),
            "the oldest failure has expired"
        );
    }
}
