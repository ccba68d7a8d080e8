//! Where a call's time goes: consecutive steps timed into a histogram by step.

use std::sync::Mutex;
use std::time::Instant;

/// Receives the time spent in one step of a call (a metrics family by step).
pub trait StepSink {
    fn step(&self, step: &str, seconds: f64);
}

/// Times consecutive steps of one call: each [`lap`](Self::lap) records the time since
/// the previous one (or the start) under its step name.
pub struct StepClock<'a, S: StepSink> {
    sink: &'a S,
    last: Mutex<Instant>,
}

impl<S: StepSink> std::fmt::Debug for StepClock<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepClock").finish_non_exhaustive()
    }
}

impl<'a, S: StepSink> StepClock<'a, S> {
    pub fn new(sink: &'a S) -> Self {
        Self {
            sink,
            last: Mutex::new(Instant::now()),
        }
    }

    /// The time since the previous lap (or the start) was spent in `step`.
    pub fn lap(&self, step: &str) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        self.sink
            .step(step, now.duration_since(*last).as_secs_f64());
        *last = now;
    }
}
