//! Per-target concurrency limits (`rateLimit.maxConcurrentRotationsPerTarget`).
//!
//! One semaphore per target, whatever the number of policies naming it. When policies
//! disagree about the limit of one database, the **smallest** limit seen wins: the limit
//! protects the database, so the most careful policy decides. A limit only ever shrinks
//! while the process runs (raising a policy's limit takes effect at the next restart);
//! shrinking never replaces the semaphore, so permits already held keep counting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
struct Slot {
    semaphore: Arc<Semaphore>,
    limit: usize,
    /// Permits to retire as they come back (a limit shrank while they were held).
    owed: Arc<AtomicUsize>,
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
    permit: Option<OwnedSemaphorePermit>,
    owed: Arc<AtomicUsize>,
    in_use: Arc<AtomicUsize>,
}

impl Drop for TargetPermit {
    fn drop(&mut self) {
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        let retire = self
            .owed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if retire && let Some(p) = self.permit.take() {
            p.forget();
        }
    }
}

impl TargetLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wait for a permit for `target`. The smallest `limit` any caller has named for the
    /// target bounds it (see the module documentation).
    pub async fn acquire(&self, target: &str, limit: usize) -> TargetPermit {
        let limit = limit.max(1);
        let (semaphore, owed, in_use, peak) = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let slot = slots.entry(target.to_string()).or_insert_with(|| Slot {
                semaphore: Arc::new(Semaphore::new(limit)),
                limit,
                owed: Arc::default(),
                in_use: Arc::default(),
                peak: Arc::default(),
            });
            if limit < slot.limit {
                let excess = slot.limit - limit;
                let forgotten = slot.semaphore.forget_permits(excess);
                // Held permits beyond the new limit are retired when they are released.
                slot.owed.fetch_add(excess - forgotten, Ordering::SeqCst);
                slot.limit = limit;
            }
            (
                slot.semaphore.clone(),
                slot.owed.clone(),
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
            permit: Some(permit),
            owed,
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

    /// The limit in force for `target` (the smallest named so far).
    pub fn limit(&self, target: &str) -> Option<usize> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(target).map(|s| s.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn a_smaller_limit_from_another_policy_bounds_permits_already_held() {
        let limiter = TargetLimiter::new();
        let mut held: Vec<_> = Vec::new();
        for _ in 0..4 {
            held.push(limiter.acquire("db", 4).await);
        }
        // Another policy on the same database allows 2: no new permit until only one
        // is held (then a second may join).
        assert!(limiter.acquire("db", 2).now_or_never().is_none());
        assert_eq!(limiter.limit("db"), Some(2));
        held.pop();
        held.pop();
        assert!(limiter.acquire("db", 4).now_or_never().is_none());
        held.pop();
        let joined = limiter.acquire("db", 4).now_or_never();
        assert!(joined.is_some(), "one held, limit 2: a second may join");
        assert!(limiter.acquire("db", 2).now_or_never().is_none());
        drop(joined);
        drop(held);
        // Back to idle: exactly two permits exist.
        let a = limiter.acquire("db", 4).now_or_never();
        let b = limiter.acquire("db", 4).now_or_never();
        assert!(a.is_some() && b.is_some());
        assert!(limiter.acquire("db", 4).now_or_never().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_policies_with_different_limits_never_exceed_the_smaller() {
        let limiter = TargetLimiter::new();
        // Both policies have been seen (in either order, the smaller wins).
        drop(limiter.acquire("db", 5).await);
        drop(limiter.acquire("db", 2).await);
        drop(limiter.acquire("other", 5).await);
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let limit = if i % 2 == 0 { 5 } else { 2 };
                    let _permit = limiter.acquire("db", limit).await;
                    for _ in 0..10 {
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(limiter.peak("db") <= 2, "peak {}", limiter.peak("db"));
        assert_eq!(limiter.limit("other"), Some(5), "other targets keep theirs");
    }
}
