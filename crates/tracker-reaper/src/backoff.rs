//! Exponential backoff for retries, with a little jitter so replicas and
//! sessions failing together do not retry in lockstep.

use std::time::Duration;

/// Doubles from `base` up to `max`; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempts: 0,
        }
    }

    /// The delay before the next attempt, without jitter.
    pub fn peek(&self) -> Duration {
        delay(self.base, self.max, self.attempts)
    }

    /// The delay before the next attempt (up to 10% less, at random), and
    /// counts the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.peek();
        self.attempts = self.attempts.saturating_add(1);
        let jitter = f64::from(uuid::Uuid::new_v4().as_u128() as u16) / f64::from(u16::MAX) * 0.1;
        d.mul_f64(1.0 - jitter)
    }

    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// `base · 2^attempts`, capped at `max`.
pub fn delay(base: Duration, max: Duration, attempts: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempts.min(31));
    base.saturating_mul(factor).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let ms = Duration::from_millis;
        assert_eq!(delay(ms(100), ms(1000), 0), ms(100));
        assert_eq!(delay(ms(100), ms(1000), 1), ms(200));
        assert_eq!(delay(ms(100), ms(1000), 3), ms(800));
        assert_eq!(delay(ms(100), ms(1000), 4), ms(1000));
        assert_eq!(delay(ms(100), ms(1000), u32::MAX), ms(1000));
    }

    #[test]
    fn jitter_only_shortens_and_reset_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1) && d >= Duration::from_millis(90));
        }
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }
}
