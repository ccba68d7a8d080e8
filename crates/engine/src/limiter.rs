//! Per-target concurrency limits (`rateLimit.maxConcurrentRotationsPerTarget`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
struct Slot {
    semaphore: Arc<Semaphore>,
    limit: usize,
    in_use: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

/// Hands out at most `limit` permits per target key at a time.
#[derive(Debug, Default, Clone)]
pub struct TargetLimiter {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

/// Held while a rotation works against a target.
#[derive(Debug)]
pub struct TargetPermit {
    _permit: OwnedSemaphorePermit,
    in_use: Arc<AtomicUsize>,
}

impl Drop for TargetPermit {
    fn drop(&mut self) {
        self.in_use.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TargetLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wait for a permit for `target`. The first caller's `limit` sets the size; a later
    /// different limit (policy changed) replaces the slot for new callers.
    pub async fn acquire(&self, target: &str, limit: usize) -> TargetPermit {
        let limit = limit.max(1);
        let (semaphore, in_use, peak) = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let slot = slots.entry(target.to_string()).or_insert_with(|| Slot {
                semaphore: Arc::new(Semaphore::new(limit)),
                limit,
                in_use: Arc::default(),
                peak: Arc::default(),
            });
            if slot.limit != limit {
                slot.semaphore = Arc::new(Semaphore::new(limit));
                slot.limit = limit;
            }
            (
                slot.semaphore.clone(),
                slot.in_use.clone(),
                slot.peak.clone(),
            )
        };
        // The semaphore is never closed, so acquisition cannot fail.
        let permit = match semaphore.acquire_owned().await {
            Ok(p) => p,
            Err(_) => unreachable!("target semaphores are never closed"),
        };
        let now = in_use.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(now, Ordering::SeqCst);
        TargetPermit {
            _permit: permit,
            in_use,
        }
    }

    /// The highest number of permits held at once for `target` (for tests and metrics).
    pub fn peak(&self, target: &str) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .get(target)
            .map_or(0, |s| s.peak.load(Ordering::SeqCst))
    }
}
