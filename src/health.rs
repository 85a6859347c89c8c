//! Readiness, owned by the core and fed by the parts that can fail: start-up (recovery, warm-up),
//! the inference worker, the history store and a drain. `/health/ready` (and gRPC health) read it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Health {
    recovered: AtomicBool,
    warmed_up: AtomicBool,
    draining: AtomicBool,
    /// Set once, by the first fatal failure; never cleared (the process is meant to be replaced).
    failure: OnceLock<String>,
    failed: Notify,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Still starting: what it is waiting for.
    Starting(&'static str),
    Draining,
    Failed(String),
}

impl Health {
    pub fn set_recovered(&self) {
        self.recovered.store(true, Ordering::Release);
    }

    pub fn set_warmed_up(&self) {
        self.warmed_up.store(true, Ordering::Release);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Records a fatal failure (the first one wins) and turns readiness off for good.
    pub fn fail(&self, reason: impl Into<String>) {
        let _ = self.failure.set(reason.into());
        self.failed.notify_waiters();
    }

    /// Completes once a fatal failure is recorded (the server then exits non-zero, so that an
    /// orchestrator replaces the process).
    pub async fn failed(&self) -> String {
        loop {
            let notified = self.failed.notified();
            if let Some(reason) = self.failure.get() {
                return reason.clone();
            }
            notified.await;
        }
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    pub fn readiness(&self) -> Readiness {
        if let Some(reason) = self.failure.get() {
            Readiness::Failed(reason.clone())
        } else if self.draining.load(Ordering::Acquire) {
            Readiness::Draining
        } else if !self.recovered.load(Ordering::Acquire) {
            Readiness::Starting("recovering histories")
        } else if !self.warmed_up.load(Ordering::Acquire) {
            Readiness::Starting("warming up the model")
        } else {
            Readiness::Ready
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_recovery_and_warm_up_and_never_again_after_a_failure_or_drain() {
        let health = Health::default();
        assert_eq!(health.readiness(), Readiness::Starting("recovering histories"));
        health.set_warmed_up();
        assert_eq!(health.readiness(), Readiness::Starting("recovering histories"));
        health.set_recovered();
        assert_eq!(health.readiness(), Readiness::Ready);
        health.fail("worker died");
        health.fail("second");
        assert_eq!(health.readiness(), Readiness::Failed("worker died".into()));
        let draining = Health::default();
        draining.set_recovered();
        draining.set_warmed_up();
        draining.start_draining();
        assert_eq!(draining.readiness(), Readiness::Draining);
    }
}
