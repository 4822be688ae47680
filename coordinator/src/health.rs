//! Whether the serving group can serve, and why not: set by the serving loop (formation,
//! standby, shutdown) and the engine (a failed step), read by `/health`, `/metrics` and admission.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, Mutex,
};

/// Whether the group can serve, and why not.
#[derive(Debug, Default)]
pub struct GroupHealth {
    ready: AtomicBool,
    /// Not ready because a group failed and the next is being formed: requests still queue.
    recovering: AtomicBool,
    reason: Mutex<String>,
}

impl GroupHealth {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_ready(&self) {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.recovering.store(false, Ordering::Release);
        self.ready.store(true, Ordering::Release);
    }

    /// Whether the group failed and its requests wait for the next one (see
    /// [`GroupHealth::set_recovering`]).
    pub fn is_recovering(&self) -> bool {
        self.recovering.load(Ordering::Acquire)
    }

    /// The group failed and the next is being formed; the requests in flight wait for it.
    pub fn set_recovering(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        *r = format!("recovering: {}", reason.into());
        self.recovering.store(true, Ordering::Release);
        if self.ready.swap(false, Ordering::AcqRel) {
            tracing::error!(reason = %r, "worker group is not ready");
        }
    }

    /// The group failed: with `requests_wait` (a recovery timeout is set) requests queue for the
    /// next group ([`GroupHealth::set_recovering`]); without, they are refused until it is ready.
    pub fn set_lost(&self, reason: impl Into<String>, requests_wait: bool) {
        if requests_wait {
            self.set_recovering(reason);
        } else {
            self.fail(reason);
        }
    }

    /// Marks the group stopped on purpose (a normal shutdown: nothing to log as an error).
    pub fn shut_down(&self) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = "shut down".into();
        self.recovering.store(false, Ordering::Release);
        self.ready.store(false, Ordering::Release);
    }

    /// Not ready for a reason that is not a failure of the group (standby, campaigning): the
    /// reason replaces whatever was there.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.into();
        self.recovering.store(false, Ordering::Release);
        self.ready.store(false, Ordering::Release);
    }

    /// Marks the group unusable (keeps the first reason).
    pub fn fail(&self, reason: impl Into<String>) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if self.ready.swap(false, Ordering::AcqRel) || r.is_empty() {
            *r = reason.into();
            tracing::error!(reason = %r, "worker group is not ready");
        }
    }
}

/// Shared by the serving loop, the engine and the HTTP handlers.
pub type SharedHealth = Arc<GroupHealth>;
