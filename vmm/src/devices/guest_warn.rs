//! Rate-limited logging for anything a guest can trigger at will: a hostile guest must
//! not be able to flood the host's log.

use std::time::{Duration, Instant};

use tracing::warn;

/// Caps guest-triggered warnings so a hostile guest cannot flood the log: at most
/// `PER_WINDOW` per second, then one summary line for what was dropped.
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl WarnLimiter {
    const PER_WINDOW: u32 = 20;
    const WINDOW: Duration = Duration::from_secs(1);

    /// Whether the next warning may be logged.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW);
        if expired {
            if self.suppressed > 0 {
                warn!(
                    suppressed = self.suppressed,
                    "guest misbehaviour warnings suppressed"
                );
            }
            self.window_start = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < Self::PER_WINDOW {
            self.in_window += 1;
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            false
        }
    }
}

/// `warn!` through a `WarnLimiter`, for anything the guest can trigger at will.
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if $limiter.allow() {
            ::tracing::warn!($($arg)+);
        }
    };
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_limiter_caps_a_burst() {
        let mut limiter = WarnLimiter::default();
        let allowed = (0..1000).filter(|_| limiter.allow()).count();
        assert_eq!(allowed, WarnLimiter::PER_WINDOW as usize);
    }
}
