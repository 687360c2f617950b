//! How fast the sender goes: a rate that follows the slowest live receiver, and a token
//! bucket that paces datagrams to it.
//!
//! Every interval the sender looks at the worst first-pass loss the live receivers reported.
//! Above the threshold the rate drops multiplicatively (at most once per `cooldown`, so the
//! reports can show the effect of the last cut); at or below it — with at least one sample, so
//! an idle link proves nothing — it climbs additively towards the maximum. The threshold
//! tolerates steady random loss (NACK repair covers it) and reacts to the bursts of loss an
//! overrun queue or receiver produces.

use std::time::{Duration, Instant};

/// Rate control settings.
#[derive(Debug, Clone)]
pub struct RateSettings {
    /// Bytes per second on the wire (datagrams with IP and UDP headers).
    pub max: u64,
    pub min: u64,
    /// Loss (parts per million) above which the rate is cut.
    pub loss_threshold_ppm: u32,
    /// The cut: new rate = rate × decrease.
    pub decrease: f64,
    /// The climb per interval, as a share of `max`.
    pub increase: f64,
    /// Minimum time between two cuts.
    pub cooldown: Duration,
}

impl Default for RateSettings {
    fn default() -> RateSettings {
        RateSettings {
            max: 125_000_000,
            min: 1_000_000,
            loss_threshold_ppm: 50_000,
            decrease: 0.7,
            increase: 1.0 / 32.0,
            cooldown: Duration::from_millis(300),
        }
    }
}

/// One rate change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatePoint {
    pub at: Duration,
    pub rate: u64,
    /// The worst loss that caused it.
    pub loss_ppm: Option<u32>,
}

/// Most rate changes kept in a report (later ones are counted, not kept).
pub const MAX_HISTORY: usize = 4096;

/// The adaptive rate.
#[derive(Debug)]
pub struct RateControl {
    settings: RateSettings,
    rate: f64,
    last_cut: Option<Instant>,
    started: Instant,
    history: Vec<RatePoint>,
}

impl RateControl {
    pub fn new(settings: RateSettings, now: Instant) -> RateControl {
        let rate = settings.max as f64;
        RateControl {
            history: vec![RatePoint {
                at: Duration::ZERO,
                rate: settings.max,
                loss_ppm: None,
            }],
            settings,
            rate,
            last_cut: None,
            started: now,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate.round() as u64
    }

    pub fn history(&self) -> &[RatePoint] {
        &self.history
    }

    /// One interval's decision from the worst loss sample among live receivers.
    pub fn on_interval(&mut self, now: Instant, worst_loss_ppm: Option<u32>) -> u64 {
        let s = &self.settings;
        let before = self.rate;
        match worst_loss_ppm {
            Some(loss) if loss > s.loss_threshold_ppm => {
                let cooled = self
                    .last_cut
                    .is_none_or(|t| now.duration_since(t) >= s.cooldown);
                if cooled {
                    self.rate = (self.rate * s.decrease).max(s.min as f64);
                    self.last_cut = Some(now);
                }
            }
            Some(_) => {
                self.rate = (self.rate + s.max as f64 * s.increase).min(s.max as f64);
            }
            None => {}
        }
        if self.rate.round() as u64 != before.round() as u64 && self.history.len() < MAX_HISTORY {
            self.history.push(RatePoint {
                at: now.duration_since(self.started),
                rate: self.rate.round() as u64,
                loss_ppm: worst_loss_ppm,
            });
        }
        self.rate.round() as u64
    }
}

/// Paces sends: `burst` bytes may go at once, then `rate` bytes per second.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: 0.0,
            last: now,
        }
    }

    /// Takes `bytes` at `rate` if the bucket holds them (refilled up to `burst`); otherwise
    /// says how long to wait before asking again.
    pub fn take(&mut self, now: Instant, bytes: u64, rate: u64, burst: u64) -> Option<Duration> {
        let rate = rate.max(1) as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst.max(bytes) as f64);
        self.last = now;
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            None
        } else {
            Some(Duration::from_secs_f64((bytes as f64 - self.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn heavy_loss_cuts_once_per_cooldown_and_light_loss_climbs_back() {
        let t0 = Instant::now();
        let mut r = RateControl::new(RateSettings::default(), t0);
        assert_eq!(r.rate(), 125_000_000);
        assert_eq!(r.on_interval(t0 + ms(100), Some(200_000)), 87_500_000);
        // Within the cooldown: no second cut.
        assert_eq!(r.on_interval(t0 + ms(200), Some(200_000)), 87_500_000);
        assert_eq!(r.on_interval(t0 + ms(400), Some(200_000)), 61_250_000);
        // Random loss under the threshold (2 %) climbs, no sample holds.
        assert_eq!(r.on_interval(t0 + ms(500), Some(20_000)), 65_156_250);
        assert_eq!(r.on_interval(t0 + ms(600), None), 65_156_250);
        for i in 0..100 {
            r.on_interval(t0 + ms(700 + i * 100), Some(0));
        }
        assert_eq!(r.rate(), 125_000_000);
        assert!(r.history().len() > 4);
        assert_eq!(r.history()[1].loss_ppm, Some(200_000));
    }

    #[test]
    fn the_rate_never_falls_below_the_minimum() {
        let t0 = Instant::now();
        let mut r = RateControl::new(RateSettings::default(), t0);
        for i in 1..100 {
            r.on_interval(t0 + ms(i * 1000), Some(1_000_000));
        }
        assert_eq!(r.rate(), 1_000_000);
    }

    #[test]
    fn the_bucket_paces_to_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(t0);
        // Empty at first: 1000 bytes at 1 MB/s means a 1 ms wait.
        assert_eq!(b.take(t0, 1000, 1_000_000, 10_000), Some(ms(1)));
        assert_eq!(b.take(t0 + ms(1), 1000, 1_000_000, 10_000), None);
        // Idle time fills the bucket only up to the burst.
        let t1 = t0 + ms(1000);
        for _ in 0..10 {
            assert_eq!(b.take(t1, 1000, 1_000_000, 10_000), None);
        }
        assert!(b.take(t1, 1000, 1_000_000, 10_000).is_some());
    }
}
